"""The op registry: for each op, a shape rule and a reference JAX lowering.

A shape rule takes the input `TensorType`s and the attributes and returns the output
type, raising `ShapeError` with what disagrees; the verifier adds the node's name.
A lowering takes a `LowerCtx` and the input arrays (same order) and the attributes.
New ops (a user's model, a pass's fused op) register here with `register_op`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kiln.errors import GraphError
from kiln.graph.ir import Dim, TensorType


class ShapeError(ValueError):
    """An op's inputs do not fit its shape rule."""


@dataclass(frozen=True)
class OpDef:
    name: str
    shape: Callable[..., TensorType]   # shape(attrs, *input_types) -> TensorType
    lower: Callable[..., Any]          # lower(ctx, *arrays, **attrs) -> array
    min_inputs: int
    max_inputs: int


REGISTRY: dict[str, OpDef] = {}


def register_op(name: str, shape: Callable, lower: Callable, *, inputs: int | tuple[int, int]):
    lo, hi = (inputs, inputs) if isinstance(inputs, int) else inputs
    REGISTRY[name] = OpDef(name, shape, lower, lo, hi)


def get_op(name: str) -> OpDef:
    try:
        return REGISTRY[name]
    except KeyError:
        raise GraphError(f"unknown op {name!r}; registered ops: {', '.join(sorted(REGISTRY))}") from None


class LowerCtx:
    """What a lowering may use besides its inputs: the KV cache (threaded through the step;
    attention replaces its layer's entry) and implementation choices."""

    def __init__(self, kv_cache: list, attention_impl: str = "reference", shard=None):
        self.kv_cache = list(kv_cache)
        self.attention_impl = attention_impl
        # tensor parallel (passes/sharding.py): `shard.attention(fn, *args)` runs an attention
        # body per kv-head shard; `shard.constrain(x, type)` places a node's output
        self.shard = shard
        # what a lowering leaves for the lowerings of its readers, keyed by id() of the value it
        # returned (an entry holds that value: a match is checked with `is`). passes/fp8_act.py:
        # a W8A8 matmul's unscaled GEMM output and scales, which a SwiGLU consumes directly.
        self.notes: dict[int, tuple] = {}
        # (start, size) when the step's token inputs are one window of the flat batch (a pipeline
        # micro-batch, passes/pipeline_parallel.py) while the per-sequence inputs describe all of it
        self.token_window = None


def jnp_dtype(name: str):
    return jnp.dtype(name)


# --------------------------------------------------------------------------- helpers


def _require(cond: bool, msg: str):
    if not cond:
        raise ShapeError(msg)


def _same_dim(a: Dim, b: Dim) -> bool:
    return a == b


def _check_rank(t: TensorType, rank: int, what: str):
    _require(t.rank == rank, f"{what} must have rank {rank}, got {t}")


def _is_float(t: TensorType) -> bool:
    return t.dtype in ("float32", "bfloat16", "float16")


# --------------------------------------------------------------------------- embedding


def _embedding_shape(attrs, table, ids):
    _check_rank(table, 2, "embedding table")
    _check_rank(ids, 1, "token ids")
    _require(ids.dtype == "int32", f"token ids must be int32, got {ids.dtype}")
    return TensorType((ids.shape[0], table.shape[1]), table.dtype, (None, table.axes[1] if table.axes else None))


def _embedding_lower(ctx, table, ids):
    return jnp.take(table, ids, axis=0)  # [T, E]


register_op("embedding", _embedding_shape, _embedding_lower, inputs=2)


# --------------------------------------------------------------------------- linear


