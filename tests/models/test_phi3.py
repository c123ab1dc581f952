"""Phi3ForCausalLM: fused qkv / gate_up split on load, partial LongRoPE (parity: test_families.py).

The tiny model's trained context is 16 tokens: a prompt shorter than that starts on the short
factors and switches to the long ones while generating. transformers' generate recomputes the
cache at that step; `graph.meta["kv_recompute_past"]` makes Kiln's scheduler do the same
(runtime/scheduler.py), and the Stepper loop of test_families.py does it by hand."""

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


# -- past the switch through the runtime: the scheduler recomputes a sequence's cache when it
# grows past 16 tokens, a prompt already past it is rotated with the long factors in every
# chunk of its prefill, and the prefix cache keeps blocks of the two variants apart

def _hf_generate(model, ids, n):
    """transformers' generate: its greedy tokens and the log-softmax of each step's logits."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    logp = [torch.log_softmax(step[0].float(), -1).numpy() for step in out.logits]
    return out.sequences[0, len(ids):].tolist(), logp


def test_llm_past_the_switch_matches_transformers_generate(family):
    from kiln import LLM, SamplingParams
    from tests.models.arch_helpers import prompts

    fam = family("phi3")
    short, at_switch, long_ = prompts((6, 16, 21), seed=7)
    shared = long_[:12]  # a short prompt whose blocks a longer one must not take (other factors)
    cases = [short, at_switch, long_, shared]
    llm = LLM(str(fam.path), dtype="float32", kv_block_size=4, max_num_tokens=8, max_num_seqs=4, max_model_len=64,
              num_kv_blocks=96, enable_prefix_caching=True, attention="reference")
    outs = llm.generate(cases, SamplingParams(max_tokens=24, temperature=0.0, logprobs=5))
    for ids, out in zip(cases, outs):
        ref_tokens, ref_logp = _hf_generate(fam.hf, ids, 24)
        got = out.outputs[0]
        assert got.token_ids == ref_tokens, f"prompt of {len(ids)} tokens"
        for step, (lp, ref) in enumerate(zip(got.logprobs, ref_logp)):
            top = sorted(lp)
            err = np.max(np.abs(np.array([lp[t] for t in top]) - ref[top])) / np.max(np.abs(ref))
            assert err < 1e-4, f"prompt of {len(ids)} tokens, step {step}: relative error {err:.2e}"
    # the three prompts at most 16 tokens long crossed while generating: each was recomputed once
    assert llm.engine.scheduler.num_recomputes == 3


def test_scheduler_recomputes_at_the_switch_and_salts_the_prefix_cache():
    from kiln.runtime.block_manager import BlockManager
    from kiln.runtime.request import Request
    from kiln.runtime.sampling_params import SamplingParams
    from kiln.runtime.scheduler import Scheduler

    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_tokens=64, rope_switch=8)
    req = Request("a", list(range(8)), SamplingParams(max_tokens=4), 0, frozenset())
    sched.add(req)
    out = sched.schedule()
    assert [(c.start, c.num_tokens, c.seq_len) for c in out.chunks] == [(0, 8, 8)]
    first_blocks = list(req.blocks.block_ids)
    req.resolve(100)  # the 9th token: the sequence is past the switch
    out = sched.schedule()
    # recomputed whole (9 tokens, long factors), in fresh blocks
    assert [(c.start, c.num_tokens, c.seq_len, c.samples) for c in out.chunks] == [(0, 9, 9, True)]
    assert sched.num_recomputes == 1 and not set(req.blocks.block_ids) & set(first_blocks)
    # a long prompt with the same first 8 tokens finds the long blocks, a short one the short blocks
    long_hit = bm.lookup(list(range(8)) + [100, 5], salt=1)
    short_hit = bm.lookup(list(range(8)) + [5], salt=0)
    assert long_hit == req.blocks.block_ids[:2] and short_hit == first_blocks[:2]
    assert bm.lookup(list(range(8)) + [5]) == []  # unsalted (no switch) tables are a third chain
