"""The fused fp8 activation-quantization kernel (Pallas interpret mode on the CPU) against its
plain-JAX reference, its dispatch, and an fp8 model's greedy tokens through the kernel equal to
those through XLA's path."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kiln.passes.ops as qops
from kiln.errors import ConfigError
from kiln.passes import compile_model
from kiln.runtime.kernels import act_quant as aq
from tests.passes.util import load_tiny


def _inputs(rng, kind, lead, k, dtype):
    """Inputs of `kind`; add_rms_norm's two addends are multiples of 1/8 in [-4, 4], so their
    sum is exact in bf16 (XLA's CPU backend may skip the sum's rounding to bf16 inside a
    fusion, the GPU kernel rounds it as the unfused graph does: exact sums compare both)."""
    def act(shape):
        if kind.startswith("add_rms_norm"):
            return rng.integers(-32, 33, shape).astype(np.float32) / 8
        return rng.standard_normal(shape).astype(np.float32) * rng.choice([0.1, 3.0, 40.0])

    if kind == "add_rms_norm_scaled":  # raw * sa * ws lands on multiples of 1/8 as well (powers of two)
        e_row, e_col = rng.integers(3, 7, lead + (1,)), rng.integers(0, 4, k)
        raw = rng.integers(-32, 33, lead + (k,)) / 8 * 2.0 ** (e_row + e_col)
        return [jnp.asarray(raw, dtype), jnp.asarray(act(lead + (k,)), dtype),
                jnp.asarray(2.0 ** -e_row, jnp.float32), jnp.asarray(2.0 ** -e_col, jnp.float32),
                jnp.asarray(rng.standard_normal(k) * 0.5 + 1.0, dtype)]
    if kind == "swiglu":
        xs = [act(lead + (2, k))]
    elif kind == "swiglu_scaled":  # a W8A8 GEMM's unscaled output, its token and channel scales
        return [jnp.asarray(act(lead + (2, k)) * 100, dtype), jnp.asarray(rng.uniform(1e-3, 0.1, lead + (1,)), jnp.float32),
                jnp.asarray(rng.uniform(1e-4, 1e-2, (2, k)), jnp.float32)]
    else:
        xs = [act(lead + (k,)) for _ in range(2 if kind == "add_rms_norm" else 1)]
        if kind != "rows":
            xs.append(rng.standard_normal(k).astype(np.float32) * 0.5 + 1.0)
    return [jnp.asarray(x, dtype) for x in xs]


def _codes(q):
    return np.asarray(q).view(np.uint8)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(aq.KINDS), lead=st.sampled_from([(1,), (5,), (3, 7), (33,)]),
       k=st.sampled_from((64, 256, 448, 1536)), block_rows=st.sampled_from((1, 2, 4)),
       dtype=st.sampled_from(("float32", "bfloat16")), offset=st.sampled_from((0.0, 1.0)), seed=st.integers(0, 2**16))
def test_kernel_equals_reference(kind, lead, k, block_rows, dtype, offset, seed):
    """Every kind on odd row counts (padded to the row block), leading axes of rank 1-2, one
    chunk or several (448 = 7 x 64, 1536 = 3 x 512), 16- and 32-bit inputs, Gemma's (1 + w),
    SwiGLU over a W8A8 GEMM's unscaled output with its two scale vectors."""
    xs = _inputs(np.random.default_rng(seed), kind, lead, k, dtype)
    kw = dict(eps=1e-5, offset=offset) if "norm" in kind else {}
    q, s = aq.act_quant(kind, *xs, impl="interpret", config=aq.ActQuantConfig(block_rows=block_rows), **kw)
    qr, sr = aq.act_quant_reference(kind, *xs, **kw)
    assert q.shape == qr.shape == lead + (k,) and q.dtype == jnp.float8_e4m3fn
    assert s.shape == sr.shape == lead + (1,) and s.dtype == jnp.float32
    # the norms' sum of squares is added chunk by chunk and XLA may divide by 448 as a multiply:
    # the scale may differ in its last bits, and then a code on a rounding boundary by one step
    np.testing.assert_allclose(np.asarray(s), np.asarray(sr), rtol=1e-6)
    a, b = _codes(q).astype(np.int16), _codes(qr).astype(np.int16)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
    if kind.startswith("add_rms_norm"):  # the residual sum beside the quantized norm: exact, same codes
        q2, s2, total = aq.act_quant(kind, *xs, impl="interpret", config=aq.ActQuantConfig(block_rows=block_rows),
                                     with_sum=True, **kw)
        want = aq.residual_sum(kind, xs)
        assert total.shape == want.shape and total.dtype == want.dtype == xs[0].dtype
        np.testing.assert_array_equal(np.asarray(total, np.float32), np.asarray(want, np.float32))
        np.testing.assert_array_equal(_codes(q2), _codes(q))
        np.testing.assert_array_equal(np.asarray(s2), np.asarray(s))


