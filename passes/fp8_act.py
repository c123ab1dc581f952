"""FP8 W8A8 in the shape the fast path wants: weights out-major, activations quantized by
the op that produces them.

Two passes, run after `quantize_fp8`:

    fp8_weight_nk   qlinear{fp8}(x, w[in, *out], s)      -> qlinear{fp8, w_layout=nk}(x, w'[*out, in], s)
                    cuBLASLt's FP8 GEMM takes both operands K-major (TN); a [K, N] weight made
                    XLA transpose every fp8 weight on every W8A8 step (128 transposes per
                    Llama-3-8B step on the H100). The transform moves the axis once, at build.
    fuse_fp8_act    qlinear{fp8}(rms_norm(x, w))              -> qlinear{fp8}(rms_norm_fp8(x, w))
                    qlinear{fp8}(part(add_rms_norm(x, r, w), 1)) -> qlinear{fp8}(add_rms_norm_fp8(x, r, w))
                    qlinear{fp8}(swiglu(gu))                  -> qlinear{fp8}(swiglu_fp8(gu))
                    (only where every reader of the activation is such a qlinear)

An fp8 activation value (`*_fp8` ops, typed f8e4m3) lowers to a `QAct` (e4m3 values and a
per-token fp32 scale [..., 1], computed from the fp32 result, never rounded to bf16 first)
when the step has at least the W8A8 token count of its readers; below it, to the plain
activation of the unfused op, bit for bit, and the reader runs W8A16 as before.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kiln.graph.ir import Graph, TensorType
from kiln.graph.ops import REGISTRY, register_op
from kiln.passes import ops as qops
from kiln.runtime.kernels import act_quant
from kiln.passes.rewrite import Any_, Match, Param_, Pat, RewriteResult, Rewriter, Rule, apply_rules, array_module


class QAct(NamedTuple):
    """A per-token quantized activation: value ~= q * scale."""
    q: Any       # f8e4m3 [..., K]
    scale: Any   # f32 [..., 1]

    @property
    def ndim(self):  # not an array: a sharding plan's per-node constraint leaves it to GSPMD
        return None


def w8a8_tokens(attr) -> int:
    """The W8A8 token count of a qlinear's `w8a8_min_tokens` attribute (None: the default)."""
    return qops.FP8_W8A8_MIN_TOKENS if attr is None else attr


def quantize_rows(y) -> QAct:
    """fp32 [..., K] -> QAct with one scale per row (absmax / 448)."""
    return QAct(*act_quant.quantize_rows(y))


def _act_impl(ctx) -> str:
    # runtime/kernels/act_quant.py's choice (on a GPU the kernel for SwiGLU from a raw W8A8 product,
    # XLA elsewhere; KILN_ACT_QUANT overrides); XLA under tensor parallelism, where a per-token
    # max over a sharded axis needs the partitioner's all-reduce
    return "xla" if getattr(ctx, "shard", None) is not None else "auto"


def _rows(x) -> int:
    return math.prod(x.shape[:-1])


def _skinny(rows: int, impl: str) -> str:
    """The skinny FP8 kernel's impl for `rows` tokens (runtime/kernels/fp8_skinny_mgpu.py):
    "xla" (not used) where the caller's `impl` is "xla" (tensor parallelism)."""
    from kiln.runtime.kernels import fp8_skinny_mgpu

    return fp8_skinny_mgpu.resolve("xla" if impl == "xla" else "auto", rows)


def runs_w8a8(rows: int, min_tokens, impl: str = "auto") -> bool:
    """Whether an fp8 matmul of `rows` tokens runs W8A8 (its producer then quantizes): at or above
    the W8A8 token count (cuBLASLt's FP8 GEMM), or up to a few tokens where the skinny FP8 kernel
    runs (on a GPU, `impl` not "xla"); W8A16 in between."""
    return rows >= w8a8_tokens(min_tokens) or _skinny(rows, impl) != "xla"


# --------------------------------------------------------------------------- producer ops


def _fp8_type(t: TensorType) -> TensorType:
    return t.with_(dtype="float8_e4m3fn")


