"""Shared blocks of decoder-only transformers, written against the graph `Builder`.

Logical axes used by parameters (the sharding rules map these to mesh axes):
    vocab, embed, heads (q heads x head_dim), kv_heads (kv heads x head_dim), mlp
"""

from __future__ import annotations

import math

from kiln.graph import Builder, Value
from kiln.models.config import ModelConfig

ATTENTION_INPUTS = ("positions", "seq_ids", "slot_mapping", "block_tables", "context_lens", "query_start_loc")


def norm(b: Builder, name: str, x: Value, eps: float, *, offset: float = 0.0) -> Value:
    w = b.param(f"{name}.w", (x.shape[-1],), ("embed",), init="zeros" if offset else "ones")
    return b.rms_norm(x, w, eps=eps, offset=offset, name=name) if offset else b.rms_norm(x, w, eps=eps, name=name)


def linear(b: Builder, name: str, x: Value, out: int, axes: tuple[str, str], *, bias: bool = False) -> Value:
    """y = x @ w (+ bias); `w` is declared [in, out]."""
    w = b.param(f"{name}.w", (x.shape[-1], out), axes)
    bb = b.param(f"{name}.b", (out,), (axes[1],), init="zeros") if bias else None
    return b.linear(x, w, bb, name=name)


def rope_attrs(cfg: ModelConfig) -> dict:
    attrs = {"theta": cfg.rope_theta}
    if cfg.rope_scaling:
        attrs["scaling"] = cfg.rope_scaling
    return attrs


def rope(b: Builder, x: Value, cfg: ModelConfig, name: str = "rope") -> Value:
    return rotary(b, x, rope_attrs(cfg), name)


def rotary(b: Builder, x: Value, attrs: dict | None, name: str = "rope") -> Value:
    """Rotary position embedding of [T, heads, head_dim] with `attrs` (theta, scaling,
    rotary_dim): plain/linear/llama3 `rope`, per-sequence `rope` for dynamic NTK, `longrope`
    for Phi-3's LongRoPE; `attrs=None` is no rotary at all (learned positions)."""
    if attrs is None:
        return x
    pos = b.input("positions")
    scaling = attrs.get("scaling") or {}
    kind = scaling.get("rope_type")
    if kind == "longrope":
        factor, orig = scaling["factor"], scaling["original_max_position_embeddings"]
        af = scaling.get("attention_factor") or (math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0)
        extra = {"rotary_dim": attrs["rotary_dim"]} if attrs.get("rotary_dim") else {}
        return b.longrope(x, pos, b.input("seq_ids"), b.input("seq_lens"), name=name, theta=attrs["theta"],
                          short_factor=scaling["short_factor"], long_factor=scaling["long_factor"],
                          original_max_position_embeddings=orig, attention_factor=af, **extra)
    if kind == "dynamic":
        return b.rope(x, pos, b.input("seq_ids"), b.input("context_lens"), name=name, **attrs)
    return b.rope(x, pos, name=name, **attrs)


def self_attention(b: Builder, cfg: ModelConfig, x: Value, layer: int) -> Value:
    """Grouped-query self-attention over the paged KV cache: [T, embed] -> [T, embed]."""
    return attention(b, cfg, x, layer, rope=rope_attrs(cfg))


def head_norm(b: Builder, name: str, x: Value, eps: float, *, offset: float = 0.0) -> Value:
    """RMSNorm over head_dim of [T, heads, head_dim], one weight shared by all heads (QK-norm)."""
    w = b.param(f"{name}.w", (x.shape[-1],), (None,), init="zeros" if offset else "ones")
    return b.rms_norm(x, w, eps=eps, offset=offset, name=name) if offset else b.rms_norm(x, w, eps=eps, name=name)


