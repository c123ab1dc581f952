"""Host-side construction of one step's inputs (plain numpy, no jax).

A step runs a flat ragged batch: each `SeqChunk` contributes its new tokens, contiguous.

    flat tokens:   | seq0: t t t t | seq1: t | seq2: t t | pad pad |
    positions:       7 8 9 10        31       0 1        0   0
    slot_mapping:    block_table[pos // bs] * bs + pos % bs      -1 for pad

Shapes are padded up to buckets so that each bucket compiles once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SeqChunk:
    token_ids: list[int]        # the new tokens of this sequence in this step
    start_pos: int              # position of token_ids[0] (= tokens already in the cache)
    block_table: list[int]      # KV blocks of this sequence, enough for start_pos + len(token_ids)
    all_logits: bool = False    # logits for every new token, not only the last


def bucket(n: int, minimum: int = 8) -> int:
    """The smallest power of two >= n (at least `minimum`)."""
    b = minimum
    while b < n:
        b *= 2
    return b


def prepare_inputs(chunks: list[SeqChunk], block_size: int, *, pad_tokens: int | None = None,
                   pad_seqs: int | None = None, pad_blocks: int | None = None,
                   pad_logits: int | None = None) -> tuple[dict[str, np.ndarray], list[int]]:
    """Build the step inputs. Returns (inputs, rows): `rows[i]` is how many logits rows chunk i
    owns, in order, at the front of the logits output."""
    n_tok = sum(len(c.token_ids) for c in chunks)
    T = pad_tokens or n_tok
    S = pad_seqs or len(chunks)
    B = pad_blocks or max(1, max(len(c.block_table) for c in chunks))
    assert T >= n_tok and S >= len(chunks) and B >= max(len(c.block_table) for c in chunks)

    token_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    seq_ids = np.zeros(T, np.int32)
    slots = np.full(T, -1, np.int32)
    tables = np.zeros((S, B), np.int32)
    ctx_lens = np.zeros(S, np.int32)
    qsl = np.full(S + 1, n_tok, np.int32)
    logits_idx, rows = [], []
    t = 0
    for s, c in enumerate(chunks):
        n = len(c.token_ids)
        pos = np.arange(c.start_pos, c.start_pos + n, dtype=np.int32)
        table = np.asarray(c.block_table, np.int32)
        token_ids[t:t + n] = c.token_ids
        positions[t:t + n] = pos
        seq_ids[t:t + n] = s
        slots[t:t + n] = table[pos // block_size] * block_size + pos % block_size
        tables[s, :len(table)] = table
        ctx_lens[s] = c.start_pos + n
        qsl[s] = t
        idx = list(range(t, t + n)) if c.all_logits else [t + n - 1]
        logits_idx += idx
        rows.append(len(idx))
        t += n
    L = pad_logits or len(logits_idx)
    logits_indices = np.zeros(L, np.int32)
    logits_indices[:len(logits_idx)] = logits_idx
    inputs = dict(token_ids=token_ids, positions=positions, seq_ids=seq_ids, slot_mapping=slots,
                  block_tables=tables, context_lens=ctx_lens, query_start_loc=qsl, logits_indices=logits_indices)
    return inputs, rows
