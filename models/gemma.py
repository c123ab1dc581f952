"""Gemma2ForCausalLM and Gemma3ForCausalLM.

    x = embed(tokens) * sqrt(hidden)
    for each layer (sliding-window and global layers alternate):
        x = x + post_attn_norm(attention(norm(x)))      logits soft-capped (Gemma2), QK-norm (Gemma3)
        x = x + post_mlp_norm(down(gelu(gate) * up))    on pre_mlp_norm(x)
    logits = softcap(unembed(norm(x)))                   soft cap: Gemma2

Every RMSNorm scales by (1 + w), in fp32. The attention scale is
query_pre_attn_scalar**-0.5. Gemma3 gives sliding and global layers their own RoPE
(local base 10k; global base 1M, maybe linearly scaled).
"""

from __future__ import annotations

from kiln.errors import ConfigError
from kiln.graph import Builder
from kiln.models import blocks, llama
from kiln.models.config import ModelConfig
from kiln.models.qwen3 import QK_NORM_RULES
from kiln.models.registry import ModelFamily, WeightRule, register

SLIDING, FULL = "sliding_attention", "full_attention"


def layer_types(cfg: ModelConfig) -> list[str]:
    """Each layer's kind: the config's `layer_types`, else the family's default pattern
    (Gemma2: even layers slide; Gemma3: every `sliding_window_pattern`-th layer is global)."""
    x = cfg.extra
    if x.get("layer_types"):
        return list(x["layer_types"])
    if cfg.architecture == "Gemma2ForCausalLM":
        return [SLIDING if (i + 1) % 2 else FULL for i in range(cfg.num_layers)]
    pattern = x.get("sliding_window_pattern") or x.get("_sliding_window_pattern") or 6
    return [SLIDING if (i + 1) % pattern else FULL for i in range(cfg.num_layers)]


def layer_rope(cfg: ModelConfig, kind: str) -> dict:
    """RoPE attrs of a layer kind: transformers 5 nests one rope dict per kind; older configs give
    the global rope at the top and `rope_local_base_freq` for sliding layers."""
    nested = cfg.extra.get("rope_parameters") or {}
    if kind in nested:
        p = dict(nested[kind])
        attrs = {"theta": float(p.pop("rope_theta", 10000.0))}
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise ConfigError(f"{cfg.architecture}: rope type {rope_type!r} for {kind} layers is not supported "
                              f"(supported: default, linear)")
        if rope_type != "default":
            attrs["scaling"] = {"rope_type": rope_type, "factor": p["factor"]}
        return attrs
    if kind == SLIDING and cfg.architecture == "Gemma3ForCausalLM":
        return {"theta": float(cfg.extra.get("rope_local_base_freq", 10000.0))}
    return blocks.rope_attrs(cfg)


def prepare(cfg: ModelConfig) -> ModelConfig:
    """The config with each layer's window from its kind (old Gemma2 configs name one window
    for all layers and leave the alternation to the model class); Gemma ties its embeddings
    unless the config says otherwise."""
    window = cfg.extra.get("sliding_window")
    return cfg.replace(sliding_windows=tuple(window if t == SLIDING else None for t in layer_types(cfg)),
                       tie_word_embeddings=bool(cfg.extra.get("tie_word_embeddings", True)))


def define(b: Builder, cfg: ModelConfig) -> None:
    cfg = prepare(cfg)
    gemma3 = cfg.architecture == "Gemma3ForCausalLM"
    x = cfg.extra
    scale = float(x.get("query_pre_attn_scalar") or cfg.head_dim) ** -0.5
    eps = cfg.rms_norm_eps
    h, table = blocks.embed(b, cfg)
    h = b.scale(h, factor=cfg.hidden_size ** 0.5, name="embed_scale")
    for i, kind in enumerate(layer_types(cfg)):
        with b.scope(f"layers.{i}"):
            a = blocks.attention(b, cfg, blocks.norm(b, "attn_norm", h, eps, offset=1.0), i,
                                 rope=layer_rope(cfg, kind), qk_norm=1.0 if gemma3 else None, scale=scale,
                                 soft_cap=x.get("attn_logit_softcapping"))
            h = b.add(h, blocks.norm(b, "post_attn_norm", a, eps, offset=1.0))
            m = blocks.gated_mlp(b, cfg, blocks.norm(b, "mlp_norm", h, eps, offset=1.0), act="gelu")
            h = b.add(h, blocks.norm(b, "post_mlp_norm", m, eps, offset=1.0))
    logits = blocks.lm_head(b, cfg, blocks.norm(b, "final_norm", h, eps, offset=1.0), table)
    if x.get("final_logit_softcapping"):
        logits = b.softcap(logits, cap=float(x["final_logit_softcapping"]), name="logits_softcap")
    b.output(logits)


_LAYER = "model.layers.{i}"


def weights(cfg: ModelConfig) -> list[WeightRule]:
    # Gemma's post_attention_layernorm follows attention; the MLP's input norm is pre_feedforward
    rules = [r for r in llama.weights(cfg) if r.param != "layers.{i}.mlp_norm.w"] + [
        WeightRule("layers.{i}.post_attn_norm.w", f"{_LAYER}.post_attention_layernorm.weight"),
        WeightRule("layers.{i}.mlp_norm.w", f"{_LAYER}.pre_feedforward_layernorm.weight"),
        WeightRule("layers.{i}.post_mlp_norm.w", f"{_LAYER}.post_feedforward_layernorm.weight"),
    ]
    return rules + (QK_NORM_RULES if cfg.architecture == "Gemma3ForCausalLM" else [])


GEMMA = ModelFamily("gemma", define, weights)
for _arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
    register(_arch, GEMMA)
