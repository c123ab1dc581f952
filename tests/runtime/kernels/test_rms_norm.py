"""The few-row RMSNorm kernel (runtime/kernels/rms_norm.py) in interpret mode against the plain-JAX
op, and models whose norms run through it: logits equal to the XLA lowering, one kernel per norm."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import kiln.passes.ops as qops
from kiln.errors import ConfigError
from kiln.passes import compile_model
from kiln.runtime.kernels import rms_norm as rn
from tests.helpers import make_hf_checkpoint
from tests.passes.util import load_tiny, rel_err, run_workload


@pytest.mark.parametrize("m, k, dtype, offset, add", [
    (1, 4096, jnp.bfloat16, 0.0, True),      # a decode row of the 8B model: one 4096 chunk
    (3, 192, jnp.float32, 0.0, False),       # three 64-wide chunks
    (5, 576, jnp.bfloat16, 1.0, True),       # SmolLM2's width (9 x 64), Gemma's offset weight
    (16, 1024, jnp.float16, 0.0, False),
])
def test_interpret_matches_reference(m, k, dtype, offset, add):
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.standard_normal((m, k)) * 3, jnp.float32).astype(dtype)
    r = jnp.asarray(rng.standard_normal((m, k)), jnp.float32).astype(dtype) if add else None
    w = jnp.asarray(rng.standard_normal(k) * 0.5, jnp.float32).astype(dtype)
    got = rn.rms_norm(x, w, r, eps=1e-5, offset=offset, impl="interpret")
    want = rn.reference(x, w, r, eps=1e-5, offset=offset)
    if add:
        np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32))
        got, want = got[1], want[1]
    assert got.dtype == x.dtype and got.shape == x.shape
    # fp32 summation order only; 16-bit outputs may round one ulp apart
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


def test_resolve(monkeypatch):
    import jax

    monkeypatch.delenv("KILN_RMS_NORM", raising=False)
    gpu = jax.default_backend() == "gpu"
    assert rn.resolve("auto", 1, 4096) == ("pallas" if gpu else "xla")
    assert rn.resolve("auto", rn.AUTO_MAX_ROWS + 1, 4096) == "xla"
    assert rn.resolve("pallas", 1, 100) == "xla"                  # 100 does not chunk (4 x 25)
    monkeypatch.setenv("KILN_RMS_NORM", "interpret")
    assert rn.resolve("auto", 512, 4096) == "interpret" and rn.resolve("xla", 1, 4096) == "xla"
    monkeypatch.setenv("KILN_RMS_NORM", "yes")
    with pytest.raises(ConfigError, match="KILN_RMS_NORM"):
        rn.resolve("auto", 1, 4096)


@pytest.mark.parametrize("quant", [None, "fp8"])
def test_model_through_the_kernel(tmp_path, monkeypatch, quant):
    """fp32 logits of prefill + decode steps with every norm through the kernel equal XLA's, one
    kernel per norm (fp8 at W8A16: add_rms_norm's residual sum and add_rms_norm_fp8's normed input
    of the same x, r share one)."""
    make_hf_checkpoint("llama", tmp_path)
    graph, params = load_tiny(tmp_path)
    monkeypatch.setattr(qops, "FP8_W8A8_MIN_TOKENS", 10 ** 6)   # fp8: W8A16 throughout
    monkeypatch.setenv("KILN_RMS_NORM", "xla")
    ref = run_workload(*compile_model(graph, params, quantization=quant))
    calls = []
    kernel = rn.rms_norm_pallas
    monkeypatch.setattr(rn, "rms_norm_pallas", lambda x, w, r=None, **kw: calls.append(r is not None) or kernel(x, w, r, **kw))
    monkeypatch.setenv("KILN_RMS_NORM", "interpret")
    got = run_workload(*compile_model(graph, params, quantization=quant))
    layers = graph.meta["num_layers"]
    # per traced step (the prefill bucket, the decode bucket): the first layer's input norm, then
    # 2 * layers add + norms (the last one the final norm), each one kernel
    assert calls == 2 * ([False] + [True] * (2 * layers)), calls
    assert rel_err(got, ref) < 1e-5
