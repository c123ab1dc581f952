"""RMSNorm (optionally after a residual add) of a few rows as one Pallas kernel, for decode steps.

    rms_norm       x [M, K], w [K]      -> y = w * norm(x)
    add_rms_norm   x, r [M, K], w [K]   -> (s = x + r, y = w * norm(s))

norm(x) = x / sqrt(mean(x^2) + eps) in fp32, rounded to x's dtype before the weight multiply
(transformers' LlamaRMSNorm, graph/ops.py's lowering; with `offset` (Gemma) the weight `offset + w`
is applied in fp32). One program per row loads the row once in power-of-two chunks (act_quant.py's
chunking), sums the squares, and writes the output (and the sum) from registers.

Why: XLA lowers a norm of one row as two kernels (the fp32 row reduction, then the scaling, which
it cannot fuse into the reduction's kernel), and in a batch-1 decode step whose matmuls are Pallas
kernels (quantized models) nothing absorbs the scaling either: 2 kernels x 2 norms x 32 layers of
the ~550 an 8B step launches. The fp8 and int4 batch-1 steps are bound by the host's launch of
those kernels (BENCHMARKS.md, session 8), so each kernel less is time off the step.

Where it runs (`resolve`): "auto" on a GPU for steps of up to `AUTO_MAX_ROWS` rows whose width
chunks, not under tensor parallelism (the caller passes "xla"); `KILN_RMS_NORM=xla|pallas|interpret`
overrides it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kiln.runtime.kernels import requested_impl
from kiln.runtime.kernels.act_quant import _chunking

IMPLS = ("auto", "xla", "pallas", "interpret")
AUTO_MAX_ROWS = 16   # the small-step buckets (batch-1 decode and the 16-token bucket)


def reference(x, w, r=None, *, eps: float, offset: float = 0.0):
    """The plain-JAX op, XLA's path of the graph's rms_norm / add_rms_norm: y, or (s, y) with a residual."""
    s = x if r is None else x + r
    xf = s.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    y = (xf * (offset + w.astype(jnp.float32))).astype(x.dtype) if offset else w.astype(x.dtype) * xf.astype(x.dtype)
    return y if r is None else (s, y)


def _kernel(*refs, add: bool, chunk: int, chunks: int, k: int, eps: float, offset: float):
    from jax.experimental import pallas as pl

    if add:
        x_ref, r_ref, w_ref, s_ref, y_ref = refs
    else:
        x_ref, w_ref, y_ref = refs
    vals = []
    for c in range(chunks):
        sl = pl.ds(c * chunk, chunk)
        x = x_ref[:, sl]
        if add:
            x = x + r_ref[:, sl]           # in x's dtype, as the graph forms the sum
            s_ref[:, sl] = x
        vals.append(x.astype(jnp.float32))
    ssq = sum(jnp.sum(v * v, axis=1, keepdims=True) for v in vals)      # [1, 1]
    rstd = jax.lax.rsqrt(ssq / k + eps)
    for c, v in enumerate(vals):
        sl = pl.ds(c * chunk, chunk)
        w = w_ref[:, sl]
        if offset:
            y = v * rstd * (offset + w.astype(jnp.float32))
        else:
            y = w.astype(y_ref.dtype).astype(jnp.float32) * (v * rstd).astype(y_ref.dtype).astype(jnp.float32)
        y_ref[:, sl] = y.astype(y_ref.dtype)


def rms_norm_pallas(x, w, r=None, *, eps: float, offset: float = 0.0, interpret: bool = False):
    """The kernel over x [M, K] (and r [M, K]), w [K]: y, or (s, y) with a residual."""
    from jax.experimental import pallas as pl

    from kiln.runtime.kernels.quant_matmul import _compiler_params

    m, k = x.shape
    chunk, chunks = _chunking(k)
    add = r is not None
    row = pl.BlockSpec((1, k), lambda i: (i, 0))
    args = (x, r, w.reshape(1, k)) if add else (x, w.reshape(1, k))
    out = jax.ShapeDtypeStruct((m, k), x.dtype)
    res = pl.pallas_call(
        lambda *refs: _kernel(*refs, add=add, chunk=chunk, chunks=chunks, k=k, eps=eps, offset=offset),
        grid=(m,), in_specs=[row] * (2 if add else 1) + [pl.BlockSpec((1, k), lambda i: (0, 0))],
        out_specs=[row, row] if add else row, out_shape=[out, out] if add else out,
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(4 if k <= 4096 else 8, 1),
        name=f"kiln_{'add_' if add else ''}rms_norm_c{chunk}x{chunks}",
    )(*args)
    return tuple(res) if add else res


def resolve(impl: str, rows: int, k: int) -> str:
    """"xla", "pallas" or "interpret" for a norm of `rows` rows of width k (see the module doc)."""
    impl = requested_impl(impl, IMPLS, "KILN_RMS_NORM", "RMSNorm")
    if _chunking(k) is None:
        return "xla"
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" and rows <= AUTO_MAX_ROWS else "xla"
    return impl


def rms_norm(x, w, r=None, *, eps: float, offset: float = 0.0, impl: str = "auto"):
    """RMSNorm of x [..., K] (after adding r, then returned as (s, y)) by `impl` (see `resolve`)."""
    k = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    impl = resolve(impl, rows, k)
    if impl == "xla":
        return reference(x, w, r, eps=eps, offset=offset)
    res = rms_norm_pallas(x.reshape(rows, k), w, None if r is None else r.reshape(rows, k), eps=eps, offset=offset,
                          interpret=impl == "interpret")
    return tuple(a.reshape(x.shape) for a in res) if r is not None else res.reshape(x.shape)


__all__ = ["rms_norm", "rms_norm_pallas", "reference", "resolve", "IMPLS", "AUTO_MAX_ROWS"]
