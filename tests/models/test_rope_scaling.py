"""RoPE scaling types that transformers supports: linear and dynamic (llama3 is in the parity suite)."""

import numpy as np
import pytest

from kiln.models.loader import load_params, open_checkpoint
from kiln.models.registry import build_graph
from kiln.runtime.batch import SeqChunk
from tests.helpers import Stepper, hf_logits, load_hf, make_hf_checkpoint


def _hf_cached_greedy(hf, ids, n):
    """transformers' own incremental decode with its KV cache (its `generate` misbehaves once the
    prompt is past max_position_embeddings, so the loop is spelled out)."""
    import torch

    gen, past, x = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            out = hf(x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            gen.append(int(out.logits[0, -1].argmax()))
            x = torch.tensor([[gen[-1]]])
    return gen


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0}, {"rope_type": "dynamic", "factor": 2.0}])
def test_rope_scaling_matches_transformers(scaling, tmp_path):
    make_hf_checkpoint("llama", tmp_path, rope_parameters={**scaling, "rope_theta": 10000.0},
                       max_position_embeddings=16)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.config.rope_scaling["rope_type"] == scaling["rope_type"]
    graph = build_graph(ckpt.config, "float32")
    st = Stepper(graph, load_params(graph, ckpt.config, ckpt.source))
    hf = load_hf(tmp_path)
    ids = [int(t) for t in np.random.default_rng(0).integers(0, 300, 24)]  # past the trained 16
    got = st.step([SeqChunk(ids, 0, st.new_table(), all_logits=True)])[0]
    ref = hf_logits(hf, ids)
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-4
    # decode past the trained context, token by token
    table = st.new_table()
    logits = st.step([SeqChunk(ids, 0, table)])[0]
    gen = [int(np.argmax(logits[-1]))]
    for _ in range(7):
        gen.append(int(np.argmax(st.step([SeqChunk([gen[-1]], len(ids) + len(gen) - 1, table)])[0][-1])))
    if scaling["rope_type"] == "dynamic":  # NTK base recomputed per step from the length so far
        assert gen == _hf_cached_greedy(hf, ids, 8)
    else:  # linear is position-independent: teacher-forced full forwards are the reference
        assert gen == [int(np.argmax(hf_logits(hf, ids + gen[:k])[-1])) for k in range(8)]
