"""The scheduler (plain Python, no jax): which tokens of which sequences run in the next step.

Each step has a token budget (`max_num_tokens`) and a sequence limit (`max_num_seqs`):

    1. running sequences, decodes first, then unfinished prefills (chunked to the budget);
       when the pool is out of blocks, the newest running sequence is preempted (its blocks
       freed, recomputed later from its tokens) until the allocation fits;
    2. then, if nothing was preempted, waiting sequences in arrival order, each starting
       from its longest prefix-cache hit (or its leader's prompt blocks, for n > 1).

Counters advance when a step is scheduled (the step is queued on the device before any
later step can read its K/V), so the next step can be planned while this one runs.

Length-dependent RoPE (LongRoPE, `rope_switch` = the trained context length): a sequence at
most that long is rotated with the short factors, a longer one with the long factors, all
of its positions. A running sequence that grows past the switch has stale K in its cache:
it is recomputed from token 0 (its blocks freed, its slot kept), as transformers' generate
does at that step. Its tables carry the variant as the prefix-cache salt, so blocks of one
variant never serve the other.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kiln.runtime.block_manager import BlockManager, BlockTable
from kiln.runtime.request import FINISHED, RUNNING, WAITING, Request


@dataclass(slots=True)
class Chunk:
    req: Request
    start: int          # first token computed (= tokens already in the cache)
    num_tokens: int
    samples: bool       # the chunk reaches the end of the known tokens: a new token is sampled
    seq_len: int = 0    # the sequence's whole length when scheduled (LongRoPE's choice reads it)


@dataclass
class SchedulerOutput:
    step: int
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_tokens: int = 0     # over all chunks


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_tokens: int,
                 rope_switch: int | None = None):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_tokens = max_num_seqs, max_num_tokens
        self.rope_switch = rope_switch  # a graph's meta["kv_recompute_past"]: see the module docstring
        self.num_recomputes = 0
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.step_count = 0
        self.num_preemptions = 0
        self.scheduled_tokens = 0
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))  # rows of the step builder

    def add(self, req: Request) -> None:
        req.status = WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(self.step_count)
        self.step_count += 1
        budget = self.max_num_tokens
        done: set[int] = set()
        prefills = []
        switch = self.rope_switch
        for req in list(self.running):  # decodes first, in order (the whole loop of a steady decode step)
            if req.status != RUNNING:  # preempted earlier in this loop
                continue
            if switch is not None and req.blocks.salt != self._variant(req):  # grew past the RoPE switch:
                self._recompute(req)                                              # its K are stale
            n = req.target_tokens() - req.num_computed_tokens
            if n > 1:
                prefills.append(req)
            elif n == 1 and budget > 0 and self._run(req, 1, out, done):
                budget -= 1
        for req in prefills:
            if req.status == RUNNING:
                n = min(req.target_tokens() - req.num_computed_tokens, budget)
                if n > 0 and self._run(req, n, out, done):
                    budget -= n
        while (self.waiting and not out.preempted and budget > 0 and len(self.running) < self.max_num_seqs):
            req = self.waiting[0]
            if req.pending:  # its last token is still on the device: admit it next step
                break
            cached: list[int] = []
            if req.num_computed_tokens == 0 and not req.blocks.block_ids:
                req.blocks.salt = salt = self._variant(req)
                lead = req.leader
                share = (req.num_prompt_tokens - 1) // self.blocks.block_size * self.blocks.block_size
                if (lead is not None and lead.status == RUNNING and share and not req.output_token_ids
                        and lead.blocks.salt == salt):
                    if lead.num_computed_tokens < share:
                        break  # its leader is still computing the shared prompt blocks
                    req.blocks = self.blocks.fork(lead.blocks, share)
                    req.num_computed_tokens = share
                else:
                    cached = self.blocks.lookup(req.all_token_ids, salt)
            start = req.num_computed_tokens + len(cached) * self.blocks.block_size
            n = min(req.target_tokens() - start, budget)
            if not self.blocks.allocate(req.blocks, start + n, cached):
                if req.blocks.block_ids:  # undo a fork
                    self.blocks.free_table(req.blocks)
                    req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            req.slot = self._free_slots.pop()
            req.num_cached_tokens = len(cached) * self.blocks.block_size
            req.num_computed_tokens = start
            req.status = RUNNING
            self.running.append(req)
            budget -= n
            self._add_chunk(out, req, n)
        self.scheduled_tokens += out.num_tokens
        return out

    def _run(self, req: Request, n: int, out: SchedulerOutput, done: set) -> bool:
        """Schedule `n` more tokens of running `req`, first allocating their blocks (most steps
        fit in the blocks already held), preempting the newest running sequences until they
        fit. False when `req` itself had to go."""
        if req.num_computed_tokens + n > len(req.blocks.block_ids) * self.blocks.block_size:
            while not self.blocks.allocate(req.blocks, req.num_computed_tokens + n):
                victim = max((r for r in self.running if id(r) not in done), key=lambda r: r.arrival)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    return False
        done.add(id(req))
        self._add_chunk(out, req, n)
        return True

    def _add_chunk(self, out: SchedulerOutput, req: Request, n: int) -> None:
        start, end, known = req.num_computed_tokens, req.num_computed_tokens + n, len(req.all_token_ids)
        total = known + len(req.pending)
        samples = end == total
        out.chunks.append(Chunk(req, start, n, samples, total))
        out.num_tokens += n
        req.num_computed_tokens = end
        table = req.blocks
        if (table.num_hashed + 1) * self.blocks.block_size <= end:  # a block filled up: register it
            self.blocks.commit(table, req.all_token_ids, min(end, known))
        if samples:
            req.pending.append((out.step, len(out.chunks) - 1))

    def _variant(self, req: Request) -> int | None:
        """Which RoPE variant `req`'s K/V must be computed with now: None (no switch), 0 (at
        most `rope_switch` tokens: short factors) or 1 (long factors)."""
        return None if self.rope_switch is None else int(req.num_tokens > self.rope_switch)

    def _recompute(self, req: Request) -> None:
        """Compute running `req` again from token 0 (slot kept, blocks freed: shared ones stay
        with their other holders): it has grown past the RoPE switch."""
        self.blocks.free_table(req.blocks)
        req.blocks = BlockTable(salt=self._variant(req))
        req.num_computed_tokens = 0
        self.num_recomputes += 1

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release_slot(req)
        self.blocks.free_table(req.blocks)
        req.blocks = BlockTable()
        req.num_computed_tokens = 0
        req.status = WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _release_slot(self, req: Request) -> None:
        self._free_slots.append(req.slot)
        req.slot = -1

    def finish(self, req: Request, reason: str) -> None:
        """Remove `req` wherever it is and free its blocks (placeholders still on the device
        are dropped: their results are ignored)."""
        if req.status == FINISHED:
            return
        if req.status == RUNNING:
            self.running.remove(req)
            self._release_slot(req)
        else:
            self.waiting.remove(req)
        self.blocks.free_table(req.blocks)
        req.pending.clear()
        req.status, req.finish_reason = FINISHED, reason
