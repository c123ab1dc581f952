"""FP8 activation quantization fused into the op that produces the activation: one Pallas
kernel (Triton backend on the GPU, `interpret=True` on the CPU) beside its plain-JAX reference.

    kind           inputs                      the fp32 value y[M, K] that is quantized
    rows           x [M, K]                    x
    rms_norm       x [M, K], w [K]             x * rsqrt(mean(x^2) + eps) * (offset + w)
    add_rms_norm   x, r [M, K], w [K]          rms_norm(x + r)   (the sum rounded to x's dtype first)
    add_rms_norm_scaled  raw, r [M, K],        add_rms_norm(x, r), x = (raw * sa * ws) rounded to raw's
                   sa [M, 1], ws [K], w [K]    dtype: o_proj's or down's W8A8 product before its scales
    swiglu         gu [M, 2, F]                silu(gu[:, 0]) * gu[:, 1]
    swiglu_scaled  g [M, 2, F], sa [M, 1],     swiglu(gu), gu = (g * sa * ws) rounded to g's dtype:
                   ws [2, F]                   the raw output of a W8A8 GEMM and its two scales

    -> q f8e4m3 [M, K] = y / s,   s f32 [M, 1] = max(max|y|, 1e-12) / 448   (one scale per token)
    the add kinds with `with_sum=True` also return the residual sum x + r (in x's dtype), so the
    residual stream's next reader needs no pass of its own over the two addends

Why a kernel: XLA lowers each quantization as separate fusions (the norm or SwiGLU, a row
max, a divide-and-convert), and with 4 quantized activations per layer the Llama-3-8B fp8
step spent 2.1 ms of a 14.9 ms decode step and 7.0 ms of a 36.7 ms 2048-token step in them
(BENCHMARKS.md, session 4). Here each program owns `block_rows` rows: it loads them once, in
power-of-two chunks of K (Triton's tensors are powers of two; SwiGLU's 14336 = 7 x 2048),
keeps the chunks in registers for the sum of squares, the row max and the quantized store,
and writes one byte per element plus the scale: one read of the input, nothing in between.

Implementations (`impl`): "xla" (the reference), "pallas", "interpret" (CPU tests) and "auto":
the kernel on a GPU for `swiglu_scaled` and `add_rms_norm_scaled` (the latter writing the
residual sum as well), XLA for the other kinds (`KILN_ACT_QUANT=pallas` selects the kernel for
all; `KILN_ACT_QUANT_KINDS=swiglu_scaled,add_rms_norm_scaled,rows` for those). Measured in the
8B fp8 step (BENCHMARKS.md, session 10): `add_rms_norm_scaled` with the sum 1.4% faster at 4096
tokens and 1.7% at 512; `rows` (o_proj's input) no faster than XLA.
Measured on the H100 (BENCHMARKS.md, session 5): alone the kernel is 1.2-1.9x faster than
XLA's lowering of the same op, but fed the scaled GEMM output inside the fp8 step it made the
step slower (decode 11.08 -> 11.23 ms of kernels, 2048-token step 32.8 -> 34.2 ms): XLA had
fused the W8A8 GEMM's scaling epilogue (and the residual add) into its own quantization fusions, and a custom call as the consumer makes XLA write the scaled output out
first (an extra pass over [M, 28672] per layer). `swiglu_scaled` takes the raw GEMM output and
the two scale vectors itself, so nothing is written in between; `add_rms_norm_scaled` does the
same for the norms after o_proj and down (XLA's path takes three passes over the product and
the residual there: the sum, the per-token scale, the quantization).
Under tensor parallelism the callers keep XLA: a per-token max over a sharded axis needs the
partitioner's all-reduce, which a custom call does not get.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

from kiln.runtime.kernels import requested_impl
from kiln.runtime.kernels.attention import FP8_MAX

KINDS = ("rows", "rms_norm", "add_rms_norm", "add_rms_norm_scaled", "swiglu", "swiglu_scaled")
# inputs with one row per token, first; the rest are per-channel vectors [K] (or [2, K])
ROWED = {"rows": 1, "rms_norm": 1, "add_rms_norm": 2, "add_rms_norm_scaled": 3, "swiglu": 1, "swiglu_scaled": 2}
# the kinds "auto" runs as the kernel on a GPU (KILN_ACT_QUANT_KINDS, a comma list, replaces them;
# the other kinds are built and tested, but measured not to pay, or not measured)
AUTO_KINDS = ("swiglu_scaled", "add_rms_norm_scaled")
IMPLS = ("auto", "xla", "pallas", "interpret")
MAX_CHUNK = 4096       # elements of K per load
MAX_CHUNKS = 32        # chunks a row may take (all held in registers); wider rows stay on XLA


@dataclasses.dataclass(frozen=True)
class ActQuantConfig:
    block_rows: int = 1
    num_warps: int = 4
    num_stages: int = 1


def _default_config(k: int) -> ActQuantConfig:
    return ActQuantConfig(block_rows=1, num_warps=4 if k <= 4096 else 8)


# --------------------------------------------------------------------------- reference


def residual_sum(kind: str, xs):
    """x + r of the add kinds, in x's dtype (add_rms_norm_scaled: x is the scaled W8A8 product)."""
    if kind == "add_rms_norm_scaled":
        raw, r, sa, ws, _ = xs
        return ((raw.astype(jnp.float32) * sa) * ws.astype(jnp.float32)).astype(raw.dtype) + r
    if kind == "add_rms_norm":
        return xs[0] + xs[1]
    raise ValueError(f"{kind} has no residual sum; only add_rms_norm and add_rms_norm_scaled")


