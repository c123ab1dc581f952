"""Fusion passes keep logits equal to the unfused graph and cut the matmuls per layer 7 -> 4."""

import pytest

from kiln.passes import PipelineOptions, build_passes, matmuls_per_layer, run_pipeline
from tests.passes.util import load_tiny, rel_err, run_workload

FUSION_PASSES = ("fold_rope", "fuse_qkv", "fuse_gate_up", "fuse_add_norm")


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    arch, path = tiny_checkpoint
    graph, params = load_tiny(path)
    return arch, graph, params, run_workload(graph, params)


def _upto(name):
    """The default pipeline's passes up to `name`, without the leading cleanup."""
    names = [p.name for p in build_passes(PipelineOptions())]
    return [p for p in build_passes(PipelineOptions())[names.index(FUSION_PASSES[0]):names.index(name) + 1]]


@pytest.mark.parametrize("name", FUSION_PASSES)
def test_each_fusion_pass_keeps_logits(model, name):
    """After each pass of the pipeline (applied in order), logits equal the unfused graph's."""
    _, graph, params, ref = model
    before, _ = run_pipeline(graph, None, passes=_upto(name)[:-1])
    g, p = run_pipeline(graph, params, passes=_upto(name))
    assert g.op_counts() != before.op_counts(), f"{name} did not fire"
    assert rel_err(run_workload(g, p), ref) < 1e-5


def test_default_pipeline_keeps_logits_and_fuses(model):
    arch, graph, params, ref = model
    g, p = run_pipeline(graph, params)
    n_layers = graph.meta["num_layers"]
    assert [matmuls_per_layer(graph, i) for i in range(n_layers)] == [7] * n_layers
    assert [matmuls_per_layer(g, i) for i in range(n_layers)] == [4] * n_layers
    ops = g.op_counts()
    assert ops["qkv_attention"] == n_layers and ops["swiglu"] == n_layers
    assert "rope" not in ops and "attention" not in ops and "silu" not in ops
    # every residual add feeding a norm is fused; the last layer's second add stays (no norm after it)
    # except where it feeds the final norm
    assert ops["add_rms_norm"] == 2 * n_layers and "rms_norm" in ops  # layer 0's first norm reads the embedding
    # fused weights replace the separate ones; layouts the sharding rules rely on
    assert "layers.0.q_proj.w" not in p and "layers.0.gate_proj.w" not in p
    qkv = g.params["layers.0.qkv_proj.w"].type
    assert qkv.shape == (64, 2, 4, 16) and qkv.axes == ("embed", "kv_heads", None, None)
    assert g.params["layers.0.gate_up_proj.w"].type.axes == ("embed", None, "mlp")
    assert (arch == "qwen2") == ("layers.0.qkv_proj.b" in p)
    assert rel_err(run_workload(g, p), ref) < 1e-5


def test_pipeline_without_weights_and_print_after_all(model, capsys):
    _, graph, _, _ = model
    g, p = run_pipeline(graph, None, print_after_all=True)
    assert p is None
    text = capsys.readouterr().out
    for name in ("input", *FUSION_PASSES, "dce"):
        assert f"# ---- after {name}" in text or name == "input"
    assert "7 matmuls in layer 0" in text and "4 matmuls in layer 0" in text
