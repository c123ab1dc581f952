"""Kiln equals transformers (fp32, eager attention) on tiny random-weight checkpoints."""

import numpy as np
import pytest

from kiln import LLM, SamplingParams
from kiln.models.loader import load_params, open_checkpoint
from kiln.models.registry import build_graph
from kiln.runtime.batch import SeqChunk
from tests.helpers import Stepper, hf_greedy, hf_logits, load_hf

PROMPT_LENS = (1, 5, 13, 30)


def _prompts(lens, seed=1, vocab=300):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, n)] for n in lens]


def _rel_err(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    arch, path = tiny_checkpoint
    ckpt = open_checkpoint(path)
    graph = build_graph(ckpt.config, "float32")
    return arch, path, graph, load_params(graph, ckpt.config, ckpt.source), load_hf(path)


def test_logits_one_at_a_time(loaded):
    _, _, graph, params, hf = loaded
    st = Stepper(graph, params)
    for ids in _prompts(PROMPT_LENS):
        got = st.step([SeqChunk(ids, 0, st.new_table(), all_logits=True)])[0]
        assert _rel_err(got, hf_logits(hf, ids)) < 1e-4


def test_logits_ragged_batch(loaded):
    _, _, graph, params, hf = loaded
    st = Stepper(graph, params)
    prompts = _prompts(PROMPT_LENS, seed=2)
    outs = st.step([SeqChunk(ids, 0, st.new_table(), all_logits=True) for ids in prompts],
                   pad_tokens=64, pad_seqs=8)  # padding tokens and sequences must not disturb real ones
    for ids, got in zip(prompts, outs):
        assert _rel_err(got, hf_logits(hf, ids)) < 1e-4


def test_greedy_32_tokens_alone(loaded):
    _, path, _, _, hf = loaded
    llm = LLM(str(path), dtype="float32")
    sp = SamplingParams(max_tokens=32, temperature=0.0)
    for ids in _prompts((3, 17), seed=3):
        out = llm.generate([ids], sp)[0]
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == hf_greedy(hf, ids, 32)
        assert out.outputs[0].finish_reason == "length"


def test_greedy_32_tokens_batched(loaded):
    """Several sequences decode together in one ragged step, each equal to transformers."""
    _, _, graph, params, hf = loaded
    st = Stepper(graph, params)
    prompts = _prompts((2, 9, 21), seed=4)
    tables = [st.new_table() for _ in prompts]
    chunks = [SeqChunk(ids, 0, t) for ids, t in zip(prompts, tables)]
    gen = [[] for _ in prompts]
    for _ in range(32):
        logits = st.step(chunks, pad_tokens=32, pad_seqs=4)
        for i, row in enumerate(logits):
            gen[i].append(int(np.argmax(row[-1])))
        chunks = [SeqChunk([g[-1]], len(p) + len(g) - 1, t) for p, g, t in zip(prompts, gen, tables)]
    for ids, g in zip(prompts, gen):
        assert g == hf_greedy(hf, ids, 32)


def test_chunked_prefill_and_decode_agree(loaded):
    """All at once, in chunks, and token by token: the same logits for every position."""
    _, _, graph, params, _ = loaded
    st = Stepper(graph, params)
    ids = _prompts((23,), seed=5)[0]
    whole = st.step([SeqChunk(ids, 0, st.new_table(), all_logits=True)])[0]
    table = st.new_table()
    chunked = [st.step([SeqChunk(ids[s:s + 7], s, table, all_logits=True)])[0] for s in range(0, len(ids), 7)]
    table = st.new_table()
    single = [st.step([SeqChunk([t], i, table)])[0] for i, t in enumerate(ids)]
    np.testing.assert_allclose(np.concatenate(chunked), whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(single), whole, rtol=1e-5, atol=1e-5)


def test_mixed_prefill_and_decode_in_one_step(loaded):
    """One step holding a decode token of one sequence and a prefill chunk of another."""
    _, _, graph, params, hf = loaded
    st = Stepper(graph, params)
    a, b = _prompts((11, 6), seed=6)
    ta, tb = st.new_table(), st.new_table()
    st.step([SeqChunk(a[:-1], 0, ta)])
    outs = st.step([SeqChunk(a[-1:], len(a) - 1, ta, all_logits=True), SeqChunk(b, 0, tb, all_logits=True)])
    assert _rel_err(outs[0][-1], hf_logits(hf, a)[-1]) < 1e-4
    assert _rel_err(outs[1], hf_logits(hf, b)) < 1e-4
