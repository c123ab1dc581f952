"""Tensor and pipeline parallel steps agree with one device (8 CPU devices, tests/conftest.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kiln.errors import ConfigError
from kiln.graph.ir import TensorType
from kiln.models.loader import load_params, open_checkpoint
from kiln.models.registry import build_graph
from kiln.passes.sharding import TP_RULES, make_mesh, shard_model, validate_layout
from kiln.runtime.batch import SeqChunk, prepare_inputs
from tests.helpers import Stepper, make_hf_checkpoint
from tests.passes.sharding_cases import WIDE_HEADS, greedy, use_sharded


def _load(path):
    ck = open_checkpoint(path)
    graph = build_graph(ck.config, "float32")
    return graph, load_params(graph, ck.config, ck.source)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 2-layer Llama with 8 heads / 8 kv heads, its params and its single-device greedy tokens."""
    path = tmp_path_factory.mktemp("llama_wide")
    make_hf_checkpoint("llama", path, **WIDE_HEADS)
    graph, params = _load(path)
    return graph, params, greedy(Stepper(graph, params))


def _assert_same(got, expected):
    """Identical greedy tokens, and prefill logits equal to fp32 rounding."""
    assert got[0] == expected[0]
    for a, b in zip(got[1], expected[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _hlo(model, graph):
    kv = model.allocate_kv_cache(8, 4, "float32")
    inputs, _ = prepare_inputs([SeqChunk([1, 2, 3], 0, [0, 1])], 4, pad_blocks=2)
    return model.lower_text(model.params, kv, inputs)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel_greedy_matches_one_device(llama, tp):
    graph, params, expected = llama
    model = shard_model(graph, params, tp=tp)
    _assert_same(greedy(use_sharded(Stepper(graph, params), model)), expected)

    # each device holds 1/tp of every split weight, the whole of every replicated one
    shard = lambda name: model.params[name].addressable_shards[0].data.shape  # noqa: E731
    assert shard("layers.0.q_proj.w") == (64, 64 // tp)          # column-parallel
    assert shard("layers.0.gate_proj.w") == (64, 128 // tp)
    assert shard("layers.1.o_proj.w") == (64 // tp, 64)          # row-parallel
    assert shard("layers.1.down_proj.w") == (128 // tp, 64)
    assert shard("embed") == (320 // tp, 64)                     # vocab-parallel
    assert shard("lm_head.w") == (64, 320 // tp)
    assert shard("final_norm.w") == (64,)
    assert len({d for a in model.params.values() for d in a.sharding.device_set}) == tp
    kv = model.allocate_kv_cache(16, 4, "float32")
    assert kv[0]["k"].addressable_shards[0].data.shape == (8 // tp, 16, 4, 8)  # split by kv heads

    hlo = _hlo(model, graph)
    # o_proj and down_proj per layer, plus the vocab-parallel embedding lookup
    assert hlo.count("all-reduce(") >= 2 * 2 + 1
    assert "collective-permute(" not in hlo


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_pipeline_parallel_greedy_matches_one_device(llama, tp, pp):
    graph, params, expected = llama
    model = shard_model(graph, params, tp=tp, pp=pp)
    assert model._layout.shares_one_program()
    _assert_same(greedy(use_sharded(Stepper(graph, params), model)), expected)

    # layer i's weights live on stage i // 1 only: stacked [pp, ...], one row per device
    q = model.params["stage.0.q_proj.w"]
    assert q.shape == (pp, 64, 64)
    assert q.addressable_shards[0].data.shape == (1, 64, 64 // tp)
    assert "layers.0.q_proj.w" not in model.params
    assert model.params["embed"].addressable_shards[0].data.shape == (320 // tp, 64)
    kv = model.allocate_kv_cache(16, 4, "float32")
    assert len(kv) == 1 and kv[0]["k"].addressable_shards[0].data.shape == (1, 8 // tp, 16, 4, 8)

    hlo = _hlo(model, graph)
    assert "collective-permute(" in hlo                       # activations stage -> stage
    if tp > 1:
        assert hlo.count("all-reduce(") >= 2 + 1              # row-parallel o/down in the stage body


def test_pipeline_stages_with_different_layers(tmp_path):
    """Qwen2 with a sliding window on layer 1 only and tied logits: the two stages run
    different programs (switch on the stage index) and still match one device."""
    make_hf_checkpoint("qwen2", tmp_path, **WIDE_HEADS)
    graph, params = _load(tmp_path)
    windows = [kv.sliding_window for kv in graph.kv_layers]
    assert windows[0] != windows[1]
    expected = greedy(Stepper(graph, params), n=3)
    model = shard_model(graph, params, tp=2, pp=2, microbatches=4)
    assert not model._layout.shares_one_program()
    _assert_same(greedy(use_sharded(Stepper(graph, params), model), n=3), expected)


def test_rules_cover_unfused_and_fused_layouts():
    mesh = make_mesh(tp=4, pp=2)
    spec = lambda shape, axes: TP_RULES.spec(TensorType(shape, "float32", axes), mesh)  # noqa: E731
    assert spec((64, 64), ("embed", "heads")) == P(None, "tp")
    assert spec((64, 64), ("heads", "embed")) == P("tp")
    assert spec((320, 64), ("vocab", "embed")) == P("tp")
    assert spec((64, 8, 3, 8), ("embed", "kv_heads", None, None)) == P(None, "tp")   # fused QKV
    assert spec((64, 2, 128), ("embed", None, "mlp")) == P(None, None, "tp")         # fused gate_up
    assert spec((8, 3, 8), ("kv_heads", None, None)) == P("tp")                      # its scales
    assert spec((321, 64), ("vocab", "embed")) == P()   # a vocab tp cannot split stays whole
    assert mesh.shape == {"pp": 2, "tp": 4}


def test_impossible_layouts_fail_at_build_time(llama, tmp_path):
    graph = llama[0]
    with pytest.raises(ConfigError, match=r"tp=3 does not divide the 8 kv heads"):
        shard_model(graph, tp=3)
    with pytest.raises(ConfigError, match=r"pp=3 pipeline stages but .* has only 2 layers"):
        shard_model(graph, pp=3)
    with pytest.raises(ConfigError, match=r"tp=8 x pp=2 needs 16 devices but only 8"):
        shard_model(graph, tp=8, pp=2)
    make_hf_checkpoint("mistral", tmp_path)  # 4 heads, 2 kv heads
    gqa = build_graph(open_checkpoint(tmp_path).config, "float32")
    with pytest.raises(ConfigError, match=r"tp=4 does not divide the 2 kv heads"):
        validate_layout(gqa, 4, 1, len(jax.devices()))
    validate_layout(gqa, 2, 2, len(jax.devices()))  # 2 kv heads, 2 layers: fine


def test_fused_and_quantized_graph_shards(llama):
    """The default pipeline's graph (fused QKV [embed, kv_heads, group + 2, head_dim], fused
    gate_up, add + norm, fp8 weights with per-channel scales) on tp=2 x pp=2 matches the
    same graph on one device."""
    from kiln.passes.pipeline import compile_model

    graph, params = compile_model(llama[0], llama[1], quantization="fp8")
    assert "qkv_proj.w" in " ".join(graph.params)
    expected = greedy(Stepper(graph, params), n=3)
    model = shard_model(graph, params, tp=2, pp=2)
    _assert_same(greedy(use_sharded(Stepper(graph, params), model), n=3), expected)
    qkv = model.params["stage.0.qkv_proj.w"]
    assert qkv.addressable_shards[0].data.shape == (1, 8 // 2, 3, 8, 64)   # split by kv heads (fp8: [*out, in])


def test_cli_prints_the_placement_and_rejects_impossible_layouts(tmp_path, capsys):
    from kiln.cli import main

    make_hf_checkpoint("mistral", tmp_path)  # 4 heads, 2 kv heads, 2 layers
    assert main(["graph", str(tmp_path), "--tp", "2", "--pp", "2"]) == 0
    plan = capsys.readouterr().out
    assert "# stage 1: layers 1..1" in plan
    assert "layers.1.o_proj.w" in plan and "P('tp',)" in plan and "per device (32, 64)" in plan
    assert main(["graph", str(tmp_path), "--tp", "4"]) == 2
    assert "tp=4 does not divide the 2 kv heads" in capsys.readouterr().err
    assert main(["graph", str(tmp_path), "--pp", "3"]) == 2
    assert "pp=3 pipeline stages but MistralForCausalLM has only 2 layers" in capsys.readouterr().err


@pytest.mark.parametrize("microbatches", [2, 3])
def test_pipeline_micro_batches_with_the_attention_kernel(tmp_path, microbatches):
    """The Pallas kernel (interpret mode) reads each sequence's queries from query_start_loc
    and its keys from context_lens: every micro-batch gets them for its own window of tokens
    (a prompt split across micro-batches, decode rows in several). Found on two H200s, where
    the kernel runs by default and pp=2 decoded different tokens from one GPU."""
    make_hf_checkpoint("llama", tmp_path)  # 4 heads / 2 kv heads of dim 16: the kernel's shapes
    graph, params = _load(tmp_path)
    prompts = ([5, 17, 42, 99, 7, 3, 11], [3, 250, 11], [8, 9])
    expected = greedy(Stepper(graph, params), prompts, n=3)
    model = shard_model(graph, params, pp=2, attention="interpret", microbatches=microbatches)
    _assert_same(greedy(use_sharded(Stepper(graph, params), model), prompts, n=3), expected)