def attention(b: Builder, cfg: ModelConfig, x: Value, layer: int, *, rope: dict | None,
              qk_norm: float | None = None, scale: float | None = None, soft_cap: float | None = None) -> Value:
    """Self-attention with the variants of the wider families: `rope` attrs for this layer
    (None: no rotary), QK-norm before the rotary (`qk_norm` = the RMSNorm offset: 0.0 Qwen3,
    1.0 Gemma3; None: none), a `scale` other than head_dim**-0.5, logit `soft_cap` (Gemma2).
    The window is `cfg.sliding_windows[layer]`. [T, embed] -> [T, embed]."""
    h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = linear(b, "q_proj", x, h * d, ("embed", "heads"), bias=cfg.qkv_bias)
    k = linear(b, "k_proj", x, kvh * d, ("embed", "kv_heads"), bias=cfg.qkv_bias)
    v = linear(b, "v_proj", x, kvh * d, ("embed", "kv_heads"), bias=cfg.qkv_bias)
    q = b.reshape(q, shape=["T", h, d], axes=[None, "heads", None], name="q")      # [T, H, D]
    k = b.reshape(k, shape=["T", kvh, d], axes=[None, "kv_heads", None], name="k")  # [T, KVH, D]
    v = b.reshape(v, shape=["T", kvh, d], axes=[None, "kv_heads", None], name="v")
    if qk_norm is not None:
        q = head_norm(b, "q_norm", q, cfg.rms_norm_eps, offset=qk_norm)
        k = head_norm(b, "k_norm", k, cfg.rms_norm_eps, offset=qk_norm)
    q, k = rotary(b, q, rope, "q_rope"), rotary(b, k, rope, "k_rope")
    window = cfg.sliding_windows[layer]
    slot = b.kv_layer(kvh, d, window)
    extra = {"soft_cap": soft_cap} if soft_cap else {}
    attn = b.attention(q, k, v, *[b.input(n) for n in ATTENTION_INPUTS],
                       layer=slot, scale=scale or d ** -0.5, sliding_window=window, **extra)
    attn = b.reshape(attn, shape=["T", h * d], axes=[None, "heads"], name="attn_out")
    return linear(b, "o_proj", attn, cfg.hidden_size, ("heads", "embed"), bias=cfg.o_bias)


def swiglu_mlp(b: Builder, cfg: ModelConfig, x: Value) -> Value:
    """down(silu(gate(x)) * up(x))."""
    return gated_mlp(b, cfg, x)


def gated_mlp(b: Builder, cfg: ModelConfig, x: Value, *, act: str = "silu", size: int | None = None) -> Value:
    """down(act(gate(x)) * up(x)): SwiGLU (`act="silu"`) or GeGLU (`act="gelu"`, tanh form);
    `size` overrides the intermediate size (a MoE layer's shared expert)."""
    f = size or cfg.intermediate_size
    gate = linear(b, "gate_proj", x, f, ("embed", "mlp"), bias=cfg.mlp_bias)
    up = linear(b, "up_proj", x, f, ("embed", "mlp"), bias=cfg.mlp_bias)
    gated = b.mul(b.op(act, gate), up, name="swiglu" if act == "silu" else "geglu")
    return linear(b, "down_proj", gated, cfg.hidden_size, ("mlp", "embed"), bias=cfg.mlp_bias)


def embed(b: Builder, cfg: ModelConfig) -> tuple[Value, Value]:
    table = b.param("embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
    return b.embedding(table, b.input("token_ids")), table


def lm_head(b: Builder, cfg: ModelConfig, x: Value, table: Value) -> Value:
    """Logits [L, vocab] for the rows `logits_indices` selects."""
    x = b.take(x, b.input("logits_indices"), name="last_hidden")
    if cfg.tie_word_embeddings:
        return b.unembed(x, table, name="logits")
    return linear(b, "lm_head", x, cfg.vocab_size, ("embed", "vocab"))


def layer_norm(b: Builder, name: str, x: Value, eps: float) -> Value:
    """LayerNorm with weight and bias (GPT-2)."""
    w = b.param(f"{name}.w", (x.shape[-1],), ("embed",), init="ones")
    bias = b.param(f"{name}.b", (x.shape[-1],), ("embed",), init="zeros")
    return b.layer_norm(x, w, bias, eps=eps, name=name)


def plain_mlp(b: Builder, cfg: ModelConfig, x: Value, *, act: str = "gelu", **act_attrs) -> Value:
    """down(act(up(x))), biases where `cfg.mlp_bias` (GPT-2's c_fc / c_proj)."""
    up = linear(b, "up_proj", x, cfg.intermediate_size, ("embed", "mlp"), bias=cfg.mlp_bias)
    return linear(b, "down_proj", b.op(act, up, **act_attrs), cfg.hidden_size, ("mlp", "embed"), bias=cfg.mlp_bias)


def moe_mlp(b: Builder, cfg: ModelConfig, x: Value, *, num_experts: int, top_k: int, size: int,
            norm_topk: bool) -> Value:
    """A mixture-of-experts SwiGLU layer: router logits, then the `moe` op over stacked expert
    weights [experts, in, out]. The leading `experts` axis is what expert parallelism splits."""
    router = b.param("router.w", (x.shape[-1], num_experts), ("embed", None))
    logits = b.linear(x, router, name="router")                                      # [T, X]
    e = cfg.hidden_size
    w_gate = b.param("experts.gate.w", (num_experts, e, size), ("experts", "embed", "mlp"))
    w_up = b.param("experts.up.w", (num_experts, e, size), ("experts", "embed", "mlp"))
    w_down = b.param("experts.down.w", (num_experts, size, e), ("experts", "mlp", "embed"))
    return b.moe(x, logits, w_gate, w_up, w_down, top_k=top_k, norm_topk=norm_topk, name="moe")
