"""The Mosaic GPU FP8 W8A8 skinny kernel (runtime/kernels/fp8_skinny_mgpu.py) in Mosaic GPU
interpret mode (a CPU simulation of its TMA ring and barriers) against the plain-JAX reference,
its tile choice and where it runs. jax's interpreter has no wgmma with a transposed operand, so
there the product is a register dot (`gpu=False`); the wgmma itself is checked on the H100 by
`benchmarks/probe_fp8_skinny.py` (relative error 3e-4 to 1.3e-3 against fp32 on all four Llama-3-8B
projections at M = 1, 5, 16, 64: BENCHMARKS.md, session 8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kiln.errors import ConfigError
from kiln.runtime.kernels import fp8_skinny_mgpu as fs


def case(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    xq = jnp.asarray(rng.standard_normal((m, k)) * 30, jnp.float32).astype(jnp.float8_e4m3fn)
    w = jnp.asarray(rng.standard_normal((n, k)) * 30, jnp.float32).astype(jnp.float8_e4m3fn)
    sa = jnp.asarray(rng.uniform(0.5, 2.0, (m, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(1e-3, 2e-3, (n,)), jnp.float32)
    return xq, sa, w, ws


@pytest.mark.parametrize("m, k, n, cfg", [
    (1, 512, 128, fs.SkinnyConfig()),                       # the default tiles: 64 channels, 256-byte steps
    (5, 768, 192, fs.SkinnyConfig(64, 256, 2, 1)),          # odd M padded to 8; a ring shallower than the steps
    (16, 1024, 128, fs.SkinnyConfig(128, 128, 3, 2)),       # two K splits summed after the kernel
    (40, 512, 64, fs.SkinnyConfig(64, 128, 8, None)),       # splits from the grid; more stages than steps
])
def test_interpret_matches_reference(m, k, n, cfg):
    xq, sa, w, ws = case(m, k, n)
    got = fs.fp8_skinny_matmul(xq, sa, w, ws, out_dtype=jnp.float32, config=cfg, interpret=True)
    ref = fs.reference(xq, sa, w, ws, out_dtype=jnp.float32)
    assert got.shape == (m, n)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    raw: dict = {}
    y16 = fs.fp8_skinny_matmul(xq, sa, w, ws, out_dtype=jnp.bfloat16, config=cfg, interpret=True, raw_out=raw)
    assert y16.dtype == jnp.bfloat16 and raw["raw"].shape == (m, n)
    np.testing.assert_allclose(np.asarray(raw["raw"] * sa * ws[None, :]), np.asarray(got), rtol=1e-6)


def test_choose():
    assert fs.choose(16, 4096, 28672) == fs.SkinnyConfig(64, 256, 6, 1)
    assert fs.choose(65, 4096, 4096) is None                     # more tokens than the kernel takes
    assert fs.choose(1, 4096, 100) is None                       # N not a multiple of the channel tile
    assert fs.choose(1, 4000, 128) is None                       # K not a multiple of the step
    # split-K from the grid: 32 tiles of 128 channels x 32 steps -> 8 splits (256 blocks, 4 steps each)
    assert fs.choose(1, 4096, 4096, fs.SkinnyConfig(128, 128, 4, None)).splits == 8
    assert fs.choose(1, 4096, 4096, fs.SkinnyConfig(128, 128, 4, 3)) is None   # 3 does not divide 32 steps


def test_resolve(monkeypatch):
    monkeypatch.delenv("KILN_FP8_SKINNY", raising=False)
    on_gpu = jax.default_backend() == "gpu" and fs.available()
    assert fs.resolve("auto", 1) == ("mgpu" if on_gpu and fs.AUTO_MAX_TOKENS >= 1 else "xla")
    assert fs.resolve("auto", fs.AUTO_MAX_TOKENS + 1) == "xla"
    assert fs.resolve("xla", 1) == "xla"
    monkeypatch.setenv("KILN_FP8_SKINNY", "mgpu")
    assert fs.resolve("auto", 16) == "mgpu" and fs.resolve("auto", fs.MAX_TOKENS + 1) == "xla"
    monkeypatch.setenv("KILN_FP8_SKINNY", "interpret")
    assert fs.resolve("auto", 16) == "interpret" and fs.resolve("auto", fs.MAX_TOKENS + 1) == "xla"
    assert fs.resolve("xla", 16) == "xla"                         # tensor parallel callers pass "xla"
    monkeypatch.setenv("KILN_FP8_SKINNY", "fast")
    with pytest.raises(ConfigError, match="KILN_FP8_SKINNY"):
        fs.resolve("auto", 1)