def _rms_norm_fp8_lower(ctx, x, w, *, eps, offset=0.0, min_tokens=None):
    if not runs_w8a8(_rows(x), min_tokens, _act_impl(ctx)):
        return REGISTRY["rms_norm"].lower(ctx, x, w, eps=eps, offset=offset)
    return QAct(*act_quant.act_quant("rms_norm", x, w, eps=eps, offset=offset, impl=_act_impl(ctx)))


def _raw_product(ctx, y):
    """(unscaled GEMM output, token scales, channel scales) when `y` is a W8A8 product whose
    lowering left them in ctx.notes (passes/ops.py's qlinear), else None."""
    note = getattr(ctx, "notes", {}).get(id(y))
    return note[1:] if note is not None and note[0] is y else None


def fused_residual_sum(ctx, x, r, w, *, eps, offset=0.0):
    """For add_rms_norm(x, r, w) where x or r is a W8A8 product (o_proj, down) and the
    `add_rms_norm_scaled` kernel is selected: (the residual sum x + r, the fp8 activation of the
    normed sum) from that one kernel, else None. It reads the unscaled product and the residual
    once and writes both; XLA's path would form the sum in a fusion of its own and the norm's
    quantization in others. Made once per (x, r, w) and kept in ctx.notes: the sum's lowering
    (add_rms_norm) and the activation's (add_rms_norm_fp8) both ask."""
    impl = _act_impl(ctx)
    if act_quant.resolve_impl(impl, x.shape[-1], "add_rms_norm_scaled") == "xla":
        return None

    def make():
        for prod, other in ((r, x), (x, r)):  # the graph adds the block's output to the residual: r, usually
            raw = _raw_product(ctx, prod)
            if raw is not None:
                # the kernel scales the unscaled GEMM output itself, like swiglu_scaled (a bf16 sum is
                # the same either way round)
                q, s, total = act_quant.act_quant("add_rms_norm_scaled", raw[0], other, *raw[1:], w, eps=eps,
                                                  offset=offset, impl=impl, with_sum=True)
                return total, QAct(q, s)
        return None

    return qops.memo(ctx, ("add_rms_norm_scaled", eps, offset), (x, r, w), make)


def _add_rms_norm_fp8_lower(ctx, x, r, w, *, eps, offset=0.0, min_tokens=None):
    # the residual sum itself is read through part(add_rms_norm(..), 0)
    if not runs_w8a8(_rows(x), min_tokens, _act_impl(ctx)):
        from kiln.passes.ops import add_rms_norm_values

        return add_rms_norm_values(ctx, x, r, w, eps=eps, offset=offset)[1]
    fused = fused_residual_sum(ctx, x, r, w, eps=eps, offset=offset)
    if fused is not None:  # over a W8A8 product: the kernel that wrote the sum quantized this too
        return fused[1]
    # the kernel, where selected, forms x + r again from its inputs (one more read of r, no round
    # trip of the sum)
    return QAct(*act_quant.act_quant("add_rms_norm", x, r, w, eps=eps, offset=offset, impl=_act_impl(ctx)))


def _swiglu_fp8_lower(ctx, gu, *, min_tokens=None):
    if not runs_w8a8(_rows(gu[..., 0, :]), min_tokens, _act_impl(ctx)):
        return REGISTRY["swiglu"].lower(ctx, gu)
    raw = _raw_product(ctx, gu)
    if raw is not None:  # gu is a W8A8 product: read its unscaled GEMM output and scales instead
        # (the scaled gu is then dead): the kernel applies the scales itself, no pass over gu in
        # between (XLA's path computes the same values)
        return QAct(*act_quant.act_quant("swiglu_scaled", *raw, impl=_act_impl(ctx)))
    return QAct(*act_quant.act_quant("swiglu", gu, impl=_act_impl(ctx)))


register_op("rms_norm_fp8", lambda a, x, w: _fp8_type(REGISTRY["rms_norm"].shape(a, x, w)), _rms_norm_fp8_lower,
            inputs=2)
register_op("add_rms_norm_fp8", lambda a, x, r, w: REGISTRY["add_rms_norm"].shape(a, x, r, w) and _fp8_type(x),
            _add_rms_norm_fp8_lower, inputs=3)
register_op("swiglu_fp8", lambda a, gu: _fp8_type(REGISTRY["swiglu"].shape(a, gu)), _swiglu_fp8_lower, inputs=1)


