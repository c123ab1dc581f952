"""Streaming safetensors: sharded checkpoints, dtypes, and sampling through the first LLM."""

import numpy as np
import pytest

from kiln import LLM, SamplingParams
from kiln.models.loader import SafetensorsSource, load_params, open_checkpoint
from kiln.models.registry import build_graph
from tests.helpers import make_hf_checkpoint


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    single, shards = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    model = make_hf_checkpoint("qwen2", single)
    model.save_pretrained(shards, safe_serialization=True, max_shard_size="40KB")
    (single / "tokenizer.json").rename(shards / "tokenizer.json")
    return single, shards


def test_sharded_index_loads_the_same_weights(sharded):
    single, shards = sharded
    assert (shards / "model.safetensors.index.json").exists() and len(list(shards.glob("*.safetensors"))) > 1
    a, b = open_checkpoint(single), open_checkpoint(shards)
    graph = build_graph(a.config, "float32")
    pa, pb = load_params(graph, a.config, a.source), load_params(graph, b.config, b.source)
    assert pa.keys() == pb.keys() == graph.params.keys()
    for k in pa:
        np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]))


def test_params_stream_one_tensor_at_a_time(sharded):
    """`put` sees each tensor once, already in its declared shape and dtype."""
    single, _ = sharded
    ck = open_checkpoint(single)
    graph = build_graph(ck.config, "bfloat16")
    seen = []
    load_params(graph, ck.config, ck.source, put=lambda name, a: seen.append((name, a.shape, str(a.dtype))))
    assert [s[0] for s in seen] == list(graph.params)
    assert all(shape == graph.params[n].type.shape and dt == "bfloat16" for n, shape, dt in seen)
    assert isinstance(ck.source, SafetensorsSource)


def test_bfloat16_runs_and_seeded_sampling_repeats(tiny_checkpoint):
    _, path = tiny_checkpoint
    llm = LLM(str(path), dtype="bfloat16")
    assert llm.params["embed"].dtype == "bfloat16"
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=123)
    a = llm.generate(["the quick brown fox"], sp)[0].outputs[0]
    b = llm.generate(["the quick brown fox"], sp)[0].outputs[0]
    c = llm.generate(["the quick brown fox"], SamplingParams(max_tokens=12, temperature=0.9, seed=7))[0].outputs[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12
    assert c.token_ids != a.token_ids
    assert a.text == llm.tokenizer.decode(a.token_ids, skip_special_tokens=True)