def _linear_shape(attrs, x, w, bias=None):
    # w is [in, *out]: [in, out], or a fused layout such as QKV [embed, kv_heads, group + 2, head_dim]
    _require(w.rank >= 2, f"weight must be [in, out...], got {w}")
    _require(x.rank >= 1 and _same_dim(x.shape[-1], w.shape[0]),
             f"input's last dim {x.shape[-1]} does not match weight's in-dim {w.shape[0]} ({x} @ {w})")
    if bias is not None:
        _require(bias.shape == w.shape[1:], f"bias {bias} does not match weight out-dims {w.shape[1:]}")
    axes = (x.axes[:-1] if x.axes else (None,) * (x.rank - 1)) + (w.axes[1:] if w.axes else (None,) * (w.rank - 1))
    return TensorType(x.shape[:-1] + w.shape[1:], x.dtype, axes)


def _linear_lower(ctx, x, w, bias=None):
    w = w.astype(x.dtype) if w.dtype != x.dtype else w
    y = jnp.matmul(x, w) if w.ndim == 2 else jnp.tensordot(x, w, axes=1)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


register_op("linear", _linear_shape, _linear_lower, inputs=(2, 3))


def _unembed_shape(attrs, x, table):
    _check_rank(table, 2, "embedding table")
    _require(_same_dim(x.shape[-1], table.shape[1]),
             f"hidden dim {x.shape[-1]} does not match the table's embed dim {table.shape[1]}")
    return TensorType(x.shape[:-1] + (table.shape[0],), x.dtype, (None,) * (x.rank - 1) + ((table.axes or (None,))[0],))


def _unembed_lower(ctx, x, table):
    return jnp.einsum("...e,ve->...v", x, table.astype(x.dtype))  # tied logits: x @ table.T


register_op("unembed", _unembed_shape, _unembed_lower, inputs=2)


# --------------------------------------------------------------------------- norms


def _norm_shape(attrs, x, w, b=None):
    _require(w.rank == 1 and _same_dim(w.shape[0], x.shape[-1]),
             f"norm weight {w} does not match the input's last dim {x.shape[-1]}")
    if b is not None:
        _require(b.shape == w.shape, f"norm bias {b} does not match weight {w}")
    return x


def _rms_norm_lower(ctx, x, w, *, eps: float, offset: float = 0.0):
    # computed in fp32, weight applied after casting back (transformers' LlamaRMSNorm): XLA's
    # fusions, or for a few rows on a GPU (decode) one Pallas kernel (runtime/kernels/rms_norm.py)
    from kiln.runtime.kernels import rms_norm as rn

    return rn.rms_norm(x, w, eps=eps, offset=offset, impl=norm_impl(ctx))


def norm_impl(ctx) -> str:
    """The RMSNorm kernel's impl for this lowering: XLA under tensor parallelism (a row's sum of
    squares over a sharded axis needs the partitioner's all-reduce), else "auto"."""
    return "xla" if getattr(ctx, "shard", None) is not None else "auto"


def _layer_norm_lower(ctx, x, w, b=None, *, eps: float):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * w.astype(jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype)


register_op("rms_norm", _norm_shape, _rms_norm_lower, inputs=2)
register_op("layer_norm", _norm_shape, _layer_norm_lower, inputs=(2, 3))


# --------------------------------------------------------------------------- elementwise


def _binary_shape(attrs, a, b):
    _require(a.shape == b.shape and a.dtype == b.dtype, f"operands differ: {a} vs {b}")
    return a


def _unary_shape(attrs, x):
    return x


register_op("add", _binary_shape, lambda ctx, a, b: a + b, inputs=2)
register_op("mul", _binary_shape, lambda ctx, a, b: a * b, inputs=2)
register_op("silu", _unary_shape, lambda ctx, x: jax.nn.silu(x), inputs=1)
register_op("gelu", _unary_shape, lambda ctx, x, approximate=True: jax.nn.gelu(x, approximate=approximate), inputs=1)
register_op("scale", _unary_shape, lambda ctx, x, factor: x * jnp.asarray(factor, x.dtype), inputs=1)
register_op("softcap", _unary_shape,
            lambda ctx, x, cap: (jnp.tanh(x.astype(jnp.float32) / cap) * cap).astype(x.dtype), inputs=1)


# --------------------------------------------------------------------------- shape ops


