"""Phi3ForCausalLM: fused qkv / gate_up split on load, partial LongRoPE (parity: test_families.py).

The tiny model's trained context is 16 tokens: a prompt shorter than that starts on the short
factors and switches to the long ones while generating. transformers recomputes the cache at
that step; `graph.meta["kv_recompute_past"]` tells a runtime to do the same, and the batched
greedy check in test_families.py (a 3-token prompt) does."""

import numpy as np


def test_graph_uses_partial_longrope(family):
    fam = family("phi3")
    ropes = [n for n in fam.graph.nodes if n.op == "longrope"]
    assert len(ropes) == 2 * fam.config.num_layers
    assert ropes[0].attrs["rotary_dim"] == fam.config.head_dim // 2
    assert ropes[0].attrs["attention_factor"] > 1.0  # factor 256 / 16 scales cos and sin
    assert fam.graph.meta["kv_recompute_past"] == 16


def test_fused_projections_split_on_load(family):
    from safetensors.numpy import load_file

    fam = family("phi3")
    hf = load_file(str(fam.path / "model.safetensors"))
    qkv = np.concatenate([np.asarray(fam.params[f"layers.0.{p}_proj.w"]) for p in "qkv"], axis=1)
    np.testing.assert_array_equal(qkv.T, hf["model.layers.0.self_attn.qkv_proj.weight"])
    gate_up = np.concatenate([np.asarray(fam.params[f"layers.0.{p}_proj.w"]) for p in ("gate", "up")], axis=1)
    np.testing.assert_array_equal(gate_up.T, hf["model.layers.0.mlp.gate_up_proj.weight"])


def test_logits_on_both_sides_of_the_switch(family):
    family("phi3").check_logits([[7] * 16, list(range(3, 20))])  # 16 tokens: short factors; 17: long
