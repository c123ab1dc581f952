"""FP8 W8A8 fast path (passes/fp8_act.py): fp8 weights stored out-major, activation
quantization fused into the norm / SwiGLU that produces the activation; logits equal to the
unfused quantized graph within fp8 tolerance, and bit-close below the W8A8 token count."""

import numpy as np
import pytest

import kiln.passes.ops as qops
from kiln.passes import compile_model
from kiln.passes.fp8_act import QAct, fp8_linear
from kiln.passes.pipeline import PipelineOptions, build_passes, run_pipeline
from tests.helpers import make_hf_checkpoint
from tests.passes.util import load_tiny, rel_err, run_workload

FP8_PASSES = ("fp8_weight_nk", "fuse_fp8_act")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_fp8")
    make_hf_checkpoint("llama", path)
    return path


def _unfused(graph, params):
    """The quantized graph as `quantize_fp8` leaves it: [in, out] weights, quantization in the matmul."""
    passes = [p for p in build_passes(PipelineOptions(quantization="fp8")) if p.name not in FP8_PASSES]
    return run_pipeline(graph, params, passes=passes)


def test_graph_after_the_fp8_passes(llama):
    graph, params = load_tiny(llama)
    g0, p0 = _unfused(graph, params)
    g, p = compile_model(graph, params, quantization="fp8")
    layers = graph.meta["num_layers"]
    ops = [n.op for n in g.nodes]
    # every activation an fp8 matmul reads from a norm or SwiGLU is quantized by that op
    assert ops.count("rms_norm_fp8") == 1 and ops.count("add_rms_norm_fp8") == 2 * layers - 1
    assert ops.count("swiglu_fp8") == layers and "swiglu" not in ops
    q = [n for n in g.nodes if n.op == "qlinear"]
    assert len(q) == 4 * layers and all(n.attrs["w_layout"] == "nk" for n in q)
    assert sum(1 for n in q if g.type_of(n.inputs[0]).dtype == "float8_e4m3fn") == 3 * layers  # o_proj reads attention
    for n0, n in zip([n for n in g0.nodes if n.op == "qlinear"], q):
        w0, w = np.asarray(p0[n0.inputs[1]]), np.asarray(p[n.inputs[1]])
        assert n.inputs[1] == n0.inputs[1] and g.params[n.inputs[1]].type.axes[-1] == g0.params[n0.inputs[1]].type.axes[0]
        np.testing.assert_array_equal(w.view(np.uint8), np.moveaxis(w0, 0, -1).view(np.uint8))  # the same codes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_equal_the_unfused_quantized_graph(llama, dtype, monkeypatch):
    """W8A8 on the 32-token prefill, W8A16 on the 8-token decode steps (threshold 16 here),
    which read the KV cache the prefill wrote."""
    monkeypatch.setattr(qops, "FP8_W8A8_MIN_TOKENS", 16)
    graph, params = load_tiny(llama, dtype)
    ref = run_workload(*_unfused(graph, params))
    got = run_workload(*compile_model(graph, params, quantization="fp8"))
    if dtype == "float32":  # the same arithmetic up to summation order
        assert rel_err(got, ref) < 1e-4
        return
    # bf16: the fused op quantizes the fp32 value that the unfused graph first rounds to bf16,
    # so e4m3 codes near a rounding boundary flip (3 mantissa bits): fp8-sized differences,
    # and the fused graph is no further from the float model than the unfused one
    flt = run_workload(*compile_model(graph, params))
    assert _rms_rel(got, ref) < 0.1
    assert rel_err(got, flt) < 1.05 * rel_err(ref, flt) and _rms_rel(got, flt) < 1.05 * _rms_rel(ref, flt)


def _rms_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def test_fp8_linear_w8a8_against_numpy():
    """One W8A8 matmul from a QAct and an out-major weight: per-token x per-channel scales."""
    import jax.numpy as jnp
    import ml_dtypes

    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 64)).astype(np.float32)
    w = rng.standard_normal((64, 3, 8)).astype(np.float32) * 0.1
    sw = np.abs(w).max(axis=0) / 448.0
    wq = (w / sw).astype(ml_dtypes.float8_e4m3fn)
    sa = np.abs(x).max(axis=-1, keepdims=True) / 448.0
    xq = (x / sa).astype(ml_dtypes.float8_e4m3fn)
    ref = (xq.astype(np.float32) * sa) @ (wq.astype(np.float32) * sw).reshape(64, 24)
    got = fp8_linear(QAct(jnp.asarray(xq), jnp.asarray(sa)), jnp.asarray(np.moveaxis(wq, 0, -1)), jnp.asarray(sw),
                     in_features=64, bias=False, w_layout="nk", out_dtype="float32", w8a8_min_tokens=1)
    assert got.shape == (20, 3, 8)
    assert rel_err(np.asarray(got).reshape(20, 24), ref) < 1e-5


def test_small_steps_on_the_skinny_kernel(tmp_path, monkeypatch):
    """With the skinny FP8 kernel selected (Mosaic GPU interpret mode here; "auto" picks it on a
    GPU up to 16 tokens) every fp8 matmul of up to 64 tokens runs W8A8 through it, its producers
    quantizing for it: fp32 logits equal the graph run W8A8 through XLA's GEMM throughout."""
    from kiln.runtime.kernels import fp8_skinny_mgpu as fs

    # every projection tiles: K in {256, 512}, N in {512, 256, 1024} (head_dim 64, 2 KV heads)
    make_hf_checkpoint("llama", tmp_path, hidden_size=256, intermediate_size=512)
    graph, params = load_tiny(tmp_path)
    monkeypatch.setattr(qops, "FP8_W8A8_MIN_TOKENS", 1)
    monkeypatch.setenv("KILN_FP8_SKINNY", "xla")
    ref = run_workload(*compile_model(graph, params, quantization="fp8"))
    calls = []
    partials = fs.partials
    monkeypatch.setattr(fs, "partials", lambda *a, **k: calls.append(a[0].shape) or partials(*a, **k))
    monkeypatch.setattr(qops, "FP8_W8A8_MIN_TOKENS", 10 ** 6)   # no step W8A8 but through the kernel
    monkeypatch.setenv("KILN_FP8_SKINNY", "interpret")
    got = run_workload(*compile_model(graph, params, quantization="fp8"))
    layers = graph.meta["num_layers"]
    assert sorted(set(calls)) == [(8, 256), (8, 512), (32, 256), (32, 512)]   # decode (8) and prefill (32)
    assert len(calls) == 2 * 4 * layers                                       # traced once per bucket
    assert rel_err(got, ref) < 1e-4
