"""Ops for the wider model families: mixture-of-experts, LongRoPE, the sigmoid gate.

Registered into the one registry (`graph/ops.py` imports this module at its end).

    moe(x[T,E], router_logits[T,X], w_gate[X,E,F], w_up[X,E,F], w_down[X,F,E]) -> [T,E]
        top-k routing over X experts, SwiGLU experts. `impl="grouped"` (default) sorts the
        T*k (token, expert) assignments by expert and runs three grouped matmuls
        (runtime/kernels/grouped_matmul.py; `gemm` picks one, default per backend): each
        token meets only its k experts. `impl="dense"` runs every expert on every token
        and masks: the reference the grouped path is tested against.
    longrope(x[T,H,D], positions, seq_ids, seq_lens) -> [T,H,D]
        Phi-3's LongRoPE: per-dim frequency factors, "short" while the sequence (its whole
        length `seq_lens[seq]`, not the part in the cache yet: a chunked prefill rotates every
        chunk alike) fits the trained context, "long" once it is longer, cos/sin scaled by
        `attention_factor`. The runtime recomputes a sequence's K when it grows past the
        switch (runtime/scheduler.py).
    sigmoid_gate(x[T,E], g[T,1]) -> x * sigmoid(g)      (Qwen2-MoE's shared-expert gate)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kiln.graph.ops import _check_rank, _require, _rope_shape, _same_dim, register_op

MOE_IMPLS = ("grouped", "dense")


# --------------------------------------------------------------------------- moe


def _moe_shape(attrs, x, logits, w_gate, w_up, w_down):
    _check_rank(x, 2, "moe input [tokens, embed]")
    _check_rank(logits, 2, "router logits [tokens, experts]")
    for w, what in ((w_gate, "w_gate"), (w_up, "w_up"), (w_down, "w_down")):
        _check_rank(w, 3, f"moe {what} [experts, in, out]")
    n_exp, e, f = w_gate.shape
    _require(w_up.shape == (n_exp, e, f), f"w_up {w_up} does not match w_gate {w_gate}")
    _require(w_down.shape == (n_exp, f, e), f"w_down {w_down} must be [{n_exp}, {f}, {e}]")
    _require(_same_dim(x.shape[-1], e), f"input's last dim {x.shape[-1]} does not match experts' in-dim {e}")
    _require(_same_dim(logits.shape[0], x.shape[0]) and logits.shape[1] == n_exp,
             f"router logits {logits} must be [{x.shape[0]}, {n_exp}]")
    k = attrs.get("top_k")
    _require(isinstance(k, int) and 1 <= k <= n_exp, f"top_k must be an int in 1..{n_exp}, got {k!r}")
    _require(attrs.get("impl", "grouped") in MOE_IMPLS, f"moe impl must be one of {MOE_IMPLS}, got {attrs.get('impl')!r}")
    return x


def route(logits, top_k: int, norm_topk: bool):
    """Softmax over experts (fp32), then the k largest: (weights [T,k] fp32, experts [T,k] int32)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def moe_dense(x, weights, experts, w_gate, w_up, w_down):
    """Every expert on every token, combined with the routing weights (zero off the top k)."""
    n_exp = w_gate.shape[0]
    combine = jnp.sum(jax.nn.one_hot(experts, n_exp, dtype=jnp.float32) * weights[..., None], axis=1)  # [T,X]
    dt = x.dtype
    h = jax.nn.silu(jnp.einsum("te,xef->txf", x, w_gate.astype(dt))) * jnp.einsum("te,xef->txf", x, w_up.astype(dt))
    y = jnp.einsum("txf,xfe->txe", h, w_down.astype(dt))                           # [T, X, E]
    return jnp.einsum("txe,tx->te", y.astype(jnp.float32), combine).astype(dt)