def _value(kind: str, xs, *, eps: float, offset: float):
    """The fp32 value to quantize, [..., K], from the op's inputs (the XLA path's order of operations)."""
    if kind == "rows":
        return xs[0].astype(jnp.float32)
    if kind == "swiglu_scaled":  # the W8A8 GEMM's epilogue as fp8_linear writes it, then the SwiGLU
        g, sa, ws = xs
        xs = (((g.astype(jnp.float32) * sa[..., None]) * ws.astype(jnp.float32)).astype(g.dtype),)
        kind = "swiglu"
    if kind == "swiglu":
        gu = xs[0]
        return jax.nn.silu(gu[..., 0, :].astype(jnp.float32)) * gu[..., 1, :].astype(jnp.float32)
    x = residual_sum(kind, xs) if kind.startswith("add_rms_norm") else xs[0]
    w = xs[-1]
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return xf * (offset + w.astype(jnp.float32))


def quantize_rows(y):
    """fp32 [..., K] -> (f8e4m3 [..., K], f32 scale [..., 1]): one scale per row (absmax / 448)."""
    s = jnp.maximum(jnp.max(jnp.abs(y), axis=-1, keepdims=True), 1e-12) / FP8_MAX
    return (y / s).astype(jnp.float8_e4m3fn), s


def act_quant_reference(kind: str, *xs, eps: float = 0.0, offset: float = 0.0, with_sum: bool = False):
    q = quantize_rows(_value(kind, xs, eps=eps, offset=offset))
    return q + (residual_sum(kind, xs),) if with_sum else q


# --------------------------------------------------------------------------- the kernel


def _chunking(k: int) -> tuple[int, int] | None:
    """(chunk, chunks): the largest power of two dividing K, at most MAX_CHUNK; None when K
    would need more than MAX_CHUNKS chunks or chunks under 64 elements."""
    chunk = min(k & -k, MAX_CHUNK)
    n = k // chunk
    return (chunk, n) if chunk >= 64 and n <= MAX_CHUNKS else None


