"""Named model shapes for random-weight engines and benchmarks (`--random-weights NAME`).

Each preset is the Hugging Face config.json of the real model (the fields Kiln reads), so
`ModelConfig.from_hf_dict` builds it exactly as it would from the checkpoint.
"""

from __future__ import annotations

from kiln.errors import ConfigError
from kiln.models.config import ModelConfig

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict] = {
    "llama-3-8b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                       tie_word_embeddings=False, dtype="bfloat16", bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072, tie_word_embeddings=False,
                         dtype="bfloat16", bos_token_id=128000, eos_token_id=128001),
    "llama-3-70b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=8192,
                        intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                        tie_word_embeddings=False, dtype="bfloat16", bos_token_id=128000, eos_token_id=128001),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                       tie_word_embeddings=False, use_sliding_window=False, dtype="bfloat16",
                       bos_token_id=151643, eos_token_id=151645),
    "mixtral-8x7b": dict(architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
                         rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=False,
                         dtype="bfloat16", bos_token_id=1, eos_token_id=2),
    # a small Llama shape for quick GPU checks
    "llama-tiny": dict(architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=512,
                       intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                       rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                       tie_word_embeddings=False, dtype="bfloat16", bos_token_id=1, eos_token_id=2),
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return ModelConfig.from_hf_dict(PRESETS[name], source=f"preset {name}")


def preset_dict(name: str) -> dict:
    preset_config(name)
    return dict(PRESETS[name])
