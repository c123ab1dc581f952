"""Shared blocks of decoder-only transformers, written against the graph `Builder`.

Logical axes used by parameters (the sharding rules map these to mesh axes):
    vocab, embed, heads (q heads x head_dim), kv_heads (kv heads x head_dim), mlp
"""

from __future__ import annotations

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
    pos = b.input("positions")
    if (cfg.rope_scaling or {}).get("rope_type") == "dynamic":
        return b.rope(x, pos, b.input("seq_ids"), b.input("context_lens"), name=name, **rope_attrs(cfg))
    return b.rope(x, pos, name=name, **rope_attrs(cfg))


def self_attention(b: Builder, cfg: ModelConfig, x: Value, layer: int) -> Value:
    """Grouped-query self-attention over the paged KV cache: [T, embed] -> [T, embed]."""
    h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = linear(b, "q_proj", x, h * d, ("embed", "heads"), bias=cfg.qkv_bias)
    k = linear(b, "k_proj", x, kvh * d, ("embed", "kv_heads"), bias=cfg.qkv_bias)
    v = linear(b, "v_proj", x, kvh * d, ("embed", "kv_heads"), bias=cfg.qkv_bias)
    q = b.reshape(q, shape=["T", h, d], axes=[None, "heads", None], name="q")      # [T, H, D]
    k = b.reshape(k, shape=["T", kvh, d], axes=[None, "kv_heads", None], name="k")  # [T, KVH, D]
    v = b.reshape(v, shape=["T", kvh, d], axes=[None, "kv_heads", None], name="v")
    q, k = rope(b, q, cfg, "q_rope"), rope(b, k, cfg, "k_rope")
    window = cfg.sliding_windows[layer]
    slot = b.kv_layer(kvh, d, window)
    attn = b.attention(q, k, v, *[b.input(n) for n in ATTENTION_INPUTS],
                       layer=slot, scale=d ** -0.5, sliding_window=window)
    attn = b.reshape(attn, shape=["T", h * d], axes=[None, "heads"], name="attn_out")
    return linear(b, "o_proj", attn, cfg.hidden_size, ("heads", "embed"), bias=cfg.o_bias)


def swiglu_mlp(b: Builder, cfg: ModelConfig, x: Value) -> Value:
    """down(silu(gate(x)) * up(x))."""
    gate = linear(b, "gate_proj", x, cfg.intermediate_size, ("embed", "mlp"), bias=cfg.mlp_bias)
    up = linear(b, "up_proj", x, cfg.intermediate_size, ("embed", "mlp"), bias=cfg.mlp_bias)
    return linear(b, "down_proj", b.mul(b.silu(gate), up, name="swiglu"), cfg.hidden_size, ("mlp", "embed"), bias=cfg.mlp_bias)


def embed(b: Builder, cfg: ModelConfig) -> tuple[Value, Value]:
    table = b.param("embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
    return b.embedding(table, b.input("token_ids")), table


def lm_head(b: Builder, cfg: ModelConfig, x: Value, table: Value) -> Value:
    """Logits [L, vocab] for the rows `logits_indices` selects."""
    x = b.take(x, b.input("logits_indices"), name="last_hidden")
    if cfg.tie_word_embeddings:
        return b.unembed(x, table, name="logits")
    return linear(b, "lm_head", x, cfg.vocab_size, ("embed", "vocab"))
