"""Shared setup for the sharding tests: a tiny checkpoint with enough heads to split eight
ways, and greedy decoding of a ragged batch through any step (single device or sharded)."""

from __future__ import annotations

import numpy as np

from kiln.runtime.batch import SeqChunk

# 8 query heads and 8 kv heads of dim 8: tp = 2, 4 and 8 all divide them
WIDE_HEADS = dict(num_attention_heads=8, num_key_value_heads=8)
PROMPTS = ([5, 17, 42, 99, 7], [3, 250, 11])
# two processes x 2 CPU devices: tp=4 all-reduces across processes; tp=2 x pp=2 puts a stage on each
MP_LAYOUTS = ((4, 1), (2, 2))


def greedy(stepper, prompts=PROMPTS, n: int = 5) -> tuple[list[list[int]], list[np.ndarray]]:
    """Prefill all prompts in one ragged step, then decode them together for n - 1 steps.
    Returns (tokens per prompt, the prefill's last-token logits per prompt). `stepper` is a
    tests.helpers.Stepper (its step_fn/params/kv may be a sharded model's)."""
    tables = [stepper.new_table() for _ in prompts]
    chunks = [SeqChunk(list(p), 0, t) for p, t in zip(prompts, tables)]
    out = [[] for _ in prompts]
    lens = [len(p) for p in prompts]
    first = None
    for _ in range(n):
        logits = stepper.step(chunks)
        first = first if first is not None else [row[-1] for row in logits]
        for i, row in enumerate(logits):
            out[i].append(int(np.argmax(row[-1])))
        chunks = [SeqChunk([o[-1]], lens[i] + len(o) - 1, tables[i]) for i, o in enumerate(out)]
    return out, first


def use_sharded(stepper, model):
    """Point a Stepper at a ShardedModel: its placed params, a sharded KV cache and its step."""
    stepper.params = model.params
    stepper.kv = model.allocate_kv_cache(stepper.kv[0]["k"].shape[1], stepper.block_size, "float32")
    stepper.step_fn = model.step
    return stepper
