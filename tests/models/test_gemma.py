"""Gemma2ForCausalLM and Gemma3ForCausalLM: alternating sliding (window 8) and global layers,
soft-capping (Gemma2), QK-norm and per-layer-kind RoPE (Gemma3); parity in test_families.py."""

import pytest


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_layers_alternate_sliding_and_global(family, name):
    fam = family(name)
    assert [kv.sliding_window for kv in fam.graph.kv_layers] == [8, None]
    ropes = [n.attrs for n in fam.graph.nodes if n.op == "rope" and n.name.endswith("q_rope")]
    ops = fam.graph.op_counts()
    if name == "gemma3":  # local base 10k, global 1M linearly scaled, QK-norm, no soft cap
        assert ropes[0] == {"theta": 10000.0} and ropes[1]["theta"] == 1e6 and ropes[1]["scaling"]["factor"] == 4.0
        assert "softcap" not in ops
    else:  # final soft cap node, attention soft cap attribute
        assert ops["softcap"] == 1
        assert all(n.attrs["soft_cap"] == 5.0 for n in fam.graph.nodes if n.op == "attention")
    assert all(n.attrs.get("offset") == 1.0 for n in fam.graph.nodes if n.op == "rms_norm")  # (1 + w)
