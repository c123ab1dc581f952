"""FP8 W8A8 matmul for few tokens (decode, small mixed batches) as a Mosaic GPU Pallas kernel:
the weight tiles go by TMA from HBM into a ring of shared-memory buffers and from there straight
into Hopper's FP8 tensor cores, with no conversion and no pass through registers.

The product is computed transposed, so that the weight is wgmma's A operand (its 64-row M
granule is filled by output channels, not by the few tokens) and the tokens are the N side
(a multiple of 8, up to 256)::

    out^T [N, Mp] = W [N, K] (fp8, K-major: the fp8 pipeline's [N, K] layout)
                    @ xq^T [K, Mp] (fp8 tokens, K-major: a transposed view of xq [Mp, K])

One CUDA block per (channel tile, K split): `block_n` channels x K / splits, the K steps of
`block_k` bytes pipelined `stages` deep. Each block writes its fp32 partial [block_n, Mp]; the
partials' sum, the per-channel and per-token scales and the transpose back to [M, N] are one
small XLA fusion after the kernel (the same epilogue as the Triton kernels' split-K).

Interpret mode (`interpret=True`: jax's Mosaic GPU CPU simulator) runs the same pipeline with the
product taken as a register dot: the simulator has no wgmma with a transposed operand.

Where it runs (`resolve`): only where asked for (`KILN_FP8_SKINNY=mgpu`; `=interpret` runs the
simulator, for CPU tests), up to `MAX_TOKENS` tokens, not under tensor parallelism; the fp8
pipeline's producers (the norms, SwiGLU) then quantize their output for it, so such steps are W8A8
like the large ones (passes/fp8_act.py). "auto" leaves it off. On the H100 (BENCHMARKS.md, session
8) the kernel beats the Triton W8A16 kernel it would replace, per kernel at M = 16: qkv 10.8 vs
14.4 us, o 8.1 vs 11.5, gate_up 43.4 vs 48.2 (2.7 TB/s), down 22.6 vs 27.8 (at M = 1 against the
gemv kernel: 82.7 vs 87.6 us a layer). But in the engine the step's host time rose from 2.7 to 4.3 ms
(~12 us per Mosaic GPU custom call, 128 a step: seemingly launched one by one from the host,
where XLA's Triton kernels run inside its command buffers; adding CUSTOM_CALL to XLA's
command-buffer types changed nothing), and the fp8 latency run fell from 223 to 174 tok/s. It becomes the default for
small steps once those calls launch as cheaply as the Triton kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kiln.runtime.kernels import requested_impl
from kiln.runtime.kernels.quant_matmul import NUM_CORES, auto_splits

try:  # jax builds without Mosaic GPU still import this module
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - depends on the jax build
    plgpu = None

MAX_TOKENS = 64  # wgmma's N side holds up to 256; above 64 tokens cuBLASLt's FP8 GEMM is the better tool
AUTO_MAX_TOKENS = 0  # "auto" never runs it (host launches outside the command buffers, above); 16 once they are
IMPLS = ("auto", "mgpu", "interpret", "xla")  # "xla": cuBLASLt's FP8 GEMM (and W8A16 below the W8A8 count)


@dataclasses.dataclass(frozen=True)
class SkinnyConfig:
    # the H100 profile's best on all four Llama-3-8B projections at M = 1 and 16 (BENCHMARKS.md,
    # session 8): 64 channels x the whole K per block, 6 x 16 KB copies in flight, no split
    block_n: int = 64    # output channels per block (wgmma M: a multiple of 64)
    block_k: int = 256   # K bytes per pipeline step (a multiple of the 128-byte swizzle)
    stages: int = 6      # TMA copies in flight per block
    splits: int | None = 1  # K splits (None: enough blocks to fill the GPU twice over)


def available() -> bool:
    return plgpu is not None and all(hasattr(plgpu, n) for n in ("kernel", "wgmma", "emit_pipeline", "ACC"))


def choose(m: int, k: int, n: int, config: SkinnyConfig | None = None,
           num_cores: int = NUM_CORES) -> SkinnyConfig | None:
    """The config for a shape, splits resolved; None where the shape does not tile."""
    c = config or SkinnyConfig()
    if m > MAX_TOKENS or n % c.block_n or k % c.block_k or c.block_n % 64 or c.block_k % 128:
        return None
    steps = k // c.block_k
    splits = auto_splits(n // c.block_n, steps, num_cores) if c.splits is None else c.splits
    if steps % splits:
        return None
    return dataclasses.replace(c, splits=splits)


def resolve(impl: str, m: int) -> str:
    """The implementation of a W8A8 matmul of `m` tokens: "mgpu" (the kernel), "interpret" or
    "xla" (cuBLASLt's FP8 GEMM, and, below the W8A8 token count, W8A16). "auto" defers to
    `KILN_FP8_SKINNY`, then is the kernel on a GPU up to `AUTO_MAX_TOKENS` tokens (none for now);
    the caller passes "xla" under tensor parallelism. Whether a shape tiles is checked where it runs."""
    impl = requested_impl(impl, IMPLS, "KILN_FP8_SKINNY", "fp8 skinny matmul")
    if impl == "auto":
        impl = "mgpu" if jax.default_backend() == "gpu" and available() and m <= AUTO_MAX_TOKENS else "xla"
    return impl if m <= MAX_TOKENS else "xla"


def padded_tokens(m: int) -> int:
    return max(8, -(-m // 8) * 8)


def _kernel(w_ref, x_ref, o_ref, o_smem, *, block_n: int, block_k: int, steps: int, stages: int, gpu: bool):
    tile = lax.axis_index("n")
    split = lax.axis_index("s")
    mp = x_ref.shape[0]
    span = steps * block_k
    w_part = w_ref.at[pl.ds(tile * block_n, block_n), pl.ds(split * span, span)]
    x_part = x_ref.at[:, pl.ds(split * span, span)]
    transforms = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))

    def scope(acc_ref):
        def step(_, w_smem, x_smem):
            if gpu:
                plgpu.wgmma(acc_ref, w_smem, plgpu.transpose_ref(x_smem, (1, 0)))
                plgpu.wgmma_wait(0)
            else:  # the simulator: the same product from registers
                acc_ref[...] += lax.dot_general(w_smem[...], x_smem[...], (((1,), (1,)), ((), ())),
                                                preferred_element_type=jnp.float32)

        plgpu.emit_pipeline(
            step, grid=(steps,), max_concurrent_steps=min(stages, steps),
            in_specs=[plgpu.BlockSpec((block_n, block_k), lambda k: (0, k), transforms=transforms),
                      plgpu.BlockSpec((mp, block_k), lambda k: (0, k), transforms=transforms)],
        )(w_part, x_part)
        return acc_ref[...]

    if gpu:
        acc = pl.run_scoped(scope, plgpu.ACC((block_n, mp), jnp.float32))
    else:
        def reg_scope(acc_ref):
            acc_ref[...] = jnp.zeros((block_n, mp), jnp.float32)
            return scope(acc_ref)
        acc = pl.run_scoped(reg_scope, plgpu.SMEM((block_n, mp), jnp.float32))
    o_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, pl.ds(tile * block_n, block_n)])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def partials(xq, w, config: SkinnyConfig, *, interpret: bool = False):
    """The kernel alone: xq [Mp, K] fp8 (Mp a multiple of 8), w [N, K] fp8 -> fp32 [splits, N, Mp],
    the unscaled products of each K split. Jitted, so that a step's many calls of one shape lower
    (and compile) the kernel once: Mosaic GPU's lowering takes ~0.4 s a kernel on the H100 host."""
    mp, k = xq.shape
    n = w.shape[0]
    steps = k // config.block_k // config.splits
    body = functools.partial(_kernel, block_n=config.block_n, block_k=config.block_k, steps=steps,
                             stages=config.stages, gpu=not interpret)
    kw = {}
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret import params

        kw = dict(interpret=params.InterpretGPUParams())
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((config.splits, n, mp), jnp.float32),
        grid=(n // config.block_n, config.splits),
        grid_names=("n", "s"),
        scratch_types=[plgpu.SMEM((config.block_n, mp), jnp.float32)],
        **kw,
    )(w, xq)


def fp8_skinny_matmul(xq, x_scale, w, w_scale, *, out_dtype, config: SkinnyConfig | None = None,
                      interpret: bool = False, raw_out: dict | None = None):
    """xq [M, K] fp8 e4m3 with per-token scales x_scale [M] (or [M, 1]), w [N, K] fp8 e4m3 with
    per-channel scales w_scale [N] -> [M, N] in out_dtype: (xq * x_scale) @ (w * w_scale)^T, fp32
    accumulation. M up to `MAX_TOKENS`. `raw_out` (a dict) receives "raw": the unscaled fp32 product."""
    m, k = xq.shape
    n = w.shape[0]
    cfg = choose(m, k, n, config)
    if cfg is None:
        raise ValueError(f"fp8_skinny_matmul: shape M={m} K={k} N={n} does not tile with {config or SkinnyConfig()}")
    mp = padded_tokens(m)
    part = partials(jnp.pad(xq, ((0, mp - m), (0, 0))), w, cfg, interpret=interpret)
    acc = (part[0] if cfg.splits == 1 else part.sum(axis=0))[:, :m].T               # [M, N], unscaled
    if raw_out is not None:
        raw_out["raw"] = acc
    return (acc * x_scale.reshape(m, 1).astype(jnp.float32)
            * w_scale.reshape(1, n).astype(jnp.float32)).astype(out_dtype)


def reference(xq, x_scale, w, w_scale, *, out_dtype):
    m, n = xq.shape[0], w.shape[0]
    acc = lax.dot_general(xq.astype(jnp.float32), w.astype(jnp.float32), (((1,), (1,)), ((), ())),
                          precision=lax.Precision.HIGHEST)
    return (acc * x_scale.reshape(m, 1).astype(jnp.float32) * w_scale.reshape(1, n).astype(jnp.float32)).astype(out_dtype)


__all__ = ["SkinnyConfig", "available", "choose", "resolve", "IMPLS", "AUTO_MAX_TOKENS", "fp8_skinny_matmul", "partials", "reference", "padded_tokens"]
