"""Phi3ForCausalLM: the Llama layer, with fused projections in the checkpoint and LongRoPE.

    qkv_proj [(H + 2 KVH) * D, E]  ->  q_proj, k_proj, v_proj      (split on load)
    gate_up_proj [2 F, E]          ->  gate_proj, up_proj          (gate first)

The graph is Llama's (the fusion pass fuses them again in its own layout). RoPE may be
partial (`partial_rotary_factor`) and LongRoPE-scaled (`rope_type` "longrope", formerly
"su"): short factors while a sequence fits `original_max_position_embeddings`, long ones past it.
The choice reads the sequence's whole length (step input `seq_lens`), so every chunk of a
chunked prefill is rotated alike. When a sequence grows past that length, its cached keys
(rotated with the short factors) are stale: `graph.meta["kv_recompute_past"]` makes the
scheduler recompute that sequence's cache once, as transformers' generate does.
"""

from __future__ import annotations

from kiln.graph import Builder
from kiln.models import blocks, llama
from kiln.models.config import ModelConfig
from kiln.models.registry import ModelFamily, WeightRule, register


def rope(cfg: ModelConfig) -> dict:
    attrs = blocks.rope_attrs(cfg)
    x = cfg.extra
    factor = (x.get("rope_parameters") or {}).get("partial_rotary_factor") or x.get("partial_rotary_factor") or 1.0
    rotary_dim = int(cfg.head_dim * factor)
    if rotary_dim < cfg.head_dim:
        attrs["rotary_dim"] = rotary_dim
    return attrs


def define(b: Builder, cfg: ModelConfig) -> None:
    if (cfg.rope_scaling or {}).get("rope_type") == "longrope":
        # keys cached with the short factors are stale once the sequence outgrows the trained
        # context: transformers recomputes the whole cache at that step; a runtime should too
        b.meta["kv_recompute_past"] = cfg.rope_scaling["original_max_position_embeddings"]
    x, table = blocks.embed(b, cfg)
    for i in range(cfg.num_layers):
        with b.scope(f"layers.{i}"):
            h = blocks.norm(b, "attn_norm", x, cfg.rms_norm_eps)
            x = b.add(x, blocks.attention(b, cfg, h, i, rope=rope(cfg)))
            h = blocks.norm(b, "mlp_norm", x, cfg.rms_norm_eps)
            x = b.add(x, blocks.swiglu_mlp(b, cfg, h))
    x = blocks.norm(b, "final_norm", x, cfg.rms_norm_eps)
    b.output(blocks.lm_head(b, cfg, x, table))


def _rows(part: str):
    """Rows of a fused [out, in] matrix, transposed to [in, out]: q/k/v of qkv_proj, gate/up of gate_up_proj."""
    def take(a, cfg):
        q, kv, f = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        lo, hi = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv), "gate": (0, f), "up": (f, 2 * f)}[part]
        return a[lo:hi].T.copy()
    return take


_LAYER = "model.layers.{i}"


def weights(cfg: ModelConfig) -> list[WeightRule]:
    fused = [WeightRule(f"layers.{{i}}.{p}_proj.w", f"{_LAYER}.self_attn.qkv_proj.weight", _rows(p)) for p in "qkv"]
    fused += [WeightRule(f"layers.{{i}}.{p}_proj.w", f"{_LAYER}.mlp.gate_up_proj.weight", _rows(p)) for p in ("gate", "up")]
    return fused + llama.weights(cfg)  # first match wins: the fused sources shadow llama's per-projection names


register("Phi3ForCausalLM", ModelFamily("phi3", define, weights))
