"""Ops that only passes create: fused forms and quantized matmuls.

    swiglu(gu[..., 2, M])                      -> silu(gu[..., 0, :]) * gu[..., 1, :]
    geglu(gu[..., 2, M])                       -> gelu(gu[..., 0, :]) * gu[..., 1, :]   (Gemma)
    add_rms_norm(x, r, w)                      -> [2, T, E]: (x + r, rms_norm(x + r, w))
    part(y[2, ...], index)                     -> y[index]
    qkv_attention(qkv[T, KVH, G+2, D], ctx..[, seq_lens][, q_norm_w, k_norm_w])
                                               -> q, k, v split from qkv, QK-norm (per head, over D:
                                                  `qk_norm` = the rms_norm attrs), rope(q), rope(k),
                                                  then attention
    rope_attention(q, k, v, ctx..[, seq_lens]) -> attention(rope(q), rope(k), v)
    qlinear(x, w_q, scale[, min][, bias][, smooth]) -> x @ dequant(w_q, scale[, min]) (+ bias); min: int4 only

In the attention forms, ctx.. = the six attention inputs (positions, seq_ids, slot_mapping,
block_tables, context_lens, query_start_loc); `rope` = the rope op's attrs, with
`rope["op"] == "longrope"` for LongRoPE, which reads the trailing `seq_lens`.

Registered into the one op registry on import (kiln.graph imports this module, so any graph
that is verified or lowered knows them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kiln.graph.ir import TensorType
from kiln.graph.ops import REGISTRY, ShapeError, register_op
from kiln.runtime.kernels.act_quant import quantize_rows
from kiln.runtime.kernels.attention import FP8_MAX  # noqa: F401 (largest finite float8_e4m3fn; re-exported)
from kiln.runtime.kernels.quant_matmul import quant_matmul, unpack_int4  # noqa: F401 (re-exported)

QUANT_MODES = ("fp8", "int8_wo", "int4_wo")


def _require(cond, msg):
    if not cond:
        raise ShapeError(msg)


# --------------------------------------------------------------------------- swiglu


def _swiglu_shape(attrs, gu):
    _require(gu.rank >= 2 and gu.shape[-2] == 2, f"swiglu input must be [..., 2, mlp], got {gu}")
    axes = (gu.axes[:-2] + gu.axes[-1:]) if gu.axes else None
    return TensorType(gu.shape[:-2] + gu.shape[-1:], gu.dtype, axes)


def _swiglu_lower(ctx, gu):
    return jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :]


def _geglu_lower(ctx, gu, approximate=True):
    return jax.nn.gelu(gu[..., 0, :], approximate=approximate) * gu[..., 1, :]


register_op("swiglu", _swiglu_shape, _swiglu_lower, inputs=1)
register_op("geglu", _swiglu_shape, _geglu_lower, inputs=1)


# --------------------------------------------------------------------------- add + rms_norm


def _add_rms_norm_shape(attrs, x, r, w):
    _require(x.shape == r.shape and x.dtype == r.dtype, f"residual operands differ: {x} vs {r}")
    _require(w.rank == 1 and w.shape[0] == x.shape[-1], f"norm weight {w} does not match {x}")
    return TensorType((2,) + x.shape, x.dtype, (None,) + (x.axes or (None,) * x.rank))


def _add_rms_norm_lower(ctx, x, r, w, *, eps, offset=0.0):
    """One pass over the hidden state: the sum is formed once and normed from registers
    (XLA fuses the add, the fp32 reduction and the scaling into one loop fusion)."""
    s, normed = add_rms_norm_values(ctx, x, r, w, eps=eps, offset=offset)
    return jnp.stack([s, normed])


def add_rms_norm_values(ctx, x, r, w, *, eps, offset=0.0):
    """(x + r, rms_norm(x + r)): XLA's fusions, or for a few rows on a GPU one Pallas kernel
    (runtime/kernels/rms_norm.py) whose result is shared by every lowering of the same inputs
    (add_rms_norm and, at W8A16, add_rms_norm_fp8 read the same sum)."""
    from kiln.graph.ops import norm_impl
    from kiln.runtime.kernels import rms_norm as rn

    from kiln.passes.fp8_act import fused_residual_sum

    def make():
        fused = fused_residual_sum(ctx, x, r, w, eps=eps, offset=offset)
        if fused is not None:  # W8A8 model: the sum from the kernel that also quantizes the norm; the
            # norm here is XLA's, dead unless something else reads it
            return fused[0], rn.rms_norm(fused[0], w, eps=eps, offset=offset, impl="xla")
        return rn.rms_norm(x, w, r, eps=eps, offset=offset, impl=norm_impl(ctx))

    return memo(ctx, ("add_rms_norm", eps, offset), (x, r, w), make)


def memo(ctx, key: tuple, arrays: tuple, make):
    """`make()` once per lowering for these very arrays, kept in `ctx.notes` (several ops'
    lowerings read one result): keyed by the arrays' ids, the entry holds the arrays themselves
    and a hit must be them, so a recycled id never matches. Without notes, `make()` each time."""
    notes = getattr(ctx, "notes", None)
    if notes is None:
        return make()
    full = key + tuple(id(a) for a in arrays)
    hit = notes.get(full)
    if hit is not None and all(a is b for a, b in zip(hit[0], arrays)):
        return hit[1]
    res = make()
    notes[full] = (arrays, res)
    return res


def _part_shape(attrs, y):
    _require(y.rank >= 1 and isinstance(y.shape[0], int) and 0 <= attrs["index"] < y.shape[0],
             f"part index {attrs.get('index')} out of range for {y}")
    return TensorType(y.shape[1:], y.dtype, y.axes[1:] if y.axes else None)


register_op("add_rms_norm", _add_rms_norm_shape, _add_rms_norm_lower, inputs=3)
register_op("part", _part_shape, lambda ctx, y, index: y[index], inputs=1)


# --------------------------------------------------------------------------- attention with RoPE and QKV


NUM_ATTENTION_CTX = 6  # positions, seq_ids, slot_mapping, block_tables, context_lens, query_start_loc


def _longrope(rope) -> bool:
    return (rope or {}).get("op") == "longrope"


def _call_attention(ctx, q, k, v, pos, seq_ids, slots, tables, ctx_lens, qsl, *seq_lens, rope, attrs):
    if _longrope(rope):
        r = {k_: v_ for k_, v_ in rope.items() if k_ != "op"}
        q, k = (REGISTRY["longrope"].lower(ctx, x, pos, seq_ids, seq_lens[0], **r) for x in (q, k))
    elif rope is not None:
        q, k = (REGISTRY["rope"].lower(ctx, x, pos, seq_ids, ctx_lens, **rope) for x in (q, k))
    return REGISTRY["attention"].lower(ctx, q, k, v, pos, seq_ids, slots, tables, ctx_lens, qsl, **attrs)


def _rope_attention_shape(attrs, q, k, v, *rest):
    n = NUM_ATTENTION_CTX + _longrope(attrs.get("rope"))
    _require(len(rest) == n, f"expected {n} attention inputs after q, k, v (seq_lens last for LongRoPE), got {len(rest)}")
    return REGISTRY["attention"].shape({k_: v_ for k_, v_ in attrs.items() if k_ != "rope"}, q, k, v,
                                       *rest[:NUM_ATTENTION_CTX])


def _rope_attention_lower(ctx, q, k, v, *rest, rope=None, **attrs):
    return _call_attention(ctx, q, k, v, *rest, rope=rope, attrs=attrs)


def _split_qkv(qkv):
    t, kvh, g2, d = qkv.shape
    q = qkv[:, :, : g2 - 2, :].reshape(t, kvh * (g2 - 2), d)  # q head h = kv_head * G + g
    return q, qkv[:, :, g2 - 2, :], qkv[:, :, g2 - 1, :]


def _qkv_attention_shape(attrs, qkv, *rest):
    _require(qkv.rank == 4 and isinstance(qkv.shape[2], int) and qkv.shape[2] >= 3,
             f"qkv must be [tokens, kv_heads, group + 2, head_dim], got {qkv}")
    t, kvh, g2, d = qkv.shape
    n = NUM_ATTENTION_CTX + _longrope(attrs.get("rope"))
    rest, norms = rest[:n], rest[n:]
    _require(len(norms) == (2 if attrs.get("qk_norm") is not None else 0),
             f"qkv_attention takes q and k norm weights exactly when `qk_norm` is set, got {len(norms)}")
    for w in norms:
        _require(w.shape == (d,), f"QK-norm weight {w} must be [{d}] (head_dim)")
    q = TensorType((t, kvh * (g2 - 2), d), qkv.dtype, (None, "heads", None))
    kv = TensorType((t, kvh, d), qkv.dtype, (None, "kv_heads", None))
    attrs = {k_: v_ for k_, v_ in attrs.items() if k_ != "qk_norm"}
    return _rope_attention_shape(attrs, q, kv, kv, *rest)


def _qkv_attention_lower(ctx, qkv, *rest, rope=None, qk_norm=None, **attrs):
    q, k, v = _split_qkv(qkv)
    n = NUM_ATTENTION_CTX + _longrope(rope)
    rest, norms = rest[:n], rest[n:]
    if qk_norm is not None:  # Qwen3 / Gemma3: RMSNorm of each q and k head before the rotary
        norm = REGISTRY["rms_norm"].lower
        q, k = norm(ctx, q, norms[0], **qk_norm), norm(ctx, k, norms[1], **qk_norm)
    return _call_attention(ctx, q, k, v, *rest, rope=rope, attrs=attrs)


register_op("rope_attention", _rope_attention_shape, _rope_attention_lower, inputs=(9, 10))
register_op("qkv_attention", _qkv_attention_shape, _qkv_attention_lower, inputs=(7, 10))


# --------------------------------------------------------------------------- quantized matmul


def _qlinear_shape(attrs, x, w, scale, *extras):
    mode = attrs.get("mode")
    _require(mode in QUANT_MODES, f"qlinear mode must be one of {QUANT_MODES}, got {mode!r}")
    n_in = attrs["in_features"]
    _require(x.shape[-1] == n_in, f"input's last dim {x.shape[-1]} does not match in_features {n_in}")
    nk = attrs.get("w_layout", "kn") == "nk"  # fp8 only: weight [*out, in] (passes/fp8_act.py)
    out = w.shape[:-1] if nk else w.shape[1:]
    if mode == "fp8":
        _require(w.dtype == "float8_e4m3fn" and w.shape[-1 if nk else 0] == n_in,
                 f"fp8 weight must be f8e4m3[{'..., ' if nk else ''}{n_in}{'' if nk else ', ...'}], got {w}")
        _require(scale.shape == out, f"fp8 scale {scale} must match the weight's output dims {out}")
    elif mode == "int8_wo":
        _require(w.dtype == "int8" and w.shape[0] == n_in, f"int8 weight must be i8[{n_in}, ...], got {w}")
        _require(scale.shape == out, f"int8 scale {scale} must match the weight's output dims {out}")
    else:
        g = attrs["group_size"]
        _require(w.dtype == "uint8" and 2 * w.shape[0] == n_in, f"int4 weight must be u8[{n_in // 2}, ...] (packed), got {w}")
        _require(n_in % g == 0 and scale.shape == (n_in // g,) + out,
                 f"int4 scale {scale} must be [{n_in} / group {g}, *{out}]")
        _require(len(extras) >= 1 and extras[0].shape == scale.shape, f"int4 needs a min of the scale's shape {scale}")
        extras = extras[1:]
    has_bias, has_smooth = attrs.get("bias", False), attrs.get("smooth", False)
    _require(len(extras) == has_bias + has_smooth, f"qlinear expects bias={has_bias}, smooth={has_smooth} inputs")
    if has_bias:
        _require(extras[0].shape == out, f"bias {extras[0]} does not match the output dims {out}")
    if has_smooth:
        _require(extras[-1].shape == (n_in,), f"smoothing vector {extras[-1]} must be [{n_in}]")
    w_axes = (w.axes[:-1] if nk else w.axes[1:]) if w.axes else (None,) * len(out)
    axes = (x.axes[:-1] if x.axes else (None,) * (x.rank - 1)) + w_axes
    return TensorType(x.shape[:-1] + out, attrs.get("out_dtype") or x.dtype, axes)  # out_dtype: x is fp8


# Below this many tokens an fp8 matmul runs as W8A16 (the weight converted inside the dot, no
# activation rounding): on the H100 the FP8 GEMM plus the per-token activation quantization
# ran at 0.6 TB/s at M = 1-64 against 1.6 TB/s for the converted weight (BENCHMARKS.md).
FP8_W8A8_MIN_TOKENS = 256


def _qlinear_lower(ctx, x, w, scale, *extras, mode, in_features, group_size=None, bias=False, smooth=False,
                   w8a8_min_tokens=None, w_layout="kn", out_dtype=None):
    # weight-only matmuls: XLA's convert-in-dot or the fused dequantizing kernel
    # (runtime/kernels/quant_matmul.py; not under tensor parallelism)
    qimpl = "xla" if getattr(ctx, "shard", None) is not None else "auto"
    if mode == "fp8" and (w_layout == "nk" or out_dtype is not None):  # passes/fp8_act.py's forms
        from kiln.passes.fp8_act import fp8_linear

        raw: dict = {}
        y = fp8_linear(x, w, scale, *extras, in_features=in_features, bias=bias, w_layout=w_layout,
                       out_dtype=out_dtype, w8a8_min_tokens=w8a8_min_tokens, impl=qimpl, act_impl=qimpl, raw_out=raw)
        if "raw" in raw and hasattr(ctx, "notes"):  # the unscaled product, for a reader that scales it itself
            ctx.notes[id(y)] = (y, *raw["raw"])
        return y
    if mode == "int4_wo":
        minimum, extras = extras[0], extras[1:]
    if smooth:
        x = x * extras[-1].astype(x.dtype)  # AWQ: x / s, the s folded into the weight
    out = w.shape[1:]
    n_out = math.prod(out)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    min_tokens = FP8_W8A8_MIN_TOKENS if w8a8_min_tokens is None else w8a8_min_tokens
    if mode != "fp8" or x2.shape[0] < min_tokens:
        y = quant_matmul(x2, w.reshape(-1, n_out), scale.reshape(-1, n_out),
                         minimum.reshape(-1, n_out) if mode == "int4_wo" else None,
                         mode=mode, group_size=group_size, impl=qimpl)
    else:
        # W8A8: dynamic per-token activation scale, per-channel weight scale. Written as
        # "dequantize then matmul" so XLA's GEMM rewriter emits one FP8 cuBLASLt call on Hopper;
        # the two scale vectors are applied to the product.
        xq, sa = quantize_rows(x2.astype(jnp.float32))  # [M, K] e4m3, [M, 1]
        y = jnp.matmul(xq.astype(x.dtype), w.reshape(in_features, n_out).astype(x.dtype))
        y = (y.astype(jnp.float32) * sa * scale.reshape(1, n_out).astype(jnp.float32)).astype(x.dtype)
    y = y.reshape(lead + out)
    if bias:
        y = y + extras[0].astype(y.dtype)
    return y


register_op("qlinear", _qlinear_shape, _qlinear_lower, inputs=(3, 6))

MATMUL_OPS = ("linear", "qlinear")

from kiln.passes import fp8_act  # noqa: E402,F401  (rms_norm_fp8, add_rms_norm_fp8, swiglu_fp8)
