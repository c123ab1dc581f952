"""GPT2LMHeadModel: the fused c_attn split on load, no rotary (parity: test_families.py)."""

import numpy as np


def test_c_attn_split_into_q_k_v(family):
    from safetensors.numpy import load_file

    fam = family("gpt2")
    hf = load_file(str(fam.path / "model.safetensors"))
    for w in ("w", "b"):
        fused = np.concatenate([np.asarray(fam.params[f"layers.1.{p}_proj.{w}"]) for p in "qkv"], axis=-1)
        np.testing.assert_array_equal(fused, hf[f"transformer.h.1.attn.c_attn.{'weight' if w == 'w' else 'bias'}"])
    assert not any(n.op == "rope" for n in fam.graph.nodes)
    assert fam.graph.params["pos_embed"].type.shape == (256, 64)  # learned positions