# --------------------------------------------------------------------------- the matmul


def fp8_linear(x, w, scale, *extras, in_features: int, bias: bool, w_layout: str, out_dtype, w8a8_min_tokens,
               impl: str = "auto", act_impl: str = "auto", raw_out: dict | None = None):
    """qlinear{fp8} for an out-major weight [*out, in] or a quantized activation. `x` is a
    QAct (W8A8: one FP8 GEMM, both operands K-major, then the token and channel scales) or a
    plain activation (W8A16 below the W8A8 token count, through `quant_matmul`: XLA's
    convert-in-dot or the dequantizing kernel, chosen per token bucket by `impl` ("auto":
    the engine's autotune table, then the static rule); quantized here at or above it, by
    `act_impl` (runtime/kernels/act_quant.py)). With `raw_out` (a dict), a W8A8 product without
    bias also leaves there "raw": (the unscaled GEMM output [..., *out], the token scales
    [..., 1], the channel scales [*out]), for a reader that applies the scales itself."""
    n_out = math.prod(scale.shape)
    out = scale.shape
    dtype = jnp.dtype(out_dtype) if out_dtype else x.dtype
    nk = w_layout == "nk"
    w2 = w.reshape(n_out, in_features) if nk else w.reshape(in_features, n_out)
    if not isinstance(x, QAct) and runs_w8a8(_rows(x), w8a8_min_tokens, impl):
        x = QAct(*act_quant.act_quant("rows", x, impl=act_impl))  # an input no producer quantized
    skinny = "xla"
    if isinstance(x, QAct):
        from kiln.runtime.kernels import fp8_skinny_mgpu as fs

        lead = x.q.shape[:-1]
        xq, sa = x.q.reshape(-1, in_features), x.scale.reshape(-1, 1)
        skinny = _skinny(xq.shape[0], impl)
        if skinny != "xla" and not (nk and fs.choose(xq.shape[0], in_features, n_out) is not None):
            skinny = "xla"  # a shape the kernel does not tile (or [K, N] weights): cuBLASLt
    if skinny != "xla":
        raw: dict = {}
        y = fs.fp8_skinny_matmul(xq, sa, w2, scale.reshape(n_out), out_dtype=dtype, interpret=skinny == "interpret",
                                 raw_out=raw)
        if raw_out is not None and not bias:
            # rounded to the output dtype as cuBLASLt's raw product is (swiglu_scaled's contract)
            raw_out["raw"] = (raw["raw"].astype(dtype).reshape(lead + out), sa.reshape(lead + (1,)), scale)
    elif isinstance(x, QAct):
        # "dequantize then matmul" with unit scales: XLA's GEMM rewriter makes it one
        # __cublas$lt$matmul$f8 call (fp32 accumulation, bf16 out)
        dims = (((1,), (1,)), ((), ())) if nk else (((1,), (0,)), ((), ()))
        raw = jax.lax.dot_general(xq.astype(dtype), w2.astype(dtype), dims)
        y = (raw.astype(jnp.float32) * sa * scale.reshape(1, n_out).astype(jnp.float32)).astype(dtype)
        if raw_out is not None and not bias:
            raw_out["raw"] = (raw.reshape(lead + out), sa.reshape(lead + (1,)), scale)
    else:
        from kiln.runtime.kernels.quant_matmul import quant_matmul

        lead = x.shape[:-1]
        y = quant_matmul(x.reshape(-1, in_features), w2, scale.reshape(n_out), mode="fp8", impl=impl,
                         w_layout=w_layout)
    y = y.reshape(lead + out)
    if bias:
        y = y + extras[0].astype(y.dtype)
    return y


# --------------------------------------------------------------------------- the passes


def _is_fp8(n) -> bool:
    return n.attrs.get("mode") == "fp8" and not n.attrs.get("smooth")


