"""The step builder's persistent per-slot arrays equal a from-scratch per-sequence build,
step after step, while slots are reused, tables grow, sequences are preempted and forked."""

import numpy as np

from kiln.runtime.batch import SeqChunk, bucket, prepare_inputs, token_bucket
from kiln.runtime.sampling_params import SamplingParams, request_key
from tests.runtime.test_engine import BS, VOCAB, make_engine, workload


def reference_batch(plan, max_num_seqs, max_blocks):
    """What the step inputs must be: built per sequence from the plan with `prepare_inputs`."""
    chunks = []
    for c in plan.chunks:
        toks = list(c.req.all_token_ids[c.start:c.start + c.num_tokens])
        toks += [0] * (c.num_tokens - len(toks))  # a token still on the device
        chunks.append(SeqChunk(toks, c.start, list(c.req.blocks.block_ids), seq_len=c.seq_len))
    T = token_bucket(plan.num_tokens)
    S = min(T, max_num_seqs)
    B = min(max_blocks, bucket(max(len(c.block_table) for c in chunks), 16))
    inputs, _ = prepare_inputs(chunks, BS, pad_tokens=T, pad_seqs=S, pad_blocks=B, pad_logits=S)
    keys = np.zeros((S, 2), np.uint32)
    for i, c in enumerate(plan.chunks):
        keys[i] = request_key(c.req.seed, c.req.num_output_tokens - 1 if c.samples else 0)
    temps = np.zeros(S, np.float32)
    temps[:len(chunks)] = [c.req.params.temperature for c in plan.chunks]
    return inputs, keys, temps


def test_builder_equals_per_sequence_build():
    eng = make_engine(num_blocks=24, max_num_seqs=6, max_num_tokens=16)
    checked = []
    build = eng.builder.build

    def checked_build(plan):
        batch = build(plan)
        want, keys, temps = reference_batch(plan, eng.runner.max_num_seqs, eng.runner.max_blocks)
        for name, a in want.items():
            b = batch.inputs[name]
            if name == "block_tables":  # only the entries a sequence owns are defined
                b = np.where(np.arange(b.shape[1])[None, :] < [[len(c.req.blocks.block_ids)] for c in plan.chunks]
                             + [[0]] * (b.shape[0] - len(plan.chunks)), b, 0)
            np.testing.assert_array_equal(b, a, err_msg=f"step {plan.step}: {name}")
        np.testing.assert_array_equal(batch.sampling["keys"], keys)
        np.testing.assert_array_equal(batch.sampling["temperature"], temps)
        checked.append(len(plan.chunks))
        return batch

    eng.builder.build = checked_build
    reqs = workload(40, seed=3)
    reqs += [([1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams(n=3, max_tokens=9, temperature=0.7, seed=11)),
             ([4] * 13, SamplingParams(max_tokens=20, temperature=1.0, top_k=5))]
    for p, sp in reqs:
        eng.add_request(p, sp)
    while eng.has_unfinished():
        eng.step()
    assert eng.stats().preemptions > 0 and len(checked) > 50 and max(checked) == 6
    assert sorted(eng.scheduler._free_slots) == list(range(6))  # every slot came back


def test_packed_step_inputs_round_trip():
    """The runner sends a step's host arrays as one flat array per dtype (`pack_step`); the
    jitted step slices them back (`unpack_step`): every array bit for bit, the layout static."""
    import jax

    from kiln.runtime.runner import pack_step, unpack_step

    eng = make_engine(num_blocks=24, max_num_seqs=6, max_num_tokens=16)
    batches = []
    build = eng.builder.build
    eng.builder.build = lambda plan: batches.append(build(plan)) or batches[-1]
    eng.add_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=4, temperature=0.7, top_k=5, seed=1,
                                                    repetition_penalty=1.2))
    eng.add_request([6] * 11, SamplingParams(max_tokens=3))
    while eng.has_unfinished():
        eng.step()
    assert len(batches) >= 3
    for b in batches:
        layout, packs = pack_step(b)
        dtypes = {np.dtype(a.dtype).str for a in [*b.inputs.values(), b.from_prev, *b.sampling.values()]}
        assert len(packs) == len(dtypes) == len(layout[0])  # one host array per dtype
        for got in (unpack_step(packs, layout), jax.jit(unpack_step, static_argnums=1)(packs, layout)):
            assert sorted(got["inputs"]) == sorted(b.inputs) and sorted(got["sampling"]) == sorted(b.sampling)
            np.testing.assert_array_equal(np.asarray(got["from_prev"]), b.from_prev)
            for where in ("inputs", "sampling"):
                for k, a in getattr(b, where).items():
                    g = np.asarray(got[where][k])
                    assert g.dtype == a.dtype and g.shape == a.shape, (where, k)
                    np.testing.assert_array_equal(g, a)
        assert pack_step(b)[0] == layout and hash(layout)  # hashable: a static argument of the step