def _reshape_shape(attrs, x):
    shape = tuple(attrs["shape"])
    known_in = [d for d in x.shape if isinstance(d, int)]
    known_out = [d for d in shape if isinstance(d, int)]
    sym_in = [d for d in x.shape if isinstance(d, str)]
    sym_out = [d for d in shape if isinstance(d, str)]
    _require(sym_in == sym_out, f"reshape must keep symbolic dims {sym_in}, got {sym_out}")
    _require(len(sym_out) <= 1, f"reshape supports at most one symbolic dim, got {list(shape)}")
    _require(math.prod(known_in) == math.prod(known_out), f"cannot reshape {x} to {list(shape)}")
    axes = tuple(attrs.get("axes")) if attrs.get("axes") else None
    return TensorType(shape, x.dtype, axes)


def _reshape_lower(ctx, x, *, shape, axes=None):
    return jnp.reshape(x, [d if isinstance(d, int) else -1 for d in shape])


register_op("reshape", _reshape_shape, _reshape_lower, inputs=1)


def _take_shape(attrs, x, idx):
    _check_rank(idx, 1, "indices")
    _require(idx.dtype == "int32", f"indices must be int32, got {idx.dtype}")
    return TensorType((idx.shape[0],) + x.shape[1:], x.dtype, (None,) + (x.axes[1:] if x.axes else (None,) * (x.rank - 1)))


register_op("take", _take_shape, lambda ctx, x, idx: jnp.take(x, idx, axis=0), inputs=2)


# --------------------------------------------------------------------------- rope


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Static inverse frequencies [rotary_dim // 2] (fp32), with llama3/linear scaling folded in."""
    inv = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim))
    inv = inv.astype(np.float32)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        inv = inv / np.float32(scaling["factor"])
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind not in ("default", "dynamic"):
        raise ShapeError(f"unsupported rope scaling type {kind!r}")
    return inv


def _rope_shape(attrs, x, positions, seq_ids=None, context_lens=None):
    _check_rank(x, 3, "rope input [tokens, heads, head_dim]")
    _require(positions.rank == 1 and _same_dim(positions.shape[0], x.shape[0]),
             f"positions {positions} do not match tokens of {x}")
    rd = attrs.get("rotary_dim") or x.shape[2]
    _require(isinstance(x.shape[2], int) and rd <= x.shape[2] and rd % 2 == 0,
             f"rotary_dim {rd} does not fit head_dim {x.shape[2]}")
    if (attrs.get("scaling") or {}).get("rope_type") == "dynamic":
        _require(seq_ids is not None and context_lens is not None, "dynamic rope needs seq_ids and context_lens")
    return x


def _rope_lower(ctx, x, positions, seq_ids=None, context_lens=None, *, theta, rotary_dim=None, scaling=None,
                interleaved=False):
    """Rotary embedding (neox half-split by default; `interleaved` for GPT-J pairs).
    Angles in fp32, cos/sin cast to x's dtype before the rotation (as transformers does)."""
    d = x.shape[-1]
    rd = rotary_dim or d
    pos = positions.astype(jnp.float32)
    if (scaling or {}).get("rope_type") == "dynamic":
        # dynamic NTK: the base grows with the sequence's length once past the trained context
        orig = scaling.get("original_max_position_embeddings") or scaling["max_position_embeddings"]
        factor = scaling["factor"]
        seq_len = jnp.maximum(context_lens[seq_ids].astype(jnp.float32), orig)
        base = theta * ((factor * seq_len / orig) - (factor - 1)) ** (rd / (rd - 2))  # [T]
        expo = jnp.asarray(np.arange(0, rd, 2, dtype=np.float32) / rd)
        inv = 1.0 / (base[:, None] ** expo[None, :])  # [T, rd/2]
        freqs = pos[:, None] * inv
    else:
        inv = jnp.asarray(rope_inv_freq(rd, theta, scaling))
        freqs = pos[:, None] * inv[None, :]  # [T, rd/2]
    cos = jnp.cos(freqs).astype(x.dtype)[:, None, :]  # [T, 1, rd/2]
    sin = jnp.sin(freqs).astype(x.dtype)[:, None, :]
    xr, xp = x[..., :rd], x[..., rd:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xr.shape)
    else:
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([out, xp], axis=-1) if rd < d else out


