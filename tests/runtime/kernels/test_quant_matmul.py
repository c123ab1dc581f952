"""The fused dequantizing matmul kernel (Pallas interpret mode on the CPU) against the
dequantized-weights reference, its config rules and dispatch, and a quantized model's greedy
tokens through the kernel equal to those through XLA's path."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.errors import ConfigError
from kiln.passes import compile_model
from kiln.passes import quantize as qz
from kiln.runtime.batch import SeqChunk
from kiln.runtime.kernels import quant_matmul as qm
from tests.helpers import Stepper
from tests.passes.util import load_tiny


def _case(rng, mode, m, k, n, group, dtype=np.float32):
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    parts = qz.quantize_weight(mode, w, group)
    x = rng.standard_normal((m, k)).astype(np.float32)
    ref = x.astype(np.float64) @ qz.dequantize(mode, *parts, group=group).astype(np.float64)
    return jnp.asarray(x, dtype), [jnp.asarray(a) for a in parts], ref


def _rel(y, ref):
    return float(np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref))


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(qm.MODES), m=st.sampled_from((1, 3, 17, 130)), k=st.sampled_from((128, 256)),
       n=st.sampled_from((16, 48, 64)), group=st.sampled_from((32, 64, 128)), splits=st.sampled_from((1, 2)),
       variant=st.sampled_from(({}, {"gemv": True}, {"post_scale": True}, {"magic": True},
                                {"gemv": True, "magic": True}, {"gemv": True, "defer_sum": True, "block_n": 8},
                                {"gemv": True, "defer_sum": True, "magic": True}, {"or_codes": True})),
       nk=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_kernel_equals_reference(mode, m, k, n, group, splits, variant, nk, seed):
    """Every kernel form (tensor-core dot; multiply-and-sum rows for M <= 4, summed per step
    or once at the end; int4 codes dotted with the scale and min applied after; integer-op
    code conversion) on odd M, several tiles, split-K, [K, N] and (8-bit) [N, K] weights."""
    group = group if mode == "int4_wo" else None
    nk = nk and mode != "int4_wo"
    x, parts, ref = _case(np.random.default_rng(seed), mode, m, k, n, group)
    if nk:
        parts[0] = parts[0].T
    bk = max(group or 0, 64)
    layout = "nk" if nk else "kn"
    if not nk:  # [K, N] tiles keep 16-channel rows
        variant = {k_: v for k_, v in variant.items() if k_ != "block_n"}
    cfg = qm.choose_config(m, k, n, mode, group, block_k=bk, splits=min(splits, k // bk), w_layout=layout, **variant)
    assert cfg is not None and (cfg.block_m >= 16 or cfg.gemv and cfg.block_m >= m)
    y = qm.quant_matmul_pallas(x, *parts, mode=mode, group_size=group, config=cfg, interpret=True, w_layout=layout)
    assert y.shape == (m, n) and y.dtype == x.dtype
    # fp32 activations: exact up to fp32 rounding (the dequantized weights are exact in fp32)
    assert _rel(y, ref) < 1e-5
    assert _rel(qm.quant_matmul_reference(x, *parts, mode=mode, group_size=group, w_layout=layout), ref) < 1e-5


@pytest.mark.parametrize("mode,group,variant", [("int8_wo", None, {}), ("fp8", None, {}), ("int4_wo", 32, {}),
                                                ("int4_wo", 64, {"or_codes": False}),
                                                ("int4_wo", 128, {"or_codes": True, "gemv": True, "defer_sum": True})])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_kernel_16bit_activations(mode, group, variant, dtype):
    """bf16 / f16 activations, weights converted to 16 bits in registers (`or_codes`: int4 codes
    as 128 + q or 1024 + q, the offset removed per group), fp32 accumulation: within 16-bit
    rounding of the dequantized-weights fp32 reference."""
    m = 3 if variant.get("gemv") else 5
    x, parts, ref = _case(np.random.default_rng(3), mode, m, 256, 64, group, dtype)
    cfg = qm.choose_config(m, 256, 64, mode, group, **variant)
    assert cfg.or_codes == variant.get("or_codes", mode == "int4_wo")  # int4's default up to 64 tokens
    y = qm.quant_matmul(x, *parts, mode=mode, group_size=group, impl="interpret", config=cfg)
    assert y.dtype == dtype and _rel(y, ref) < 1e-2


def test_choose_config():
    # decode on the 8B's o_proj: 64 tiles of N leave the 132 SMs idle, split-K fills them
    one = qm.choose_config(1, 4096, 4096, "int8_wo")
    assert one.gemv and one.block_m == 1 and one.splits > 1 and 4096 // one.block_n * one.splits >= 132
    assert 4096 // one.block_k // one.splits >= 4  # every split keeps several K steps
    few = qm.choose_config(8, 4096, 4096, "int8_wo")  # tensor-core tiles from 5 rows on
    assert not few.gemv and few.block_m == 16 and few.splits > 1
    # gate_up is wide enough on its own
    assert qm.choose_config(1, 4096, 28672, "fp8", w_layout="nk").splits <= 2
    big = qm.choose_config(256, 4096, 4096, "int8_wo")
    assert big.block_m >= 64
    cfg = qm.choose_config(1, 4096, 6144, "int4_wo", 128)
    assert cfg.block_k % 128 == 0
    # shapes that do not tile: N not a multiple of 16, int4 groups under 32
    assert qm.choose_config(1, 256, 100, "int8_wo") is None
    assert qm.choose_config(1, 256, 64, "int4_wo", 16) is None


def test_dispatch_auto_and_switch(monkeypatch):
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert qm.resolve_impl("auto", 1, 256, 64, "int8_wo", None, bf16) == "xla"  # CPU
    monkeypatch.setenv("KILN_QMATMUL", "interpret")
    assert qm.resolve_impl("auto", 1, 256, 64, "int8_wo", None, f32) == "interpret"
    assert qm.resolve_impl("xla", 1, 256, 64, "int8_wo", None, f32) == "xla"  # explicit wins
    monkeypatch.setenv("KILN_QMATMUL", "fast")
    with pytest.raises(ConfigError, match="KILN_QMATMUL"):
        qm.resolve_impl("auto", 1, 256, 64, "int8_wo", None, f32)
    with pytest.raises(ConfigError, match="unknown quantized matmul"):
        qm.resolve_impl("triton", 1, 256, 64, "int8_wo", None, f32)
    with pytest.raises(ConfigError, match="does not tile"):
        qm.resolve_impl("pallas", 1, 256, 100, "int8_wo", None, f32)


def _greedy(graph, params, prompt, n):
    st_ = Stepper(graph, params)
    table = st_.new_table()
    out = st_.step([SeqChunk(prompt, 0, table)], pad_tokens=16, pad_seqs=2)
    toks = [int(np.argmax(out[0][-1]))]
    for i in range(n - 1):
        out = st_.step([SeqChunk([toks[-1]], len(prompt) + i, table)], pad_tokens=4, pad_seqs=2)
        toks.append(int(np.argmax(out[0][-1])))
    return toks


@pytest.mark.parametrize("mode", ["int4_wo", "int8_wo", "fp8"])
def test_quantized_model_greedy_kernel_equals_xla(ckpt, monkeypatch, mode):
    """fp8: weights out-major [N, K] (the fp8 pipeline), the W8A16 steps below the W8A8 token
    count through the kernel."""
    graph, params = load_tiny(ckpt)
    g, p = compile_model(graph, params, quantization=mode)
    prompt = [int(t) for t in np.random.default_rng(5).integers(0, 300, 11)]
    monkeypatch.setenv("KILN_QMATMUL", "xla")
    want = _greedy(g, p, prompt, 4)
    monkeypatch.setenv("KILN_QMATMUL", "interpret")
    calls = []
    kernel = qm.quant_matmul_pallas
    monkeypatch.setattr(qm, "quant_matmul_pallas", lambda *a, **kw: calls.append(kw["interpret"]) or kernel(*a, **kw))
    assert _greedy(g, p, prompt, 4) == want
    # every projection (4 per layer, 2 layers) of each traced step went through the kernel
    assert calls and calls == [True] * len(calls) and len(calls) % (4 * 2) == 0


@pytest.mark.parametrize("group", [32, 128])
def test_or_codes_offset_cancels_exactly(group):
    """`or_codes` dots 128 + q and subtracts 128 * sum(x) per group: with activations of large mean
    (sum(x) far above the result) the kernel still sits at bf16 output rounding of the fp64
    reference, closer than the old dequantizing form and than XLA's path (whose weights are
    rounded to bf16 first)."""
    rng = np.random.default_rng(group)
    k, n, m = 512, 64, 5
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    parts = [jnp.asarray(a) for a in qz.quantize_weight("int4_wo", w, group)]
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32) * 3 + 1.0, jnp.bfloat16)
    ref = np.asarray(x, np.float64) @ qz.dequantize("int4_wo", *[np.asarray(a) for a in parts], group=group)

    def err(or_codes):
        cfg = qm.choose_config(m, k, n, "int4_wo", group, or_codes=or_codes)
        assert cfg.or_codes == or_codes
        return _rel(qm.quant_matmul_pallas(x, *parts, mode="int4_wo", group_size=group, config=cfg, interpret=True), ref)

    xla = _rel(qm.quant_matmul_reference(x, *parts, mode="int4_wo", group_size=group), ref)
    assert err(True) < 2.5e-3 and err(True) <= err(False) and err(True) < xla


@pytest.mark.parametrize("mode,variant", [("int4_wo", {"gemv": True, "defer_sum": True}),
                                          ("int4_wo", {"gemv": True, "defer_sum": True, "magic": True}),
                                          ("int4_wo", {"or_codes": True}), ("fp8", {"gemv": True, "defer_sum": True}),
                                          ("int4_wo", {"gemv": True, "defer_sum": True, "or_codes": True})])
def test_lowers_to_triton_for_the_gpu(mode, variant):
    """Each kernel form lowers through Pallas' Triton backend (no GPU needed to lower)."""
    import jax

    sd = jax.ShapeDtypeStruct
    m, k, n, g = (1 if variant.get("gemv") else 16), 512, 256, 128
    cfg = qm.choose_config(m, k, n, mode, g if mode == "int4_wo" else None, **variant)
    if mode == "int4_wo":
        args = (sd((m, k), jnp.bfloat16), sd((k // 2, n), jnp.uint8), sd((k // g, n), jnp.float16),
                sd((k // g, n), jnp.float16))
    else:
        args = (sd((m, k), jnp.bfloat16), sd((k, n), jnp.float8_e4m3fn), sd((n,), jnp.float32))

    def f(*a):
        return qm.quant_matmul_pallas(*a, mode=mode, group_size=g if mode == "int4_wo" else None, config=cfg)

    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
