"""The engine loop: requests in, outputs out, one scheduled step at a time.

    add_request / abort ──► intake (thread-safe) ──► step():
        schedule step N  ─► build its host arrays ─► runner.submit (returns at once; with
                            KILN_DISPATCH_THREAD=1 a thread of the runner enqueues it)
        read back step N-1's samples (the device is already busy with N) ─► resolve tokens,
        detokenize, check stops, free finished sequences ─► RequestOutputs

With `overlap=False` each step is read back right after it is dispatched (simpler, slower:
the device idles while the host plans). `AsyncEngine` wraps an engine for asyncio callers
(the server): one async generator of delta outputs per request.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from kiln.errors import RequestError
from kiln.runtime.batch import StepBuilder
from kiln.runtime.block_manager import BlockManager
from kiln.runtime.detokenizer import Detokenizer
from kiln.runtime.outputs import CompletionOutput, EngineStats, RequestOutput
from kiln.runtime.request import FINISHED, Request
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler, SchedulerOutput

OUTPUT_KINDS = ("final", "delta", "cumulative")


@dataclass(eq=False)
class _Group:
    """The n sequences generated for one prompt, and what has been handed out of them."""
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    seqs: list[Request]
    detoks: list[Detokenizer]
    kind: str
    sent_tokens: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        for s in self.seqs:
            if s.status != FINISHED:
                return False
        return True


class _HeapFreeze:
    """While any engine has work, the objects that were alive when it started (the model, jax's
    and the compiled steps', the tokenizer: about 10^5-10^6 of them) sit in the collector's
    permanent generation (`gc.freeze`), so the full collections that the requests' own objects
    trigger mid-run scan only those, not the whole process: on the H100 one such collection
    stalled every 8B fp8 128/128 x 1024 run for 0.50-0.56 s (22.3-24.0k -> 25.1-25.8k out tok/s
    without it; BENCHMARKS.md session 11).
    vLLM freezes its start-up heap the same way. Counted over engines; `gc.unfreeze` once the
    last one is idle, so garbage from before a run is collected after it. `KILN_FREEZE_HEAP=0`
    turns it off (an A/B)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._busy = 0

    def enter(self) -> bool:
        if os.environ.get("KILN_FREEZE_HEAP", "1") == "0":
            return False
        with self._lock:
            if self._busy == 0:
                gc.freeze()
            self._busy += 1
        return True

    def leave(self) -> None:
        with self._lock:
            self._busy -= 1
            if self._busy == 0:
                gc.unfreeze()


HEAP = _HeapFreeze()


def _rope_switch(runner) -> int | None:
    """The length past which the model's RoPE changes (LongRoPE): `graph.meta["kv_recompute_past"]`."""
    graph = getattr(runner, "graph", None)
    return graph.meta.get("kv_recompute_past") if graph is not None else None


class Engine:
    def __init__(self, runner, *, tokenizer, eos_token_ids: Sequence[int], vocab_size: int, max_model_len: int,
                 max_num_seqs: int, max_num_tokens: int, enable_prefix_caching: bool = True, seed: int = 0,
                 overlap: bool = True):
        self.runner, self.tokenizer = runner, tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.vocab_size, self.max_model_len, self.seed, self.overlap = vocab_size, max_model_len, seed, overlap
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=max_num_seqs, max_num_tokens=max_num_tokens,
                                   rope_switch=_rope_switch(runner))
        self.builder = StepBuilder(runner.block_size, max_num_seqs=runner.max_num_seqs, max_blocks=runner.max_blocks,
                                   num_slots=max_num_seqs)
        self._intake: deque = deque()
        self._groups: dict[str, _Group] = {}
        self._live: set[str] = set()
        self._inflight: tuple[SchedulerOutput, object] | None = None
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self.finished_requests = 0
        self.step_seconds = self.device_wait_seconds = 0.0  # see time_split
        self._frozen = False  # this engine holds HEAP (it has work)

    # -- requests
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, output_kind: str = "final", prompt_text: str | None = None) -> str:
        """Queue a prompt (text or token ids; `prompt_text` names the text of given ids).
        Raises `RequestError`, changing nothing, when the request cannot be served. Returns
        its id. Safe to call from any thread."""
        params = params or SamplingParams()
        if output_kind not in OUTPUT_KINDS:
            raise RequestError(f"output_kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
        text = prompt if isinstance(prompt, str) else None
        if text is not None:
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: pass prompts as lists of token ids")
            ids = self.tokenizer.encode(text)
        else:
            ids = [int(t) for t in prompt]
            text = prompt_text
        self._validate(ids, params)
        num = next(self._ids)
        rid = str(num) if request_id is None else str(request_id)
        if rid in self._live:
            raise RequestError(f"request id {rid!r} is already in use; pass a unique request_id")
        base = params.seed if params.seed is not None else (self.seed * 1_000_003 + num) & 0xFFFFFFFF
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        seqs, leader = [], None
        for i in range(params.n):
            seed = base if i == 0 else hash((base, i)) & 0xFFFFFFFF
            seqs.append(Request(rid, ids, params, seed, stop_ids, index=i, leader=leader, arrival=next(self._arrivals)))
            leader = leader or seqs[0]
        detoks = [Detokenizer(self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop,
                              lazy=output_kind == "final") for _ in seqs]
        self._live.add(rid)
        self._intake.append(("add", _Group(rid, text, ids, seqs, detoks, output_kind, [0] * params.n)))
        return rid

    def _validate(self, ids: list[int], p: SamplingParams) -> None:
        if not ids:
            raise RequestError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) + p.max_tokens > self.max_model_len:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({p.max_tokens}) exceeds max_model_len "
                               f"({self.max_model_len}); shorten the prompt or lower max_tokens")
        if -(-(len(ids) + p.max_tokens) // self.blocks.block_size) > self.blocks.num_blocks:
            raise RequestError(f"the KV cache ({self.blocks.num_blocks} blocks of {self.blocks.block_size}) cannot "
                               f"hold {len(ids) + p.max_tokens} tokens; lower max_tokens or give the cache more blocks")
        if p.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; use stop_token_ids")
        if any(not 0 <= t < self.vocab_size for t in p.stop_token_ids):
            raise RequestError(f"stop_token_ids must be in [0, {self.vocab_size})")

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; its final output (finish_reason "abort") comes out
        of the next `step`. Unknown or finished ids are ignored. Safe from any thread."""
        self._intake.append(("abort", str(request_id)))

    def has_unfinished(self) -> bool:
        return bool(self._groups or self._intake or self._inflight)

    # -- the loop
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs it produced (per each request's output_kind)."""
        t0 = time.perf_counter()
        if not self._frozen:
            self._frozen = HEAP.enter()
        touched: dict[str, _Group] = {}
        self._drain(touched)
        plan = self.scheduler.schedule()
        handle = None
        if plan.chunks:  # overlapped: dispatched (on the runner's thread, if on) while step N-1 resolves below
            run = self.runner.submit if self.overlap and hasattr(self.runner, "submit") else self.runner.execute
            handle = (plan, run(self.builder.build(plan)))
        if self._inflight is not None:
            self._process(*self._inflight, touched)
        self._inflight = handle
        if handle is not None and not self.overlap:
            self._process(*handle, touched)
            self._inflight = None
        outs = [o for g in touched.values() if (o := self._output(g)) is not None]
        if self._frozen and not self.has_unfinished():
            self._frozen = False
            HEAP.leave()
        self.step_seconds += time.perf_counter() - t0
        return outs

    def time_split(self) -> dict:
        """Where `step` spent its time so far: waiting for the device (the host had nothing
        left to do) vs host work. With overlap, a device-bound loop waits on most steps; a
        host-bound one barely waits at all."""
        host = self.step_seconds - self.device_wait_seconds
        return {"steps": self.scheduler.step_count, "step_s": self.step_seconds,
                "device_wait_s": self.device_wait_seconds, "host_s": host,
                "host_ms_per_step": host / max(self.scheduler.step_count, 1) * 1e3}

    def _drain(self, touched: dict) -> None:
        while self._intake:
            what, x = self._intake.popleft()
            if what == "add":
                self._groups[x.request_id] = x
                for s in x.seqs:
                    self.scheduler.add(s)
            else:
                g = self._groups.get(x)
                if g is not None:
                    for s, d in zip(g.seqs, g.detoks):
                        if not s.finished:
                            self._finish(s, "abort", d)
                    touched[g.request_id] = g

    def _process(self, plan: SchedulerOutput, handle, touched: dict) -> None:
        """Resolve a finished step's samples into their requests (the hot loop of every step:
        per sequence a few list operations; text only where it is streamed or searched)."""
        t = time.perf_counter()
        res = self.runner.read(handle)
        self.device_wait_seconds += time.perf_counter() - t
        chunks, step, groups = plan.chunks, plan.step, self._groups
        tokens = res["tokens"][:len(chunks)].tolist()
        for row, c in enumerate(chunks):
            req = c.req
            pend = req.pending
            # a finished sequence has no placeholders; a stale one (preempted) is not this row's
            if not c.samples or not pend or pend[0] != (step, row):
                continue
            tok = tokens[row]
            pend.popleft()
            req.all_token_ids.append(tok)
            p = req.params
            if p.logprobs is not None:
                self._add_logprobs(req, res, row, tok)
            g = groups[req.request_id]
            det = g.detoks[req.index]
            n_out = len(req.all_token_ids) - len(req.prompt_token_ids)
            reason = None
            if tok in req.stop_ids and n_out > p.min_tokens:
                reason = "stop"
            elif det.tokenizer is not None and det.push(tok, check_stop=n_out > p.min_tokens):
                reason = "stop"
            elif n_out >= p.max_tokens:
                reason = "length"
            if reason is not None:
                self._finish(req, reason, det)
                touched[g.request_id] = g
            elif g.kind != "final":
                touched[g.request_id] = g

    @staticmethod
    def _add_logprobs(req: Request, res: dict, row: int, tok: int) -> None:
        k = req.params.logprobs
        lp = {int(i): float(v) for i, v in zip(res["top_ids"][row][:k], res["top_logprobs"][row][:k])}
        lp[tok] = float(res["logprob"][row])
        req.logprobs.append(lp)

    def _finish(self, req: Request, reason: str, det: Detokenizer) -> None:
        det.flush()
        self.scheduler.finish(req, reason)

    def _output(self, g: _Group) -> RequestOutput | None:
        done = g.finished
        if done and g.request_id in self._groups:
            del self._groups[g.request_id]
            self._live.discard(g.request_id)
            self.finished_requests += 1
        if g.kind == "final" and not done:
            return None
        outs = []
        delta = g.kind == "delta"
        sent = g.sent_tokens
        for i, s in enumerate(g.seqs):  # the per-request work of every streamed step: kept lean
            d = g.detoks[i]
            want_lps = s.params.logprobs is not None
            if delta:  # only what is new: no copy of the whole output per step
                a = sent[i]
                toks = s.output_tail(a)
                sent[i] = a + len(toks)
                text = d.delta() if d.tokenizer is not None else ""
                lps = s.logprobs[a:] if want_lps else None
            else:
                text, toks, lps = d.text, s.output_token_ids, s.logprobs if want_lps else None
            outs.append(CompletionOutput(i, text, toks, s.finish_reason, lps))
        return RequestOutput(g.request_id, g.prompt, g.prompt_ids, outs, done, g.seqs[0].num_cached_tokens)

    # -- statistics
    def stats(self) -> EngineStats:
        sch = self.scheduler
        return EngineStats(running=len(sch.running), waiting=len(sch.waiting),
                           kv_blocks_used=self.blocks.num_used_blocks, kv_blocks_free=self.blocks.num_free_blocks,
                           kv_blocks_total=self.blocks.num_blocks, prefix_cache_hit_rate=self.blocks.hit_rate(),
                           steps=sch.step_count, tokens_per_step=sch.scheduled_tokens / max(sch.step_count, 1),
                           preemptions=sch.num_preemptions, finished_requests=self.finished_requests)


class AsyncEngine:
    """asyncio front of an `Engine`: steps run in a worker thread, so the event loop stays
    free; each request is an async generator of delta `RequestOutput`s. Leaving the
    generator early (a client went away) aborts the request."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        rid = self.engine.add_request(prompt, params, request_id=request_id, output_kind="delta")
        q = self._queues[rid] = asyncio.Queue()
        self._start()
        finished = False
        try:
            while not finished:
                out = await q.get()
                finished = out.finished
                yield out
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self.engine.abort(rid)
                self._wake.set()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        if self._wake is not None:
            self._wake.set()

    def _start(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            for out in await asyncio.to_thread(self.engine.step):
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