def _relayout(rw: Rewriter, m: Match):
    lin = m.node("lin")
    if lin.attrs.get("w_layout", "kn") != "kn" or not rw.single_use(m.w):
        return False
    wt = rw.type_of(m.w)
    rw.retype_param(m.w, wt.shape[1:] + wt.shape[:1], wt.dtype, (wt.axes[1:] + wt.axes[:1]) if wt.axes else None)

    def fn(w):
        return (array_module(w).moveaxis(w, 0, -1),)
    rw.weights([m.w], [m.w], fn)
    new = rw.node("qlinear", *lin.inputs, name=lin.name, **{**lin.attrs, "w_layout": "nk"})
    rw.replace(lin.name, new)


FP8_WEIGHT_NK = [
    # qlinear{fp8}(x, w[in, *out], s, ..) -> qlinear{fp8, w_layout=nk}(x, w[*out, in], s, ..)
    Rule("fp8_weight_nk", Pat("qlinear", Any_("x"), Param_("w"), rest="rest", name="lin", where=_is_fp8), _relayout),
]


def _readers(g: Graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in g.nodes:
        for i, v in enumerate(n.inputs):
            out.setdefault(v, []).append((n, i))
    return out


def _fuse_rules(g: Graph) -> list[Rule]:
    readers = _readers(g)
    only_fp8 = {v for v, rs in readers.items() if v not in g.outputs and all(
        n.op == "qlinear" and i == 0 and _is_fp8(n) for n, i in rs)}
    made: dict[tuple[int, str], str] = {}  # (rewriter, activation) -> its fp8 node, shared by readers

    def rewrite(op: str, act_key: str, inputs: tuple, attrs: dict):
        def fn(rw: Rewriter, m: Match):
            act = m[act_key]
            if act not in only_fp8:
                return False
            lin = m.node("lin")
            key = (id(rw), act)
            if key not in made:
                made[key] = rw.node(op, *[m[i] for i in inputs], name=act + ".fp8",
                                    **{**attrs(m), "min_tokens": lin.attrs.get("w8a8_min_tokens")})
            new = rw.node("qlinear", made[key], *lin.inputs[1:], name=lin.name,
                          **{**lin.attrs, "out_dtype": rw.type_of(act).dtype})
            rw.replace(lin.name, new)
        return fn

    def norm_attrs(key):
        return lambda m: {k: v for k, v in m.node(key).attrs.items() if k in ("eps", "offset")}

    lin = dict(rest="rest", name="lin", where=lambda n: _is_fp8(n) and "out_dtype" not in n.attrs)
    return [
        # qlinear{fp8}(rms_norm(x, w)) -> qlinear{fp8}(rms_norm_fp8(x, w))
        Rule("fuse_fp8_rms_norm", Pat("qlinear", Pat("rms_norm", Any_("x"), Any_("nw"), name="act"), **lin),
             rewrite("rms_norm_fp8", "act", ("x", "nw"), norm_attrs("act"))),
        # qlinear{fp8}(part(add_rms_norm(x, r, w), 1)) -> qlinear{fp8}(add_rms_norm_fp8(x, r, w))
        Rule("fuse_fp8_add_rms_norm", Pat("qlinear", Pat("part", Pat("add_rms_norm", Any_("x"), Any_("r"), Any_("nw"),
                                                                 name="arn"),
                                                         name="act", where=lambda n: n.attrs.get("index") == 1), **lin),
             rewrite("add_rms_norm_fp8", "act", ("x", "r", "nw"), norm_attrs("arn"))),
        # qlinear{fp8}(swiglu(gu)) -> qlinear{fp8}(swiglu_fp8(gu))
        Rule("fuse_fp8_swiglu", Pat("qlinear", Pat("swiglu", Any_("gu"), name="act"), **lin),
             rewrite("swiglu_fp8", "act", ("gu",), lambda m: {})),
    ]


def relayout_fp8_weights(graph: Graph) -> RewriteResult:
    return apply_rules(graph, FP8_WEIGHT_NK, max_sweeps=1)


def fuse_fp8_activations(graph: Graph) -> RewriteResult:
    return apply_rules(graph, _fuse_rules(graph), max_sweeps=1)


def fp8_passes(weight_nk: bool = True) -> list:
    from kiln.passes.pipeline import Pass

    nk = [Pass("fp8_weight_nk", lambda g, ctx: relayout_fp8_weights(g))] if weight_nk else []
    return nk + [Pass("fuse_fp8_act", lambda g, ctx: fuse_fp8_activations(g))]
