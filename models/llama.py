"""The Llama family: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.

    x = embed(tokens)
    for each layer:
        x = x + o_proj(attention(rope(q), rope(k), v))   on rms_norm(x)
        x = x + down(silu(gate) * up)                     on rms_norm(x)
    logits = lm_head(rms_norm(x))                         (tied to embed where the config says)

The three differ only in config: Qwen2 has q/k/v biases, Mistral and Qwen2 may use a
sliding window, Llama 3 scales RoPE.
"""

from __future__ import annotations

from kiln.graph import Builder
from kiln.models import blocks
from kiln.models.config import ModelConfig
from kiln.models.registry import ModelFamily, WeightRule, register


def define(b: Builder, cfg: ModelConfig) -> None:
    x, table = blocks.embed(b, cfg)
    for i in range(cfg.num_layers):
        with b.scope(f"layers.{i}"):
            h = blocks.norm(b, "attn_norm", x, cfg.rms_norm_eps)
            x = b.add(x, blocks.self_attention(b, cfg, h, i))
            h = blocks.norm(b, "mlp_norm", x, cfg.rms_norm_eps)
            x = b.add(x, blocks.swiglu_mlp(b, cfg, h))
    x = blocks.norm(b, "final_norm", x, cfg.rms_norm_eps)
    b.output(blocks.lm_head(b, cfg, x, table))


_LAYER = "model.layers.{i}"


def weights(cfg: ModelConfig) -> list[WeightRule]:
    rules = [
        WeightRule("embed", "model.embed_tokens.weight"),
        WeightRule("final_norm.w", "model.norm.weight"),
        WeightRule("lm_head.w", "lm_head.weight", "T"),
        WeightRule("layers.{i}.attn_norm.w", f"{_LAYER}.input_layernorm.weight"),
        WeightRule("layers.{i}.mlp_norm.w", f"{_LAYER}.post_attention_layernorm.weight"),
    ]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules += [WeightRule(f"layers.{{i}}.{proj}.w", f"{_LAYER}.self_attn.{proj}.weight", "T"),
                  WeightRule(f"layers.{{i}}.{proj}.b", f"{_LAYER}.self_attn.{proj}.bias")]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules += [WeightRule(f"layers.{{i}}.{proj}.w", f"{_LAYER}.mlp.{proj}.weight", "T"),
                  WeightRule(f"layers.{{i}}.{proj}.b", f"{_LAYER}.mlp.{proj}.bias")]
    return rules


LLAMA = ModelFamily("llama", define, weights)
for _arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
    register(_arch, LLAMA)