def _kernel(*refs, kind: str, chunk: int, chunks: int, k: int, eps: float, offset: float, with_sum: bool = False):
    from jax.experimental import pallas as pl

    *ins, q_ref, s_ref, sum_ref = refs if with_sum else refs + (None,)

    def load(c):
        sl = pl.ds(c * chunk, chunk)
        if kind == "swiglu_scaled":  # ins: gate, up (raw GEMM output), sa [rows, 1], ws gate, ws up
            dt = ins[0].dtype
            sa = ins[2][...]
            g = ((ins[0][:, sl].astype(jnp.float32) * sa) * ins[3][:, sl]).astype(dt).astype(jnp.float32)
            u = ((ins[1][:, sl].astype(jnp.float32) * sa) * ins[4][:, sl]).astype(dt).astype(jnp.float32)
            return g * jax.nn.sigmoid(g) * u
        if kind == "swiglu":
            g, u = ins[0][:, sl].astype(jnp.float32), ins[1][:, sl].astype(jnp.float32)
            return g * jax.nn.sigmoid(g) * u
        x = ins[0][:, sl]
        if kind == "add_rms_norm_scaled":  # ins: raw GEMM output, r, sa [rows, 1], ws [1, K], w
            x = ((x.astype(jnp.float32) * ins[2][...]) * ins[3][:, sl]).astype(ins[0].dtype)
        if kind.startswith("add_rms_norm"):
            x = x + ins[1][:, sl]          # in x's dtype, as the unfused graph forms the sum
        return x.astype(jnp.float32)

    vals = [load(c) for c in range(chunks)]                                 # [rows, chunk] each
    if with_sum:  # the sum was formed in x's dtype: its fp32 value converts back exactly
        for c, v in enumerate(vals):
            sum_ref[:, pl.ds(c * chunk, chunk)] = v.astype(sum_ref.dtype)
    if "norm" in kind:
        ssq = sum(jnp.sum(v * v, axis=1, keepdims=True) for v in vals)      # [rows, 1]
        rstd = jax.lax.rsqrt(ssq / k + eps)
        w_ref = ins[-1]
        vals = [v * rstd * (offset + w_ref[:, pl.ds(c * chunk, chunk)].astype(jnp.float32))
                for c, v in enumerate(vals)]
    amax = jnp.zeros((vals[0].shape[0], 1), jnp.float32)
    for v in vals:
        amax = jnp.maximum(amax, jnp.max(jnp.abs(v), axis=1, keepdims=True))
    s = jnp.maximum(amax, 1e-12) / FP8_MAX
    for c, v in enumerate(vals):
        q_ref[:, pl.ds(c * chunk, chunk)] = (v / s).astype(q_ref.dtype)
    s_ref[...] = s