register_op("rope", _rope_shape, _rope_lower, inputs=(2, 4))


# --------------------------------------------------------------------------- attention


def _attention_shape(attrs, q, k, v, positions, seq_ids, slot_mapping, block_tables, context_lens, query_start_loc):
    for t, what in ((q, "q"), (k, "k"), (v, "v")):
        _check_rank(t, 3, f"attention {what} [tokens, heads, head_dim]")
    _require(k.shape == v.shape, f"k {k} and v {v} differ")
    _require(_same_dim(q.shape[0], k.shape[0]), f"q {q} and k {k} have different token counts")
    _require(q.shape[2] == k.shape[2], f"q head_dim {q.shape[2]} != k head_dim {k.shape[2]}")
    _require(q.shape[1] % k.shape[1] == 0, f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    _require(isinstance(attrs.get("layer"), int), "attention needs an int `layer` attribute (its KV cache slot)")
    for t, what in ((positions, "positions"), (seq_ids, "seq_ids"), (slot_mapping, "slot_mapping")):
        _require(t.rank == 1 and t.dtype == "int32", f"{what} must be int32[T], got {t}")
    _require(block_tables.rank == 2, f"block_tables must be [S, B], got {block_tables}")
    return q


def _attention_lower(ctx, q, k, v, *meta, layer, **attrs):
    # q, k, v come first: under tensor parallelism each runs split on its heads axis (1)
    run = _attention_local if ctx.shard is None else ctx.shard.attention(_attention_local)
    if ctx.token_window is not None:
        *rest, context_lens, query_start_loc = meta
        meta = (*rest, *window_metadata(context_lens, query_start_loc, *ctx.token_window))
    out, ctx.kv_cache[layer] = run(ctx.attention_impl, ctx.kv_cache[layer], q, k, v, *meta, **attrs)
    return out


def window_metadata(context_lens, query_start_loc, start, size):
    """(context_lens, query_start_loc) of the tokens [start, start + size) of a flat batch alone.
    The kernels read a sequence's queries as query_start_loc[s]..[s + 1] and place them at the
    end of its context_lens[s] keys; in the window a sequence keeps only its tokens inside, and
    its keys end at the last of them (the keys of its later tokens are not written yet).
    Sequences with no token in the window get no keys either."""
    first, last = query_start_loc[:-1], query_start_loc[1:]
    after = jnp.maximum(last - jnp.maximum(first, start + size), 0)
    qsl = jnp.clip(query_start_loc - start, 0, size)
    return jnp.where(qsl[1:] > qsl[:-1], context_lens - after, 0), qsl


def _attention_local(impl, entry, q, k, v, positions, seq_ids, slot_mapping, block_tables, context_lens,
                     query_start_loc, *, scale, sliding_window=None, soft_cap=None):
    """One layer's KV write and attention read -> (out, new cache entry)."""
    from kiln.runtime.kernels import attention as attn

    scales = dict(k_scale=entry.get("k_scale"), v_scale=entry.get("v_scale"))  # FP8 pools carry them
    k_pool, v_pool = attn.write_kv(entry["k"], entry["v"], k, v, slot_mapping, **scales)
    out = attn.paged_attention(
        q, k_pool, v_pool, positions, seq_ids, block_tables, context_lens, query_start_loc,
        scale=scale, sliding_window=sliding_window, soft_cap=soft_cap, impl=impl, **scales)
    return out, {**entry, "k": k_pool, "v": v_pool}


register_op("attention", _attention_shape, _attention_lower, inputs=9)


from kiln.graph import ops_extra  # noqa: E402,F401  (moe, longrope, sigmoid_gate: the wider model families)
