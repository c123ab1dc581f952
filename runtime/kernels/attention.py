"""Paged attention: the KV-cache write and the attention read, with implementation choice.

Pool layout, per layer, for K and V alike (the layout jax's GPU paged-attention kernel uses)::

    pool[kv_head, block, offset, head_dim]      flat slot = block * block_size + offset

A flat ragged batch of T new tokens writes its K/V at `slot_mapping[t]` (negative = padding,
dropped), then each token attends over its sequence's blocks, keys at positions
`<= positions[t]` (causal inside the new tokens too) and, with a sliding window `W`,
`> positions[t] - W`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("reference",)


def write_kv(k_pool, v_pool, k, v, slot_mapping):
    """Scatter new K/V [T, KVH, D] into the pools at `slot_mapping` (padding slots < 0 are
    dropped). Returns the updated pools; with the pools donated, XLA updates in place."""
    kvh, nb, bs, d = k_pool.shape
    slots = jnp.where(slot_mapping < 0, nb * bs, slot_mapping)  # out of range -> dropped

    def put(pool, new):
        flat = pool.reshape(kvh, nb * bs, d)
        flat = flat.at[:, slots].set(jnp.swapaxes(new, 0, 1).astype(pool.dtype), mode="drop")
        return flat.reshape(kvh, nb, bs, d)

    return put(k_pool, k), put(v_pool, v)


def paged_attention_reference(q, k_pool, v_pool, positions, seq_ids, block_tables, context_lens, *,
                              scale, sliding_window=None, soft_cap=None):
    """Plain-JAX paged attention over a ragged batch. q [T, H, D] -> [T, H, D].

    Gathers every sequence's blocks, then each token's sequence: memory O(T * context),
    the reference that kernels are tested against, not a fast path."""
    t, h, d = q.shape
    kvh, _, bs, _ = k_pool.shape
    s, b = block_tables.shape
    g = h // kvh
    ctx = b * bs

    def per_token(pool):  # [KVH, T, ctx, D]
        seq = pool[:, block_tables].reshape(kvh, s, ctx, d)
        return seq[:, seq_ids]

    kt, vt = per_token(k_pool), per_token(v_pool)
    qg = q.reshape(t, kvh, g, d)
    scores = jnp.einsum("tkgd,ktcd->tkgc", qg, kt, preferred_element_type=jnp.float32) * scale
    if soft_cap:
        scores = jnp.tanh(scores / soft_cap) * soft_cap
    kpos = jnp.arange(ctx, dtype=jnp.int32)[None, :]
    pos = positions[:, None]
    mask = (kpos <= pos) & (kpos < context_lens[seq_ids][:, None])
    if sliding_window:
        mask &= kpos > pos - sliding_window
    scores = jnp.where(mask[:, None, None, :], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("tkgc,ktcd->tkgd", probs.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
    return out.reshape(t, h, d).astype(q.dtype)


def paged_attention(q, k_pool, v_pool, positions, seq_ids, block_tables, context_lens, query_start_loc, *,
                    scale, sliding_window=None, soft_cap=None, impl="reference"):
    """Dispatch to an implementation: "reference" (plain JAX, any backend)."""
    if impl == "reference":
        return paged_attention_reference(q, k_pool, v_pool, positions, seq_ids, block_tables, context_lens,
                                         scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLS}")