def act_quant_pallas(kind: str, *xs, eps: float = 0.0, offset: float = 0.0, config: ActQuantConfig | None = None,
                     interpret: bool = False, with_sum: bool = False):
    """The kernel over 2-D inputs: x [M, K] (and r, w [K]) or gu [M, 2, F] -> (q [M, K], s [M, 1])
    (and the residual sum [M, K] with `with_sum`)."""
    from jax.experimental import pallas as pl

    from kiln.runtime.kernels.quant_matmul import _compiler_params

    m, k = xs[0].shape[0], xs[0].shape[-1]
    chunk, chunks = _chunking(k)
    cfg = config or _default_config(k)
    br = cfg.block_rows
    mp = -(-m // br) * br
    acts = [jnp.pad(x, [(0, mp - m)] + [(0, 0)] * (x.ndim - 1)) if mp > m else x for x in xs[:ROWED[kind]]]
    row = pl.BlockSpec((br, k), lambda i: (i, 0))
    if kind in ("swiglu", "swiglu_scaled"):  # the gate and up halves as two row blocks of the one array
        args = (acts[0], acts[0])
        in_specs = [pl.BlockSpec((br, None, k), lambda i: (i, 0, 0)), pl.BlockSpec((br, None, k), lambda i: (i, 1, 0))]
        if kind == "swiglu_scaled":
            ws = xs[2].astype(jnp.float32).reshape(2, 1, k)
            args += (acts[1].astype(jnp.float32), ws, ws)
            in_specs += [pl.BlockSpec((br, 1), lambda i: (i, 0)), pl.BlockSpec((None, 1, k), lambda i: (0, 0, 0)),
                         pl.BlockSpec((None, 1, k), lambda i: (1, 0, 0))]
    elif kind == "add_rms_norm_scaled":  # raw, r, sa [M, 1], ws [K], w [K]
        args = (acts[0], acts[1], acts[2].astype(jnp.float32), xs[3].astype(jnp.float32).reshape(1, k),
                xs[4].reshape(1, k))
        vec = pl.BlockSpec((1, k), lambda i: (0, 0))
        in_specs = [row, row, pl.BlockSpec((br, 1), lambda i: (i, 0)), vec, vec]
    else:
        norm = kind.endswith("norm")
        args = tuple(acts) + ((xs[-1].reshape(1, k),) if norm else ())
        in_specs = [row] * len(acts) + ([pl.BlockSpec((1, k), lambda i: (0, 0))] if norm else [])
    if with_sum and not kind.startswith("add_rms_norm"):
        raise ValueError(f"{kind} has no residual sum; only add_rms_norm and add_rms_norm_scaled")
    kernel = lambda *refs: _kernel(*refs, kind=kind, chunk=chunk, chunks=chunks, k=k, eps=eps, offset=offset,
                                   with_sum=with_sum)
    out_specs = [row, pl.BlockSpec((br, 1), lambda i: (i, 0))] + [row] * with_sum
    out_shape = [jax.ShapeDtypeStruct((mp, k), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((mp, 1), jnp.float32)] + \
        [jax.ShapeDtypeStruct((mp, k), xs[0].dtype)] * with_sum
    outs = pl.pallas_call(
        kernel, grid=(mp // br,), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(cfg.num_warps, cfg.num_stages),
        name=f"kiln_act_quant_{kind}{'_sum' * with_sum}_r{br}_c{chunk}x{chunks}",
    )(*args)
    return tuple(o[:m] for o in outs)


# --------------------------------------------------------------------------- dispatch


def auto_kinds() -> tuple[str, ...]:
    """AUTO_KINDS, or the kinds KILN_ACT_QUANT_KINDS names (checked)."""
    env = os.environ.get("KILN_ACT_QUANT_KINDS")
    if env is None:
        return AUTO_KINDS
    kinds = tuple(x.strip() for x in env.split(",") if x.strip())
    bad = [x for x in kinds if x not in KINDS]
    if bad:
        from kiln.errors import ConfigError

        raise ConfigError(f"KILN_ACT_QUANT_KINDS names unknown kinds {', '.join(bad)}; choose from {', '.join(KINDS)}")
    return kinds


def resolve_impl(impl: str, k: int, kind: str) -> str:
    """"auto" (or `KILN_ACT_QUANT`): the kernel on a GPU for `auto_kinds()`, XLA for the other
    kinds (see the module doc); an explicit kernel wherever K chunks."""
    impl = requested_impl(impl, IMPLS, "KILN_ACT_QUANT", "activation quantization")
    if impl == "auto":
        return "pallas" if kind in auto_kinds() and jax.default_backend() == "gpu" and _chunking(k) else "xla"
    if _chunking(k) is None:
        return "xla"  # no chunking of this width: the reference (rows wider than MAX_CHUNKS chunks)
    return impl


def act_quant(kind: str, *xs, eps: float = 0.0, offset: float = 0.0, impl: str = "auto",
              config: ActQuantConfig | None = None, with_sum: bool = False):
    """The per-token fp8 quantization of the activation `kind` produces from `xs` (see the
    module doc; leading axes of any rank) -> (q f8e4m3 [..., K], s f32 [..., 1]), and for the
    add kinds with `with_sum` the residual sum x + r [..., K] third."""
    if kind not in KINDS:
        raise ValueError(f"unknown activation kind {kind!r}; choose one of {', '.join(KINDS)}")
    k = xs[0].shape[-1]
    lead = xs[0].shape[:-2] if kind.startswith("swiglu") else xs[0].shape[:-1]
    impl = resolve_impl(impl, k, kind)
    if impl == "xla":
        return act_quant_reference(kind, *xs, eps=eps, offset=offset, with_sum=with_sum)
    m = math.prod(lead)
    n_acts = ROWED[kind]
    flat = tuple(x.reshape((m,) + x.shape[len(lead):]) if i < n_acts else x for i, x in enumerate(xs))
    q, s, *sm = act_quant_pallas(kind, *flat, eps=eps, offset=offset, config=config, interpret=impl == "interpret",
                                 with_sum=with_sum)
    return (q.reshape(lead + (k,)), s.reshape(lead + (1,))) + tuple(x.reshape(lead + (k,)) for x in sm)
