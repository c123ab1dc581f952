"""`ModelConfig`: one flat description of a decoder-only model, built from a Hugging Face
`config.json` in `ModelConfig.from_hf` (the one place that reads that file) or from a
mapping of the same keys (`from_hf_dict`, which the GGUF reader feeds)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16", "half": "float16", "float": "float32"}

_SUPPORTED_ROPE = ("default", "linear", "dynamic", "llama3", "longrope")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None          # {"rope_type": "llama3" | "linear" | "dynamic", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_windows: tuple[int | None, ...] = ()  # one per layer; None = global attention
    dtype: str = "float32"                     # the checkpoint's dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads ({self.num_heads}) is not a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")
        if len(self.sliding_windows) != self.num_layers:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        """Every field, JSON-able (engine.json keeps it; `from_json` rebuilds it exactly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["sliding_windows"] = tuple(d.get("sliding_windows") or ())
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)

    @classmethod
    def from_hf(cls, path: str | Path) -> "ModelConfig":
        """Read `path/config.json` (and `generation_config.json` for EOS ids when present)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise ConfigError(f"{file}: not found; pass a Hugging Face checkpoint directory (config.json + "
                              f"*.safetensors) or a .gguf file")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{file}: expected a JSON object at the top level")
        gen = file.parent / "generation_config.json"
        if gen.exists():
            try:
                g = json.loads(gen.read_text())
                if g.get("eos_token_id") is not None:
                    d = {**d, "eos_token_id": g["eos_token_id"]}
            except json.JSONDecodeError:
                pass  # generation_config is optional; config.json's eos stands
        return cls.from_hf_dict(d, source=str(file))

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        def get(key, *alts, default=_MISSING, types=None):
            for k in (key, *alts):
                if k in d and d[k] is not None:
                    v = d[k]
                    if types and not isinstance(v, types):
                        raise ConfigError(f"{source}: field {k!r} has the wrong type ({type(v).__name__}: {v!r})")
                    return v
            if default is _MISSING:
                raise ConfigError(f"{source}: missing field {key!r}")
            return default

        archs = get("architectures", types=list)
        if not archs or not isinstance(archs[0], str):
            raise ConfigError(f"{source}: field 'architectures' must list the model class name")
        arch = archs[0]
        from kiln.models.registry import get_family

        get_family(arch)  # an unknown architecture is the first thing to report
        hidden = get("hidden_size", "n_embd", types=int)
        heads = get("num_attention_heads", "n_head", types=int)
        kv_heads = get("num_key_value_heads", default=heads, types=int)
        head_dim = get("head_dim", default=None, types=int) or (hidden // heads if heads else 0)
        layers = get("num_hidden_layers", "n_layer", types=int)

        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: field 'rope_scaling' must be an object, got {rope!r}")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_type = "longrope" if rope_type == "su" else rope_type  # Phi-3's first name for LongRoPE
        if rope_type not in _SUPPORTED_ROPE:
            raise ConfigError(f"{source}: rope scaling type {rope_type!r} is not supported "
                              f"(supported: {', '.join(_SUPPORTED_ROPE)})")
        max_pos = get("max_position_embeddings", "n_positions", default=2048, types=int)
        scaling = None
        if rope_type != "default":
            scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "type")}
            scaling["rope_type"] = rope_type
            scaling.setdefault("max_position_embeddings", max_pos)
            if rope_type == "longrope":  # factor: the context's growth over the trained length (as transformers)
                orig = scaling.setdefault("original_max_position_embeddings",
                                          get("original_max_position_embeddings", default=max_pos, types=int))
                scaling.setdefault("factor", max_pos / orig)
            if "factor" not in scaling:
                raise ConfigError(f"{source}: rope scaling {rope_type!r} needs a 'factor'")

        window = d.get("sliding_window")
        if "layer_types" in d and d["layer_types"]:
            windows = tuple(window if t == "sliding_attention" else None for t in d["layer_types"])
        elif d.get("use_sliding_window") is False:
            windows = (None,) * layers
        elif d.get("use_sliding_window"):
            mwl = d.get("max_window_layers", layers)
            windows = tuple(window if i >= mwl else None for i in range(layers))
        else:
            windows = (window,) * layers

        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        dtype = DTYPE_NAMES.get(str(d.get("dtype") or d.get("torch_dtype") or "float32"), "float32")
        attention_bias = bool(d.get("attention_bias", False))
        qkv_bias = attention_bias or arch.startswith("Qwen2")
        return cls(
            architecture=arch,
            vocab_size=get("vocab_size", types=int),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", "n_inner", default=4 * hidden, types=int),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(get("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", default=1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            hidden_act=str(d.get("hidden_act", "silu")),
            sliding_windows=windows,
            dtype=dtype,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            extra={k: v for k, v in d.items()},
        )

    @classmethod
    def from_gguf(cls, meta: dict, tensor_shapes: dict[str, tuple[int, ...]], source: str = "gguf",
                  rope_freqs=None) -> "ModelConfig":
        """Map GGUF metadata (`llama.block_count`, ...) and the tensor table (numpy shapes) onto
        the keys `from_hf_dict` reads. `rope_freqs` is llama.cpp's per-frequency divisor
        tensor, which it writes instead of Llama 3's rope parameters."""
        arch = str(meta.get("general.architecture", ""))
        if arch not in GGUF_ARCHITECTURES:
            from kiln.errors import UnsupportedArchitectureError

            raise UnsupportedArchitectureError(
                f"{source}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}")

        def m(key, default=_MISSING):
            v = meta.get(f"{arch}.{key}", default)
            if v is _MISSING:
                raise ConfigError(f"{source}: GGUF metadata has no {arch}.{key}")
            return v

        hidden, heads = int(m("embedding_length")), int(m("attention.head_count"))
        kv = m("attention.head_count_kv", heads)
        if isinstance(kv, list):  # per-layer counts (hybrid models): Kiln needs one value
            if len(set(kv)) != 1:
                raise ConfigError(f"{source}: per-layer KV head counts {sorted(set(kv))} are not supported")
            kv = kv[0]
        if "token_embd.weight" not in tensor_shapes:
            raise ConfigError(f"{source}: GGUF file has no token_embd.weight tensor")
        d = {
            "architectures": [GGUF_ARCHITECTURES[arch]],
            "vocab_size": int(tensor_shapes["token_embd.weight"][0]),
            "hidden_size": hidden,
            "intermediate_size": int(m("feed_forward_length")),
            "num_hidden_layers": int(m("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv),
            "head_dim": int(m("attention.key_length", hidden // heads)),
            "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(m("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(m("context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in tensor_shapes,
            "dtype": GGUF_FILE_DTYPES.get(int(meta.get("general.file_type", 0)), "float32"),
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": list(dict.fromkeys(int(meta[k]) for k in ("tokenizer.ggml.eos_token_id",
                                                                       "tokenizer.ggml.eot_token_id") if k in meta)),
        }
        window = m("attention.sliding_window", None)
        if window:
            d["sliding_window"] = int(window)
        scaling = str(m("rope.scaling.type", "none"))
        if scaling == "linear":
            d["rope_scaling"] = {"rope_type": "linear", "factor": float(m("rope.scaling.factor"))}
        elif scaling not in ("none", ""):
            d["rope_scaling"] = {"rope_type": scaling, "factor": float(m("rope.scaling.factor", 1.0))}  # rejected below
        if rope_freqs is not None:
            d["rope_scaling"] = _llama3_from_rope_freqs(rope_freqs, d, source)
        return cls.from_hf_dict(d, source=source)


# GGUF `general.architecture` -> the Kiln architecture that runs it (families add theirs here).
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# GGUF `general.file_type` -> the build dtype "auto" picks: half-precision files stay in their
# dtype, fp32 and block-quantized files are dequantized to fp32 (what transformers does).
GGUF_FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


def _llama3_from_rope_freqs(rope_freqs, d: dict, source: str) -> dict:
    """Llama 3 rope scaling from llama.cpp's `rope_freqs` tensor: factor = its largest divisor,
    the other parameters Llama 3's; checked against the tensor, a mismatch is an error."""
    import numpy as np

    from kiln.graph.ops import rope_inv_freq

    freqs = np.asarray(rope_freqs, np.float32).reshape(-1)
    scaling = {"rope_type": "llama3", "factor": float(freqs.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    rd = 2 * freqs.shape[0]
    want = rope_inv_freq(rd, d["rope_theta"], None) / rope_inv_freq(rd, d["rope_theta"], scaling)
    if not np.allclose(want, freqs, rtol=1e-3):
        raise ConfigError(f"{source}: rope_freqs tensor does not match Llama 3 rope scaling; this rope "
                          f"scaling is not supported")
    return scaling


_MISSING = object()