def test_against_numpy():
    """The reference itself, against numpy's e4m3 for an RMS norm: codes of y / s, s = max|y| / 448."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 256)).astype(np.float32) * 5
    w = rng.standard_normal(256).astype(np.float32)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w
    s = np.abs(y).max(-1, keepdims=True) / 448
    q, got_s = aq.act_quant("rms_norm", jnp.asarray(x), jnp.asarray(w), eps=1e-6, impl="interpret")
    np.testing.assert_allclose(np.asarray(got_s), s, rtol=1e-5)
    deq = np.asarray(q).astype(np.float32) * np.asarray(got_s)
    np.testing.assert_allclose(deq, (y / s).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s, rtol=0.07, atol=1e-6)
    assert np.abs(np.asarray(q).astype(np.float32)).max() == 448.0  # the row max maps to e4m3's largest value


def test_dispatch(monkeypatch):
    # XLA by default on the CPU; on a GPU the kernel for the two kinds over W8A8 products (module doc)
    assert aq.resolve_impl("auto", 4096, "swiglu_scaled") == "xla" and aq.resolve_impl("auto", 4096, "rms_norm") == "xla"
    monkeypatch.setattr(aq.jax, "default_backend", lambda: "gpu")
    assert aq.resolve_impl("auto", 14336, "swiglu_scaled") == "pallas" and aq.resolve_impl("auto", 4096, "swiglu") == "xla"
    assert aq.resolve_impl("auto", 4096, "add_rms_norm_scaled") == "pallas" and aq.resolve_impl("auto", 4096, "rows") == "xla"
    monkeypatch.setenv("KILN_ACT_QUANT_KINDS", "swiglu,rows")  # other kinds, for an A/B
    assert [aq.resolve_impl("auto", 4096, k) for k in ("swiglu", "rows", "swiglu_scaled")] == \
        ["pallas", "pallas", "xla"]
    monkeypatch.setenv("KILN_ACT_QUANT_KINDS", "rows,norms")
    with pytest.raises(ConfigError, match="KILN_ACT_QUANT_KINDS names unknown kinds norms"):
        aq.resolve_impl("auto", 4096, "rows")
    monkeypatch.undo()
    monkeypatch.setenv("KILN_ACT_QUANT", "interpret")
    assert aq.resolve_impl("auto", 4096, "rms_norm") == "interpret"
    assert aq.resolve_impl("xla", 4096, "rms_norm") == "xla"  # explicit wins
    assert aq.resolve_impl("auto", 100, "swiglu_scaled") == "xla" and aq.resolve_impl("pallas", 100, "rows") == "xla"  # no chunk of 64 or more
    assert aq._chunking(14336) == (2048, 7) and aq._chunking(4096) == (4096, 1) and aq._chunking(3 * 2**12 * 11) is None
    monkeypatch.setenv("KILN_ACT_QUANT", "fast")
    with pytest.raises(ConfigError, match="KILN_ACT_QUANT"):
        aq.resolve_impl("auto", 4096, "rows")
    with pytest.raises(ValueError, match="unknown activation kind"):
        aq.act_quant("gelu", jnp.ones((2, 64)))
    with pytest.raises(ValueError, match="swiglu has no residual sum"):
        aq.act_quant("swiglu", jnp.ones((2, 2, 64)), impl="interpret", with_sum=True)


def test_fp8_model_kernel_equals_xla(ckpt, monkeypatch):
    """An fp8 model (W8A8 from 4 tokens here) whose 4 quantized activations per layer (the
    two norms, the attention output, and SwiGLU straight from the gate/up GEMM's unscaled output)
    go through the kernel: the same greedy tokens as XLA's path."""
    from tests.runtime.kernels.test_quant_matmul import _greedy

    monkeypatch.setattr(qops, "FP8_W8A8_MIN_TOKENS", 4)  # every step W8A8, decode included
    graph, params = load_tiny(ckpt)
    g, p = compile_model(graph, params, quantization="fp8")
    prompt = [int(t) for t in np.random.default_rng(7).integers(0, 300, 13)]
    monkeypatch.setenv("KILN_ACT_QUANT", "xla")
    want = _greedy(g, p, prompt, 5)
    monkeypatch.setenv("KILN_ACT_QUANT", "interpret")
    calls = []
    kernel = aq.act_quant_pallas
    monkeypatch.setattr(aq, "act_quant_pallas", lambda kind, *a, **kw: calls.append(
        kind + "+sum" * kw.get("with_sum", False)) or kernel(kind, *a, **kw))
    assert _greedy(g, p, prompt, 5) == want
    layers = graph.meta["num_layers"]
    # the norms after o_proj and down read those W8A8 products unscaled, as SwiGLU reads gate_up's,
    # and write the residual sum too (the final norm's as well: its fp8 output unread there)
    norm = "add_rms_norm_scaled+sum"
    per_step = ["rms_norm", "rows", norm, "swiglu_scaled"] + [norm, "rows", norm, "swiglu_scaled"] * (layers - 1) + [norm]
    assert calls and len(calls) % len(per_step) == 0 and sorted(calls[:len(per_step)]) == sorted(per_step)
