"""The IR: builder shape checks, verifier messages, JSON round-trip, text printing, lowering."""

import dataclasses

import numpy as np
import pytest

from kiln.errors import GraphError
from kiln.graph import Builder, TensorType, dumps, from_json, lower, loads, to_json, to_text, verify
from kiln.models.config import ModelConfig
from kiln.models.registry import build_graph

TINY = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=True,
                   rope_scaling={"rope_type": "linear", "factor": 2.0}, sliding_windows=(None, 4))


def test_json_round_trips_exactly(tmp_path):
    g = build_graph(TINY)
    back = loads(dumps(g))
    assert back == g
    assert to_json(back) == to_json(g)
    from kiln.graph import load, save

    save(g, tmp_path / "g.json")
    assert load(tmp_path / "g.json") == g


def test_verifier_rejects_wrong_shaped_edge():
    g = build_graph(TINY)
    i = next(k for k, n in enumerate(g.nodes) if n.name == "layers.1.o_proj")
    bad = g.copy()
    # feed the MLP-sized activation into o_proj: [T, 48] @ [32, 32]
    bad.nodes[i] = dataclasses.replace(g.nodes[i], inputs=("layers.0.swiglu", "layers.1.o_proj.w"))
    with pytest.raises(GraphError, match=r"node 'layers.1.o_proj' \(linear\): input's last dim 48 does not match"):
        verify(bad)


def test_verifier_rejects_wrong_declared_type_and_undefined_input():
    g = build_graph(TINY)
    bad = g.copy()
    n = bad.nodes[3]
    bad.nodes[3] = dataclasses.replace(n, type=TensorType(("T", 7), n.type.dtype))
    with pytest.raises(GraphError, match=f"node '{n.name}'.*declared type"):
        verify(bad)
    bad = g.copy()
    bad.nodes[0] = dataclasses.replace(bad.nodes[0], inputs=("nope", "token_ids"))
    with pytest.raises(GraphError, match="input 'nope' is not defined"):
        verify(bad)


def test_builder_checks_shapes_where_the_model_is_written():
    b = Builder("bad")
    x = b.embedding(b.param("embed", (10, 8), ("vocab", "embed")), b.input("token_ids"))
    w = b.param("w", (9, 4), ("embed", "mlp"))
    with pytest.raises(GraphError, match="node 'linear' \\(linear\\)"):
        b.linear(x, w)
    with pytest.raises(GraphError, match="unknown op 'frobnicate'"):
        b.frobnicate(x)


def test_text_printer_lists_every_node():
    g = build_graph(TINY)
    text = to_text(g)
    assert text.count(" = ") == len(g.nodes)
    assert "%layers.1.attention = attention(" in text and "sliding_window=4" in text


def test_json_lists_nodes_with_op_names():
    d = to_json(build_graph(TINY))
    ops = [n["op"] for n in d["nodes"]]
    assert ops.count("attention") == 2 and ops.count("linear") == 2 * 7  # tied: no lm_head linear
    assert from_json(d) == build_graph(TINY)


def test_lowered_step_is_pure_and_updates_the_cache():
    import jax
    import jax.numpy as jnp

    from kiln.models.loader import random_params
    from kiln.runtime.batch import SeqChunk, prepare_inputs
    from kiln.runtime.kv_cache import allocate_kv_cache

    g = build_graph(TINY)
    params = random_params(g, seed=0)
    kv = allocate_kv_cache(g, 8, 4, "float32")
    inputs, _ = prepare_inputs([SeqChunk([1, 2, 3], 0, [5, 2])], 4)
    step = jax.jit(lower(g))
    logits, kv2 = step(params, kv, inputs)
    logits_again, _ = step(params, kv, inputs)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(logits_again))  # same inputs, same result
    assert logits.shape == (1, 64)
    written = np.asarray(kv2[0]["k"])  # [kvh, blocks, block_size, d]: tokens 0..2 land in block 5
    assert np.abs(written[:, 5, :3]).sum() > 0 and np.abs(written[:, 5, 3:]).sum() == 0
    assert np.abs(np.delete(written, 5, axis=1)).sum() == 0
    assert jnp.all(kv[0]["k"] == 0)  # the input cache is untouched (no donation here)


def test_window_metadata_describes_each_sequences_tokens_in_the_window():
    """A window of a flat batch (a pipeline micro-batch): each sequence keeps its tokens inside
    the window, placed at the same positions (keys up to the last of them); others get none."""
    from kiln.graph.ops import window_metadata

    rng = np.random.default_rng(0)
    q_lens = np.array([7, 1, 0, 12, 1, 3])
    past = rng.integers(0, 20, q_lens.size)                 # keys already in the cache
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    ctx = (past + q_lens).astype(np.int32)
    total = int(qsl[-1])
    for start, size in [(0, 8), (5, 6), (8, 16), (20, 4), (0, total + 3)]:
        c2, q2 = (np.asarray(a) for a in window_metadata(ctx, qsl, start, size))
        assert q2[0] == 0 and np.all(np.diff(q2) >= 0) and q2[-1] == min(size, total - start)
        for s in range(q_lens.size):
            inside = [t for t in range(qsl[s], qsl[s + 1]) if start <= t < start + size]
            assert q2[s + 1] - q2[s] == len(inside)
            if inside:  # the window's first token of s sits where it sat in the whole batch
                assert q2[s] == inside[0] - start
                assert c2[s] - (q2[s + 1] - q2[s]) == past[s] + inside[0] - qsl[s]
            else:
                assert c2[s] == 0
