"""The grouped matmul of MoE layers: `lax.ragged_dot` against the masked-dense definition,
with empty groups (the Mosaic-GPU kernel runs on Hopper only: benchmarks/bench_moe.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from kiln.runtime.kernels.grouped_matmul import default_impl, grouped_matmul


def test_ragged_dot_equals_reference_with_empty_groups():
    sizes = jnp.array([3, 0, 5, 0, 1], jnp.int32)
    lhs = jax.random.normal(jax.random.PRNGKey(0), (9, 16))
    rhs = jax.random.normal(jax.random.PRNGKey(1), (5, 16, 24))
    ref = np.concatenate([np.asarray(lhs[s:e]) @ np.asarray(rhs[g]) for g, (s, e) in
                          enumerate(zip(np.cumsum(sizes) - sizes, np.cumsum(sizes))) if e > s])
    for impl in ("ragged_dot", "reference"):
        np.testing.assert_allclose(np.asarray(grouped_matmul(lhs, rhs, sizes, impl)), ref, rtol=1e-5, atol=1e-5)


def test_cpu_default_is_ragged_dot():
    assert default_impl() == "ragged_dot"
