"""Every wider family (Qwen3, Gemma2/3, GPT-2, Phi-3, Mixtral, Qwen2-MoE, Qwen3-MoE) equals
transformers on a tiny random-weight fp32 checkpoint: all-position logits of a padded ragged
prefill batch within 1e-4 relative and 32 greedy tokens of sequences decoding together,
without passes, under the default pass pipeline (fusion), and under it with tp=2 (ep=2 for
the MoE families) on CPU devices; and the public `LLM` API end to end. Family-specific
checks are in test_<family>.py."""

import pytest

from tests.models.arch_helpers import FAMILIES, prompts

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
