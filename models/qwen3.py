"""Qwen3ForCausalLM: the Llama layer with QK-norm.

    q, k = rms_norm(q_proj(x)), rms_norm(k_proj(x))     per head, over head_dim, before RoPE

Everything else (GQA, SwiGLU, RMSNorm, optional tied embeddings and per-layer sliding
window) is Llama's; so are the weight names, plus `self_attn.q_norm` / `k_norm`.
"""

from __future__ import annotations

from kiln.graph import Builder
from kiln.models import blocks, llama
from kiln.models.config import ModelConfig
from kiln.models.registry import ModelFamily, WeightRule, register


def decoder_layer(b: Builder, cfg: ModelConfig, x, i: int, mlp):
    """x + attention(norm(x)) with QK-norm, then x + mlp(norm(x)): Qwen3's and Qwen3-MoE's layer."""
    h = blocks.norm(b, "attn_norm", x, cfg.rms_norm_eps)
    x = b.add(x, blocks.attention(b, cfg, h, i, rope=blocks.rope_attrs(cfg), qk_norm=0.0))
    h = blocks.norm(b, "mlp_norm", x, cfg.rms_norm_eps)
    return b.add(x, mlp(b, cfg, h))


def define(b: Builder, cfg: ModelConfig) -> None:
    x, table = blocks.embed(b, cfg)
    for i in range(cfg.num_layers):
        with b.scope(f"layers.{i}"):
            x = decoder_layer(b, cfg, x, i, blocks.swiglu_mlp)
    x = blocks.norm(b, "final_norm", x, cfg.rms_norm_eps)
    b.output(blocks.lm_head(b, cfg, x, table))


QK_NORM_RULES = [WeightRule("layers.{i}.q_norm.w", "model.layers.{i}.self_attn.q_norm.weight"),
                 WeightRule("layers.{i}.k_norm.w", "model.layers.{i}.self_attn.k_norm.weight")]


def weights(cfg: ModelConfig) -> list[WeightRule]:
    return llama.weights(cfg) + QK_NORM_RULES


register("Qwen3ForCausalLM", ModelFamily("qwen3", define, weights))
