"""A stand-in for the device runner: a deterministic "model" over a simulated paged KV cache.

It writes each token (with its position) at its slot and predicts the next token from the
tokens that the sequence's block table shows for positions < context length, so a wrong
block table, a block shared or reused too early, or a lost token changes the outputs. No jax:
host-side tests run in milliseconds.
"""

from __future__ import annotations

import numpy as np


def next_token(tokens, vocab: int, key=None, temperature: float = 0.0) -> int:
    h = 7
    for t in tokens:
        h = (h * 1_000_003 + int(t) + 1) % (1 << 61)
    if temperature > 0:  # "sampling": depends on the key as well
        h = (h * 31 + int(key[0]) * 1_000_033 + int(key[1]) * 7919) % (1 << 61)
    return h % vocab


def reference(prompt, max_tokens, vocab, stop_ids=(), seed=None, temperature=0.0):
    """What a request alone must produce (greedy, or seeded 'sampling')."""
    toks, out = list(prompt), []
    while len(out) < max_tokens:
        t = next_token(toks, vocab, (seed or 0, len(out)), temperature)
        out.append(t)
        toks.append(t)
        if t in stop_ids:
            break
    return out


class FakeRunner:
    def __init__(self, *, num_blocks, block_size, max_num_seqs, max_model_len, vocab=97):
        self.num_blocks, self.block_size, self.max_num_seqs, self.vocab = num_blocks, block_size, max_num_seqs, vocab
        self.max_blocks = -(-max_model_len // block_size)
        self.kv = {}
        self.prev = np.zeros(max_num_seqs, np.int32)
        self.prev_step = -1
        self.batches = []

    def execute(self, batch):
        inp = batch.inputs
        if batch.from_prev.max() >= 0:
            assert self.prev_step == batch.step - 1
        tok = np.where(batch.from_prev >= 0, self.prev[np.maximum(batch.from_prev, 0)], inp["token_ids"])
        for t, slot in enumerate(inp["slot_mapping"]):
            if slot >= 0:
                self.kv[int(slot)] = (int(tok[t]), int(inp["positions"][t]))
        out = np.zeros(self.max_num_seqs, np.int32)
        s = batch.sampling
        for r in range(batch.num_seqs):
            table, ctx = inp["block_tables"][r], int(inp["context_lens"][r])
            seq = []
            for p in range(ctx):
                t, pos = self.kv[int(table[p // self.block_size]) * self.block_size + p % self.block_size]
                assert pos == p, "a block table points at another sequence's K/V"
                seq.append(t)
            out[r] = next_token(seq, self.vocab, s["keys"][r], float(s["temperature"][r]))
        self.prev, self.prev_step = out, batch.step
        self.batches.append(batch)
        return {"tokens": out}

    @staticmethod
    def read(handle):
        return handle
