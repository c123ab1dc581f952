"""Every wider family (Qwen3, Gemma2/3, GPT-2, Phi-3, Mixtral, Qwen2-MoE, Qwen3-MoE) equals
transformers on a tiny random-weight fp32 checkpoint: all-position logits of a padded ragged
prefill batch within 1e-4 relative and 32 greedy tokens of sequences decoding together,
without passes, under the default pass pipeline (fusion), and under it with tp=2 (ep=2 for
the MoE families) on CPU devices; and the public `LLM` API end to end. Family-specific
checks are in test_<family>.py."""

import pytest

from tests.models.arch_helpers import FAMILIES, prompts, rel_err

MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
CASES = [(name, kind) for name in FAMILIES for kind in ("plain", "pipeline", "pipeline_tp2")]
CASES += [(name, "pipeline_ep2") for name in MOE]


@pytest.mark.parametrize("name,kind", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_matches_transformers(family, name, kind):
    fam = family(name)
    st = fam.variant(kind)
    fam.check_logits(prompts((5, 19, 40)), st)  # 19 and 40 tokens reach past the window of 8 (Gemma)
    fam.check_greedy(prompts((3, 17), seed=3), stepper=st)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_llm_generate(family, name):
    fam = family(name)
    fam.check_llm(prompts((6,), seed=4)[0])  # Phi-3: 6 + 32 tokens cross LongRoPE's switch at 16


# (unfused, fused) matmuls per layer: q, k, v -> qkv, and gate, up -> gate_up where the MLP is gated
# (SwiGLU, GeGLU); MoE layers: q, k, v, o, router -> qkv, o, router
QKV_FUSED = {"qwen3": (7, 4), "qwen3_moe": (5, 3), "gemma3": (7, 4), "phi3": (7, 4)}


@pytest.mark.parametrize("name", list(QKV_FUSED))
def test_qkv_fusion(family, name):
    """QK-norm families (Qwen3, Qwen3-MoE, Gemma3: the per-head norms applied after the split,
    inside qkv_attention) and Phi-3 (LongRoPE folded into it) fuse q, k, v into one matmul too;
    logits equal the unfused graph's on both sides of Phi-3's switch (parity with transformers:
    the pipeline cases above)."""
    from kiln.passes import matmuls_per_layer

    fam = family(name)
    plain, fused = fam.variant("plain"), fam.variant("pipeline")
    n = fam.config.num_layers
    want_unfused, want_fused = QKV_FUSED[name]
    assert [matmuls_per_layer(fam.graph, i) for i in range(n)] == [want_unfused] * n
    assert [matmuls_per_layer(fused.graph, i) for i in range(n)] == [want_fused] * n
    attn = [nd for nd in fused.graph.nodes if nd.op == "qkv_attention"]
    assert len(attn) == n
    if name == "phi3":
        assert all(nd.attrs["rope"]["op"] == "longrope" and nd.inputs[-1] == "seq_lens" for nd in attn)
        assert not any(nd.op == "longrope" for nd in fused.graph.nodes)
    else:
        assert all(nd.attrs["qk_norm"] and nd.inputs[-2].endswith("q_norm.w") for nd in attn)
        assert not any(nd.op == "rms_norm" and nd.name.endswith(("q_norm", "k_norm")) for nd in fused.graph.nodes)
    ids = prompts((5, 19, 40))
    for a, b in zip(fam.batch_logits(ids, fused), fam.batch_logits(ids, plain)):
        assert rel_err(a, b) < 1e-5
