"""Perplexity of the default model (SmolLM2-135M-Instruct) on the fixed excerpt under the
shipped quantization rows of BENCHMARKS.md "SmolLM2-135M perplexity with GPTQ" (window 512,
stride 256: fp8 runs its W8A8 path; the W8A16 row raises FP8_W8A8_MIN_TOKENS above the window,
the weight-only path that steps below 256 tokens take).

- int4_wo at its default group (the grid the weights already lie on: 32) reproduces the
  checkpoint exactly: the shipped GGUF stores every projection as Q4_1 (asymmetric, 32-weight
  groups along the input dim, f16 scale and min).
- fp8 with GPTQ (calibrated on the shipped passes/calibration.txt, not the excerpt): W8A16
  within the 1% target. W8A8 misses it on this model (+1.8% to +1.9%; +1.5% on 4k tokens of
  other text): the per-token e4m3 rounding of the activations is spread over every matmul,
  and no small set of them kept in 16 bits recovers it (BENCHMARKS.md)."""

from pathlib import Path

import numpy as np
import pytest

from kiln.passes import compile_model
from kiln.passes import ops as qops
from kiln.passes import quantize as qz
from kiln.runtime.evaluate import perplexity_of_ids

EXCERPT = Path(__file__).parent.parent / "data" / "alice_chapter1_excerpt.txt"
SMOLLM2_FP32_PPL = 24.2096   # tests/runtime/test_evaluate.py


@pytest.fixture(scope="module")
def fused(smollm2):
    _, graph, params, tok = smollm2
    g, p = compile_model(graph, {k: np.asarray(v) for k, v in params.items()})
    return g, p, tok


def _ppl(g, p, tok, w8a16=False):
    ids = tok.encode(EXCERPT.read_text(encoding="utf-8"))
    saved = qops.FP8_W8A8_MIN_TOKENS
    qops.FP8_W8A8_MIN_TOKENS = 10 ** 9 if w8a16 else saved
    try:
        return perplexity_of_ids(g, p, ids, window=512, stride=256)
    finally:
        qops.FP8_W8A8_MIN_TOKENS = saved


def test_int4_default_reproduces_the_q4_1_checkpoint(fused):
    """int4_wo at its default group finds the checkpoint's own grid (Q4_1, 32-groups: not 64,
    the largest of 128/64/32 dividing 576, whose re-rounding costs +19% to +32% perplexity
    whatever the calibration; BENCHMARKS.md), and every projection's codes decode to the
    checkpoint's weights (so the perplexity is the float graph's: 24.2096 for both)."""
    g, p, tok = fused
    gq, pq = compile_model(g, p, quantization="int4_wo")
    nodes = [n for n in gq.nodes if n.op == "qlinear"]
    assert len(nodes) == 4 * 30 and all(n.attrs["group_size"] == 32 for n in nodes)
    for n in nodes:
        deq = qz.dequantize("int4_wo", *[pq[i] for i in n.inputs[1:4]], group=32)
        np.testing.assert_allclose(deq, p[n.inputs[1]], rtol=1e-3, atol=1e-6, err_msg=n.name)


def test_fp8_gptq_w8a16_within_one_percent(fused):
    """GPTQ on the first 4 x 512 tokens of the shipped calibration text (the table's row uses
    all of it); W8A8 (not asserted here: one more perplexity pass) misses 1% (BENCHMARKS.md)."""
    g, p, tok = fused
    gq, pq = compile_model(g, p, quantization="fp8", calibration=qz.calibration_prompts(tok, max_prompts=4))
    assert not any(n.attrs.get("smooth") for n in gq.nodes if n.op == "qlinear")   # gptq, the default with prompts
    r = _ppl(gq, pq, tok, w8a16=True)
    assert abs(r.perplexity / SMOLLM2_FP32_PPL - 1) < 0.01, r
