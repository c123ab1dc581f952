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
    seq_len: int | None = None  # the sequence's whole length (None: start_pos + len(token_ids))


def bucket(n: int, minimum: int = 8) -> int:
    """The smallest power of two >= n (at least `minimum`)."""
    b = minimum
    while b < n:
        b *= 2
    return b


def token_bucket(n: int, minimum: int = 16) -> int:
    """A step's padded token count: 1 for a single token (batch-1 decode: its matmuls run as
    M = 1), else the smallest power of two >= n (at least `minimum`)."""
    return 1 if n == 1 else bucket(n, minimum)


def layout(starts: np.ndarray, lens: np.ndarray, tables: np.ndarray, block_size: int, T: int, S: int,
           seq_lens: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The position-derived STEP_INPUTS of R sequences in one numpy pass (no per-sequence
    Python): sequence r computes `lens[r]` tokens from position `starts[r]` with block table
    `tables[r]` ([R, B]) and is `seq_lens[r]` tokens long in all (default: `starts + lens`);
    padded to T tokens and S sequences. Token ids and logits indices are the caller's."""
    R, n_tok = len(lens), int(lens.sum())
    qsl = np.full(S + 1, n_tok, np.int32)
    qsl[0] = 0
    np.cumsum(lens, out=qsl[1:R + 1])
    positions = np.zeros(T, np.int32)
    seq_ids = np.zeros(T, np.int32)
    slots = np.full(T, -1, np.int32)
    if n_tok == R:  # decode only: one token per sequence
        seq, pos = np.arange(R), starts
    else:
        seq = np.repeat(np.arange(R, dtype=np.int32), lens)
        pos = np.arange(n_tok, dtype=np.int32) - qsl[seq] + starts[seq]
    positions[:n_tok], seq_ids[:n_tok] = pos, seq
    slots[:n_tok] = tables[seq, pos // block_size] * block_size + pos % block_size
    block_tables = np.zeros((S, tables.shape[1]), np.int32)
    block_tables[:R] = tables
    ctx = np.zeros(S, np.int32)
    ctx[:R] = starts + lens
    total = ctx.copy()
    if seq_lens is not None:
        total[:R] = np.maximum(seq_lens, ctx[:R])
    return dict(positions=positions, seq_ids=seq_ids, slot_mapping=slots, block_tables=block_tables,
                context_lens=ctx, seq_lens=total, query_start_loc=qsl)


def prepare_inputs(chunks: list[SeqChunk], block_size: int, *, pad_tokens: int | None = None,
                   pad_seqs: int | None = None, pad_blocks: int | None = None,
                   pad_logits: int | None = None) -> tuple[dict[str, np.ndarray], list[int]]:
    """Build the step inputs. Returns (inputs, rows): `rows[i]` is how many logits rows chunk i
    owns, in order, at the front of the logits output."""
    lens = np.array([len(c.token_ids) for c in chunks], np.int32)
    n_tok = int(lens.sum())
    T = pad_tokens or n_tok
    S = pad_seqs or len(chunks)
    B = pad_blocks or max(1, max(len(c.block_table) for c in chunks))
    assert T >= n_tok and S >= len(chunks) and B >= max(len(c.block_table) for c in chunks)
    tables = np.zeros((len(chunks), B), np.int32)
    for s, c in enumerate(chunks):
        tables[s, :len(c.block_table)] = c.block_table
    seq_lens = np.array([c.seq_len or 0 for c in chunks], np.int32)
    inputs = layout(np.array([c.start_pos for c in chunks], np.int32), lens, tables, block_size, T, S, seq_lens)
    token_ids = np.zeros(T, np.int32)
    token_ids[:n_tok] = [t for c in chunks for t in c.token_ids]
    logits_idx, rows = [], []
    for s, c in enumerate(chunks):
        a, b = int(inputs["query_start_loc"][s]), int(inputs["query_start_loc"][s + 1])
        idx = list(range(a, b)) if c.all_logits else [b - 1]
        logits_idx += idx
        rows.append(len(idx))
    L = pad_logits or len(logits_idx)
    logits_indices = np.zeros(L, np.int32)
    logits_indices[:len(logits_idx)] = logits_idx
    inputs.update(token_ids=token_ids, logits_indices=logits_indices)
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


class StepBuilder:
    """Turns a `SchedulerOutput` into a `StepBatch`, keeping per-slot host state between steps.

    Each running sequence holds a slot (`Request.slot`, given by the scheduler): a row of
    persistent arrays with its block table and sampling parameters. Rows are written when a
    sequence takes a slot (its `BlockTable` object is new there) and when its table grows;
    a step then gathers its rows and derives every position-based input in one numpy pass.
    Steady decode costs a few list appends per sequence, nothing per token of context.

    Padding: tokens to a power of two (>= min_tokens; a step of exactly one token, batch-1
    decode, keeps its own 1-token bucket: its matmuls then run as M = 1, the quantized ones on
    the multiply-and-sum kernels instead of 16-row tensor-core tiles), sequences to min(tokens,
    max_num_seqs), blocks per sequence to a power of two (>= 16) capped at max_blocks, so few
    shapes compile. A token whose value is still on the device (the previous step's sample)
    is read there: `from_prev` names its row."""

    def __init__(self, block_size: int, *, max_num_seqs: int, max_blocks: int, min_tokens: int = 16,
                 num_slots: int | None = None):
        self.block_size, self.max_num_seqs, self.max_blocks, self.min_tokens = (
            block_size, max_num_seqs, max_blocks, min_tokens)
        num_slots = num_slots or max_num_seqs
        self.tables = np.zeros((num_slots, max_blocks), np.int32)
        self._synced = [0] * num_slots           # block ids copied into tables[slot]
        self.num_table_blocks = np.zeros(num_slots, np.int32)  # the same, for numpy
        self._owner: list = [None] * num_slots  # the BlockTable object the row mirrors
        self.temperature = np.zeros(num_slots, np.float32)
        self.top_k = np.zeros(num_slots, np.int32)
        self.top_p = np.ones(num_slots, np.float32)
        self.min_p = np.zeros(num_slots, np.float32)
        self.seed = np.zeros(num_slots, np.uint32)
        self.greedy = np.ones(num_slots, bool)
        self.special = np.zeros(num_slots, bool)  # penalties, min_tokens or logprobs: the slow path

    def _claim(self, s: int, req) -> None:
        p = req.params
        self._owner[s], self._synced[s], self.num_table_blocks[s] = req.blocks, 0, 0
        self.tables[s] = 0
        self.temperature[s], self.top_k[s], self.top_p[s], self.min_p[s] = p.temperature, p.top_k, p.top_p, p.min_p
        self.seed[s], self.greedy[s] = req.seed & 0xFFFFFFFF, p.greedy
        self.special[s] = p.uses_penalties or p.min_tokens > 0 or p.logprobs is not None

    def _sync(self, s: int, ids: list[int]) -> None:
        """Copy the block ids that `tables[s]` lacks (a grown table: only the new tail)."""
        a = self._synced[s] if len(ids) > self._synced[s] else 0
        self.tables[s, a:len(ids)] = ids[a:]
        self._synced[s] = self.num_table_blocks[s] = len(ids)

    def build(self, plan) -> StepBatch:
        chunks, step = plan.chunks, plan.step
        owner, synced, tables = self._owner, self._synced, self.tables
        slot_l, start_l, len_l, key_l, tok_l, prev_l, total_l = [], [], [], [], [], [], []
        t = 0
        for c in chunks:
            req, n, start = c.req, c.num_tokens, c.start
            s, ids = req.slot, req.blocks.block_ids
            if owner[s] is not req.blocks:
                self._claim(s, req)
            if len(ids) != synced[s]:
                self._sync(s, ids)
            toks = req.all_token_ids
            known = len(toks)
            end = start + n
            if end <= known:
                tok_l.extend(toks[start:end]) if n > 1 else tok_l.append(toks[start])
            else:  # the last token is the previous step's sample, still on the device
                assert end - known == 1 and req.pending[0][0] == step - 1
                tok_l.extend(toks[start:end - 1])
                tok_l.append(0)
                prev_l.append((t + n - 1, req.pending[0][1]))
            slot_l.append(s)
            start_l.append(start)
            len_l.append(n)
            total_l.append(c.seq_len)
            # the sampled token's index in the output (its PRNG counter)
            key_l.append(known + len(req.pending) - len(req.prompt_token_ids) - 1 if c.samples else 0)
            t += n
        R, n_tok = len(chunks), t
        T = token_bucket(n_tok, self.min_tokens)
        S = min(T, self.max_num_seqs)
        rows = np.array(slot_l, np.intp)
        B = min(self.max_blocks, bucket(int(self.num_table_blocks[rows].max()), 16))
        inputs = layout(np.array(start_l, np.int32), np.array(len_l, np.int32), tables[rows, :B], self.block_size, T, S,
                        np.array(total_l, np.int32))
        token_ids = np.zeros(T, np.int32)
        token_ids[:n_tok] = tok_l
        logits_indices = np.zeros(S, np.int32)
        logits_indices[:R] = inputs["query_start_loc"][1:R + 1] - 1
        inputs.update(token_ids=token_ids, logits_indices=logits_indices)
        from_prev = np.full(T, -1, np.int32)
        for i, row in prev_l:
            from_prev[i] = row

        def per_row(a, fill):
            out = np.full(S, fill, a.dtype)
            out[:R] = a[rows]
            return out

        keys = np.zeros((S, 2), np.uint32)
        keys[:R, 0] = self.seed[rows]
        keys[:R, 1] = key_l
        sampling = dict(temperature=per_row(self.temperature, 0), top_k=per_row(self.top_k, 0),
                        top_p=per_row(self.top_p, 1.0), min_p=per_row(self.min_p, 0), keys=keys)
        all_greedy = bool(self.greedy[rows].all()) or bool(
            self.greedy[rows[np.array([c.samples for c in chunks], bool)]].all())
        num_logprobs = 0
        if self.special[rows].any():
            num_logprobs = _special_arrays(chunks, S, step, sampling)
        return StepBatch(step, inputs, from_prev, sampling, all_greedy, num_logprobs, R)


def _special_arrays(chunks, S: int, step: int, sampling: dict) -> int:
    """The rarely used sampling inputs, built per sequence: penalties, min_tokens suppression
    (added to `sampling`); returns how many logprobs the step must return."""
    from kiln.runtime.sampling_params import MAX_LOGPROBS

    samplers = [c for c in chunks if c.samples]
    if any(c.req.params.uses_penalties for c in samplers):
        sampling.update(_penalty_arrays(chunks, S, step))
    suppress = [sorted(c.req.stop_ids) if c.samples and c.req.num_output_tokens - 1 < c.req.params.min_tokens else []
                for c in chunks]
    if any(suppress):
        ids = np.full((S, bucket(max(len(s) for s in suppress), 4)), -1, np.int32)
        for i, s in enumerate(suppress):
            ids[i, :len(s)] = s
        sampling["suppress_ids"] = ids
    want = [c.req.params.logprobs for c in samplers if c.req.params.logprobs is not None]
    return 0 if not want else (5 if max(want) <= 5 else MAX_LOGPROBS)


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
