"""Grouped matmul for mixture-of-experts layers: rows sorted by expert, each group of rows
times its own expert's matrix.

    lhs [M, K]   rows grouped: the first sizes[0] rows belong to group 0, the next sizes[1] to 1 ...
    rhs [G, K, N], sizes [G] int32 (sum = M)        out[r] = lhs[r] @ rhs[group of r]

Implementations:
    "ragged_dot"  `jax.lax.ragged_dot`. Native on TPU and on the CPU. On NVIDIA GPUs XLA's
                  RaggedDotRewriter turns it into a dense dot over every group with the
                  rows masked (G times the work) unless its cuDNN ragged-dot fusion is on
                  (XLA flag `--xla_gpu_experimental_use_ragged_dot_fusion=true`).
    "mgpu"        jax's Pallas Mosaic-GPU ragged-dot kernel (Hopper, sm_90): each row block
                  meets only its group's matrix.
    "reference"   every group on every row, masked (the definition; for tests).
`default_impl()` picks per backend; BENCHMARKS.md ("MoE layer") has the measurements.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLS = ("ragged_dot", "mgpu", "reference")

# Mosaic-GPU kernel tiling. Row blocks: 64 for up to 1024 rows (tokens x top_k), 128 beyond
# (H100, Mixtral-8x7B layer: 64 won at 32 and 512 rows, 128 at 4096 and 16384; BENCHMARKS.md).
# A "block_m" set here overrides that rule.
MGPU_TILES = dict(block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def mgpu_block_m(rows: int) -> int:
    return 64 if rows <= 1024 else 128


def grouped_matmul_reference(lhs, rhs, sizes):
    ends = jnp.cumsum(sizes)
    group = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right")      # [M] group of each row
    out = jnp.einsum("mk,gkn->mgn", lhs, rhs.astype(lhs.dtype), preferred_element_type=jnp.float32)
    return jnp.take_along_axis(out, group[:, None, None], axis=1)[:, 0].astype(lhs.dtype)


def grouped_matmul_mgpu(lhs, rhs, sizes, **tiles):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    tiles = {"block_m": mgpu_block_m(lhs.shape[0]), **MGPU_TILES, **tiles}
    return ragged_dot_mgpu.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes=sizes, **tiles)


@functools.lru_cache(maxsize=None)
def _mgpu_available() -> bool:
    try:
        dev = jax.devices()[0]
        major = int(str(getattr(dev, "compute_capability", "0")).split(".")[0])
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # noqa: F401
    except Exception:  # no GPU, or this jax has no Mosaic-GPU ragged dot
        return False
    return dev.platform == "gpu" and major == 9


def default_impl() -> str:
    return "mgpu" if jax.default_backend() == "gpu" and _mgpu_available() else "ragged_dot"


def grouped_matmul(lhs, rhs, sizes, impl: str | None = None):
    impl = impl or default_impl()
    k, n = rhs.shape[1], rhs.shape[2]
    if impl == "mgpu" and (k % MGPU_TILES["block_k"] or n % MGPU_TILES["block_n"]
                           or lhs.dtype not in (jnp.bfloat16, jnp.float16)):
        impl = "ragged_dot"  # the kernel tiles K and N exactly, and runs 16-bit wgmma only
    if impl == "mgpu":
        return grouped_matmul_mgpu(lhs, rhs, sizes)
    if impl == "reference":
        return grouped_matmul_reference(lhs, rhs, sizes)
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), sizes)
    raise ValueError(f"unknown grouped matmul implementation {impl!r}; choose one of {IMPLS}")