def moe_grouped(x, weights, experts, w_gate, w_up, w_down, gemm: str | None = None):
    """Sort the T*k assignments by expert, three grouped matmuls, unsort, weighted sum over k.
    `gemm` names the grouped-matmul implementation (runtime/kernels/grouped_matmul.py; None:
    the backend's default).

        assignments (token, slot) -> flat a = token * k + slot, expert e[a]
        order = argsort(e)          rows of xs = x[order // k], grouped by expert
        sizes[x] = #assignments of expert x          (the ragged groups)
    """
    from kiln.runtime.kernels.grouped_matmul import grouped_matmul

    t, k = experts.shape
    n_exp = w_gate.shape[0]
    dt = x.dtype
    flat = experts.reshape(-1)                                    # [T*k]
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=n_exp).astype(jnp.int32)    # [X]
    xs = jnp.take(x, order // k, axis=0)                          # [T*k, E], grouped by expert
    h = jax.nn.silu(grouped_matmul(xs, w_gate, sizes, gemm)) * grouped_matmul(xs, w_up, sizes, gemm)
    ys = grouped_matmul(h, w_down, sizes, gemm)                   # [T*k, E]
    unsort = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=order.dtype))
    y = jnp.take(ys, unsort, axis=0).reshape(t, k, -1)            # [T, k, E]
    return jnp.einsum("tke,tk->te", y.astype(jnp.float32), weights).astype(dt)


def _moe_lower(ctx, x, logits, w_gate, w_up, w_down, *, top_k, norm_topk=True, impl="grouped", gemm=None):
    weights, experts = route(logits, top_k, norm_topk)
    if impl == "dense":
        return moe_dense(x, weights, experts, w_gate, w_up, w_down)
    return moe_grouped(x, weights, experts, w_gate, w_up, w_down, gemm)


register_op("moe", _moe_shape, _moe_lower, inputs=5)


# --------------------------------------------------------------------------- longrope


def _longrope_shape(attrs, x, positions, seq_ids, seq_lens):
    _rope_shape({"rotary_dim": attrs.get("rotary_dim")}, x, positions)
    rd = attrs.get("rotary_dim") or x.shape[2]
    for key in ("short_factor", "long_factor"):
        _require(len(attrs.get(key) or ()) == rd // 2, f"{key} needs {rd // 2} entries (rotary_dim / 2)")
    return x


def _longrope_lower(ctx, x, positions, seq_ids, seq_lens, *, theta, short_factor, long_factor,
                    original_max_position_embeddings, attention_factor, rotary_dim=None):
    d = x.shape[-1]
    rd = rotary_dim or d
    base = theta ** (np.arange(0, rd, 2, dtype=np.int64).astype(np.float32) / rd)
    inv_short = jnp.asarray(1.0 / (np.float32(short_factor) * base), jnp.float32)  # [rd/2]
    inv_long = jnp.asarray(1.0 / (np.float32(long_factor) * base), jnp.float32)
    is_long = seq_lens[seq_ids] > original_max_position_embeddings                 # [T]: this sequence's length
    inv = jnp.where(is_long[:, None], inv_long[None, :], inv_short[None, :])       # [T, rd/2]
    freqs = positions.astype(jnp.float32)[:, None] * inv
    cos = (jnp.cos(freqs) * attention_factor).astype(x.dtype)[:, None, :]          # [T, 1, rd/2]
    sin = (jnp.sin(freqs) * attention_factor).astype(x.dtype)[:, None, :]
    x1, x2 = x[..., : rd // 2], x[..., rd // 2: rd]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([out, x[..., rd:]], axis=-1) if rd < d else out


register_op("longrope", _longrope_shape, _longrope_lower, inputs=4)


# --------------------------------------------------------------------------- sigmoid gate


def _sigmoid_gate_shape(attrs, x, g):
    _require(g.rank == x.rank and g.shape[:-1] == x.shape[:-1] and g.shape[-1] == 1,
             f"gate {g} must be {x}'s shape with a last dim of 1")
    return x


register_op("sigmoid_gate", _sigmoid_gate_shape, lambda ctx, x, g: x * jax.nn.sigmoid(g).astype(x.dtype), inputs=2)
