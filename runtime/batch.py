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


# -- a scheduled step -> host arrays (the runner only moves them to the device)

@dataclass
class StepBatch:
    step: int
    inputs: dict[str, np.ndarray]    # the STEP_INPUTS, padded; one logits row per sequence
    from_prev: np.ndarray            # [T] row of the previous step's sampled tokens to use, -1 = token_ids
    sampling: dict[str, np.ndarray]  # per-row sampling arrays (see sampling.sample_rows)
    all_greedy: bool
    num_logprobs: int
    num_seqs: int                    # real rows

    @property
    def shape_key(self) -> tuple:
        s = self.sampling
        return (len(self.inputs["token_ids"]), self.inputs["block_tables"].shape[1], self.all_greedy,
                self.num_logprobs, s["output_ids"].shape if "output_ids" in s else None,
                s["prompt_ids"].shape[1] if "prompt_ids" in s else None,
                s["suppress_ids"].shape[1] if "suppress_ids" in s else None)


def build_step(plan, block_size: int, *, max_num_seqs: int, max_blocks: int, min_tokens: int = 16) -> StepBatch:
    """Host arrays for a `SchedulerOutput`. Padding: tokens to a power of two (>= min_tokens),
    sequences to min(tokens, max_num_seqs), blocks per sequence to a power of two (>= 16)
    capped at max_blocks, so few shapes compile. A token whose value is still on the device
    (the previous step's sample) is read there: `from_prev` names its row."""
    from kiln.runtime.sampling_params import MAX_LOGPROBS, request_key

    chunks, seq_chunks = plan.chunks, []
    n_tok = plan.num_tokens
    T = bucket(n_tok, min_tokens)
    S = min(T, max_num_seqs)
    B = min(max_blocks, bucket(max(len(c.req.blocks.block_ids) for c in chunks), 16))
    from_prev = np.full(T, -1, np.int32)
    t = 0
    for c in chunks:
        req, end = c.req, c.start + c.num_tokens
        known = req.all_token_ids[c.start:end]
        if len(known) < c.num_tokens:  # the last token is the previous step's sample
            assert c.num_tokens - len(known) == 1 and req.pending[0][0] == plan.step - 1
            from_prev[t + c.num_tokens - 1] = req.pending[0][1]
            known = known + [0]
        seq_chunks.append(SeqChunk(known, c.start, req.blocks.block_ids))
        t += c.num_tokens
    inputs, _ = prepare_inputs(seq_chunks, block_size, pad_tokens=T, pad_seqs=S, pad_blocks=B, pad_logits=S)

    def rows(fn, dtype, fill=0):
        a = np.full(S, fill, dtype)
        a[:len(chunks)] = [fn(c) for c in chunks]
        return a

    sampling = dict(temperature=rows(lambda c: c.req.params.temperature, np.float32),
                    top_k=rows(lambda c: c.req.params.top_k, np.int32),
                    top_p=rows(lambda c: c.req.params.top_p, np.float32, 1.0),
                    min_p=rows(lambda c: c.req.params.min_p, np.float32))
    keys = np.zeros((S, 2), np.uint32)
    for i, c in enumerate(chunks):
        keys[i] = request_key(c.req.seed, c.req.num_output_tokens - 1 if c.samples else 0)
    sampling["keys"] = keys
    samplers = [c for c in chunks if c.samples]
    if any(c.req.params.uses_penalties for c in samplers):
        sampling.update(_penalty_arrays(chunks, S, plan.step))
    suppress = [sorted(c.req.stop_ids) if c.samples and c.req.num_output_tokens - 1 < c.req.params.min_tokens else []
                for c in chunks]
    if any(suppress):
        ids = np.full((S, bucket(max(len(s) for s in suppress), 4)), -1, np.int32)
        for i, s in enumerate(suppress):
            ids[i, :len(s)] = s
        sampling["suppress_ids"] = ids
    want = [c.req.params.logprobs for c in samplers if c.req.params.logprobs is not None]
    num_logprobs = 0 if not want else (5 if max(want) <= 5 else MAX_LOGPROBS)
    return StepBatch(plan.step, inputs, from_prev, sampling, all(c.req.params.greedy for c in samplers),
                     num_logprobs, len(chunks))


def _penalty_arrays(chunks, S: int, step: int) -> dict[str, np.ndarray]:
    """prompt_ids [S, P], output_ids [S, M] (-1 padding; a still-pending output token is
    marked by output_from_prev, its row in the previous step's samples) and the penalties."""
    P = bucket(max(c.req.num_prompt_tokens for c in chunks), 16)
    M = bucket(max(len(c.req.output_token_ids) for c in chunks), 16)
    prompt, output = np.full((S, P), -1, np.int32), np.full((S, M), -1, np.int32)
    from_prev = np.full(S, -1, np.int32)
    rep, pres, freq = np.ones(S, np.float32), np.zeros(S, np.float32), np.zeros(S, np.float32)
    for i, c in enumerate(chunks):
        req = c.req
        prompt[i, :req.num_prompt_tokens] = req.prompt_token_ids
        out = req.output_token_ids
        output[i, :len(out)] = out
        older = [row for s, row in req.pending if s < step]
        if older:
            from_prev[i] = older[0]
        rep[i], pres[i], freq[i] = req.params.repetition_penalty, req.params.presence_penalty, req.params.frequency_penalty
    return dict(prompt_ids=prompt, output_ids=output, output_from_prev=from_prev, repetition=rep,
                presence=pres, frequency=freq)
