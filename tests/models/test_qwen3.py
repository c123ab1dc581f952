"""Qwen3ForCausalLM: QK-norm (parity with transformers: test_families.py)."""


def test_graph_norms_q_and_k_per_head(family):
    fam = family("qwen3")
    norms = [n for n in fam.graph.nodes if n.name.endswith(("q_norm", "k_norm"))]
    assert len(norms) == 2 * fam.config.num_layers
    assert all(n.op == "rms_norm" and n.type.shape[-1] == fam.config.head_dim for n in norms)
