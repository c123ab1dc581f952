"""The runner: the one place that turns a scheduled step into device work.

    StepBatch (host numpy) ──► jit(step + sample) per shape bucket ──► sampled tokens [max_num_seqs]
                                    ▲ KV cache donated, updated in place

`execute` only dispatches: JAX runs the call asynchronously, so the engine plans and
prepares step N+1 while step N runs, and a decode token sampled by step N reaches step
N+1 on the device (`from_prev`), never through the host. `read` copies a step's samples
back (started early with `copy_to_host_async`) and blocks only on that step.

`submit` is `execute` on the runner's dispatch thread. Dispatching a compiled step is not
free: XLA enqueues its ~500 kernels from the calling thread before the call returns (3-4.6 ms
for the 8B step on the H100 hosts, BENCHMARKS.md session 6), time in which the engine
cannot resolve the previous step's samples or plan the next one. From its own thread the
enqueue runs beside that Python work (jax releases the GIL while it executes a call); steps
still run in submission order, one thread owning the cache and the previous step's tokens.
Off unless `KILN_DISPATCH_THREAD=1`: on the H100 the 8B fp8 throughput run was no faster with
it (the 512-sequence step is device-bound there; BENCHMARKS.md session 11), and on the 2-core
CPU, where the "device" is the same cores, a tiny model ran 5% slower.

Params arrive already placed (a pass pipeline or a sharding plan may have transformed and
sharded them); a sharding plan passes its own step function and KV-pool allocator.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from kiln.graph import Graph, lower
from kiln.runtime.batch import StepBatch, bucket
from kiln.runtime.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block
from kiln.runtime.sampling import sample_rows


CPU_KV_BYTES = 2 << 30  # the KV pool on a device without memory statistics (the CPU)


@dataclass
class StepHandle:
    batch: StepBatch
    out: dict            # device arrays: tokens [max_num_seqs], optional logprob arrays


def _log_stderr(msg: str) -> None:
    print(f"kiln: {msg}", file=sys.stderr, flush=True)


def default_compiler_options(quantization: str | None) -> dict:
    """XLA options a step compiles with unless the user gives others: on the GPU, an
    unquantized model's GEMMs go to cuBLAS without XLA's Triton GEMM autotuning (H100, Llama-3-8B
    shape: bucket compiles 7.6 -> 5.0 s, the 16-token step 7.6 -> 6.5 ms; BENCHMARKS.md, issue #6).
    Quantized models keep XLA's Triton GEMMs: its weight-only matmuls convert in them."""
    if quantization is None and jax.default_backend() == "gpu":
        return {"xla_gpu_enable_triton_gemm": False}
    return {}


SMALL_STEP_TOKENS = 16  # token buckets up to this size may compile with their own options


def default_small_step_options(quantization: str | None) -> dict | None:
    """XLA options of the token buckets up to SMALL_STEP_TOKENS (batch-1 decode) where they
    differ from `default_compiler_options` (None: the same): an unquantized model's keep XLA's
    Triton GEMMs there (H100, Llama-3-8B shape, bf16 latency 128/512: TPOT 6.15 ms with them
    against 6.32-6.44 ms on cuBLAS over four runs; BENCHMARKS.md, session 7)."""
    if quantization is None and jax.default_backend() == "gpu":
        return {}
    return None


class Runner:
    def __init__(self, graph: Graph, params: dict, *, dtype: str, block_size: int, max_num_seqs: int,
                 max_num_tokens: int, max_model_len: int, num_kv_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.9, attention: str = "auto", step_fn=None, allocate_kv=None,
                 kv_shards: int = 1, log=_log_stderr, compiler_options: dict | None = None,
                 activation_bytes: int | None = None, small_step_options: dict | None = None):
        self.graph, self.params, self.dtype = graph, params, dtype
        self.block_size, self.max_num_seqs, self.max_num_tokens = block_size, max_num_seqs, max_num_tokens
        self.max_blocks = -(-max_model_len // block_size)
        self.log = log or (lambda msg: None)
        # a sharding plan (passes/sharding.py) brings its own step and its own sharded pools;
        # each device then holds 1/kv_shards of every KV block
        self._step = step_fn or lower(graph, attention=attention)
        self._allocate_kv = allocate_kv or (lambda n, bs, dt: allocate_kv_cache(graph, n, bs, dt))
        self.kv_shards = kv_shards
        self.set_compiler_options(compiler_options, small_step_options)
        self._dispatcher: ThreadPoolExecutor | None = None  # `submit`'s thread, started on first use
        self._given_activation_bytes = activation_bytes  # measured elsewhere (LLM, beside the load)
        self._compiled: set = set()
        self._executables: dict = {}   # shape key -> compiled step (fetched from the persistent cache if there)
        self._pending: dict = {}       # shape key -> Future of a background fetch (`preload`)
        self.compile_seconds = 0.0
        self.num_blocks = num_kv_blocks or self._blocks_from_memory(gpu_memory_utilization)
        # One device: the pools are allocated at the first step (`kv`), so a build that only
        # compiles never holds them (its parallel compiles need that memory for autotuning).
        self._kv = None
        if kv_shards > 1:
            self._kv = self._allocate_kv(self.num_blocks, block_size, dtype)
            self._kv_like = _abstract(self._kv)
        else:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            self._kv_like = jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                jax.eval_shape(lambda: self._allocate_kv(self.num_blocks, block_size, dtype)))
        self._prev_tokens = jnp.zeros(max_num_seqs, jnp.int32)
        self._prev_step = -1

    @property
    def kv(self) -> list:
        """The KV pools (allocated on first use)."""
        if self._kv is None:
            self._kv = self._allocate_kv(self.num_blocks, self.block_size, self.dtype)
        return self._kv

    @kv.setter
    def kv(self, value) -> None:
        self._kv = value

    def set_compiler_options(self, options: dict | None, small: dict | None = None) -> None:
        """XLA options for every step compile (part of the compilation-cache key, so an engine
        loads with the options it was built with); `small`, where given, for the token buckets
        up to SMALL_STEP_TOKENS instead. Options this XLA does not know are dropped with a
        message; `self.compiler_options` / `self.small_step_options` hold those in effect."""
        self.compiler_options = self._accepted(options)
        self.small_step_options = None if small is None else self._accepted(small)
        if self.small_step_options == self.compiler_options:
            self.small_step_options = None

        def jit(opts):
            kw = {"compiler_options": opts} if opts else {}
            return jax.jit(self._fused_packed, donate_argnums=(1,),
                           static_argnames=("layout", "all_greedy", "num_logprobs"), **kw)

        self._fn = jit(self.compiler_options)
        self._fn_small = None if self.small_step_options is None else jit(self.small_step_options)
        self._executables, self._pending = {}, {}
        self._layouts: dict = {}  # shape key -> the packed-input layout its executable was lowered with

    def _accepted(self, options: dict | None) -> dict:
        options = dict(options or {})
        if options:
            try:
                jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
            except Exception as e:  # an unknown option name or value, or a jax without the argument
                why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                self.log(f"compiler options {options} not applied ({why})")
                options = {}
        return options

    def _fn_for(self, b: StepBatch):
        """The jitted step whose compiler options serve `b`'s token bucket."""
        if self._fn_small is not None and b.inputs["token_ids"].shape[0] <= SMALL_STEP_TOKENS:
            return self._fn_small
        return self._fn

    # -- memory
    def _blocks_from_memory(self, utilization: float) -> int:
        """vLLM's rule: the KV pool takes what is left of `utilization` x device memory after
        the weights and the largest step's activations, on the fullest device holding a share.
        Without memory statistics (CPU), enough blocks for max_num_seqs full-length sequences."""
        per_block = kv_cache_bytes_per_block(self.graph, self.block_size, self.dtype) // self.kv_shards
        # every device that holds a share of the pools (the first tp * pp: shard_model's mesh)
        all_stats = [d.memory_stats() or {} for d in jax.devices()[:max(self.kv_shards, 1)]]
        if any("bytes_limit" not in s for s in all_stats):  # host memory: at most CPU_KV_BYTES, at least one full sequence
            cap = max(self.max_blocks + 1, CPU_KV_BYTES // max(per_block, 1))
            return min(self.max_num_seqs * self.max_blocks + 1, cap)
        activations = self._given_activation_bytes
        if activations is None:
            activations = self._activation_bytes()
        avail = min(utilization * s["bytes_limit"] - s.get("bytes_in_use", 0) for s in all_stats) - activations
        n = int(avail // per_block)
        if n < self.max_blocks:
            from kiln.errors import ConfigError

            raise ConfigError(f"only {max(n, 0)} KV blocks fit in gpu_memory_utilization={utilization} of device memory "
                              f"(one sequence needs {self.max_blocks}); raise gpu_memory_utilization or lower "
                              f"max_model_len / max_num_tokens")
        self.log(f"KV cache: {n} blocks of {self.block_size} tokens ({n * per_block / 2**30:.2f} GiB; "
                 f"{activations / 2**30:.2f} GiB kept for activations)")
        return n

    def _activation_bytes(self) -> int:
        """Scratch memory of the largest step, from XLA's memory analysis of its compilation
        against a one-block cache (falls back to a fifth of what the weights take)."""
        from kiln.runtime.batch import SeqChunk, prepare_inputs

        T = bucket(self.max_num_tokens, 16)
        S = min(T, self.max_num_seqs)
        per = -(-T // S)  # S sequences share the T tokens, every block table at full width
        chunks = [SeqChunk([0] * min(per, T - i), 0, [0] * self.max_blocks) for i in range(0, T, per)]
        inputs, _ = prepare_inputs(chunks, self.block_size, pad_tokens=T, pad_seqs=S, pad_blocks=self.max_blocks,
                                   pad_logits=S)
        kv = allocate_kv_cache(self.graph, 1, self.block_size, self.dtype)
        samp = _dummy_sampling(S)
        t0 = time.perf_counter()
        try:
            compiled = jax.jit(self._fused, static_argnames=("all_greedy", "num_logprobs")).lower(
                self.params, kv, inputs, self._prev_like(), np.full(T, -1, np.int32), samp,
                all_greedy=False, num_logprobs=0).compile()
            self.log(f"activation memory of the largest step measured in {time.perf_counter() - t0:.1f} s")
            return int(compiled.memory_analysis().temp_size_in_bytes * 1.2) + (256 << 20)
        except Exception:  # memory analysis is not on every backend / version
            return sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in self.params.values()) // 5

    def _prev_like(self):
        return jnp.zeros(self.max_num_seqs, jnp.int32)

    # -- the device function
    def _fused(self, params, kv, inputs, prev_tokens, from_prev, samp, *, all_greedy, num_logprobs):
        take_prev = lambda rows: prev_tokens[jnp.maximum(rows, 0)]  # noqa: E731
        inputs = dict(inputs, token_ids=jnp.where(from_prev >= 0, take_prev(from_prev), inputs["token_ids"]))
        logits, kv = self._step(params, kv, inputs)
        if "output_from_prev" in samp:
            rows = samp["output_from_prev"]
            extra = jnp.where(rows >= 0, take_prev(rows), -1)[:, None]
            samp = dict(samp, output_ids=jnp.concatenate([samp["output_ids"], extra], axis=1))
        out = sample_rows(logits, samp, all_greedy=all_greedy, num_logprobs=num_logprobs)
        s = out["tokens"].shape[0]
        out["tokens"] = jnp.zeros(self.max_num_seqs, jnp.int32).at[:s].set(out["tokens"])
        return kv, out

    def _fused_packed(self, params, kv, prev_tokens, packs, *, layout, all_greedy, num_logprobs):
        """`_fused` over the step's host arrays packed by `pack_step` (one array per dtype)."""
        parts = unpack_step(packs, layout)
        return self._fused(params, kv, parts["inputs"], prev_tokens, parts["from_prev"], parts["sampling"],
                           all_greedy=all_greedy, num_logprobs=num_logprobs)

    # -- steps
    def execute(self, batch: StepBatch) -> StepHandle:
        """Dispatch one step; returns at once (the device works on)."""
        key = batch.shape_key
        first = key not in self._compiled
        if first:
            self._compiled.add(key)
            verb = "loading or compiling" if jax.config.jax_compilation_cache_dir else "compiling"  # an engine's cache
            self.log(f"{verb} step #{len(self._compiled)}: tokens={key[0]} blocks/seq={key[1]}"
                     f"{'' if key[2] else ' sampling'}{f' logprobs={key[3]}' if key[3] else ''}"
                     f"{' penalties' if key[4] else ''}{' min_tokens' if key[6] else ''}")
            t0 = time.perf_counter()
        if batch.from_prev.max() >= 0:
            assert self._prev_step == batch.step - 1, "a pending token must come from the step just before"
        layout, packs = pack_step(batch)
        fn = self._executable(batch, layout)
        args = (self.params, self.kv, self._prev_tokens, packs)
        if self._layouts.get(key, layout) == layout:
            self.kv, out = fn(*args)
        else:  # a batch whose structure the key does not capture: jit it
            self.kv, out = self._fn_for(batch)(*args, layout=layout, all_greedy=batch.all_greedy,
                                               num_logprobs=batch.num_logprobs)
        if first:
            out["tokens"].block_until_ready()
            self.compile_seconds += time.perf_counter() - t0
        self._prev_tokens, self._prev_step = out["tokens"], batch.step
        for a in out.values():
            a.copy_to_host_async()
        return StepHandle(batch, out)

    def submit(self, batch: StepBatch) -> StepHandle | Future:
        """`execute` on the dispatch thread (module doc): returns at once, a Future of the step's
        handle that `read` accepts. Steps run in submission order; while any is pending, only
        `submit` and `read` may touch the runner. Inline unless `KILN_DISPATCH_THREAD=1`."""
        if os.environ.get("KILN_DISPATCH_THREAD", "0") != "1":
            return self.execute(batch)
        if self._dispatcher is None:
            self._dispatcher = ThreadPoolExecutor(1, thread_name_prefix="kiln-dispatch")
        return self._dispatcher.submit(lambda: self.execute(batch))  # self.execute read late: wrappers apply

    @staticmethod
    def read(handle: StepHandle | Future) -> dict[str, np.ndarray]:
        """The step's samples on the host (waits for that step only)."""
        if isinstance(handle, Future):
            handle = handle.result()  # re-raises what the dispatch raised
        return {k: np.asarray(v) for k, v in handle.out.items()}

    def _warmup_batches(self, blocks: int | None = None) -> list[StepBatch]:
        """One greedy batch per token bucket (writes nothing to the cache), with `blocks` block-table
        columns (default: up to 16): the 1-token bucket of batch-1 decode, then 16, 32, ...
        up to max_num_tokens."""
        from kiln.runtime.batch import SeqChunk, prepare_inputs, token_bucket

        out, T = [], 1
        while True:
            S = min(T, self.max_num_seqs)
            inputs, _ = prepare_inputs([SeqChunk([0], 0, [0])], self.block_size, pad_tokens=T, pad_seqs=S,
                                       pad_blocks=min(self.max_blocks, blocks or 16), pad_logits=S)
            inputs["slot_mapping"][:] = -1  # writes nothing
            out.append(StepBatch(-10, inputs, np.full(T, -1, np.int32), _dummy_sampling(S), True, 0, 1))
            if T >= self.max_num_tokens:
                return out
            T = token_bucket(T + 1)

    # -- executables: lowered from shapes only, so they can be fetched before the weights arrive
    # (one device only: a sharded step keeps jit's own dispatch, whose shardings follow the arrays)
    def _lower_compile(self, b: StepBatch):
        layout, packs = pack_step(b)
        self._layouts[b.shape_key] = layout
        kw = dict(layout=layout, all_greedy=b.all_greedy, num_logprobs=b.num_logprobs)
        if self.kv_shards > 1:
            return self._fn_for(b).lower(self.params, self.kv, self._prev_tokens, packs, **kw).compile()
        prev = jax.ShapeDtypeStruct((self.max_num_seqs,), jnp.int32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        return self._fn_for(b).lower(_abstract(self.params), self._kv_like, prev, packs, **kw).compile()

    def _executable(self, b: StepBatch, layout: tuple):
        """The compiled step for `b`'s shape key. Several devices: jit's own dispatch (its
        shardings follow the arrays)."""
        key = b.shape_key
        if self.kv_shards > 1:
            self._layouts[key] = layout
            fn = self._fn_for(b)
            return lambda *args: fn(*args, layout=layout, all_greedy=b.all_greedy, num_logprobs=b.num_logprobs)
        fn = self._executables.get(key)
        if fn is None:
            fut = self._pending.pop(key, None)
            if fut is not None and not fut.cancel():  # being fetched in the background: wait for it
                fn = fut.result()
            else:
                fn = self._lower_compile(b)
            self._executables[key] = fn
        return fn

    def preload(self, batches: list[StepBatch]) -> None:
        """Fetch the executables of `batches` in one background thread, in order (from the
        persistent compilation cache when it holds them): `LLM(ENGINE_DIR)` runs this while
        the weights are restored; `params` may still be abstract (shapes and shardings)."""
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="kiln-preload")
        for b in batches:
            if b.shape_key not in self._executables and b.shape_key not in self._pending:
                self._pending[b.shape_key] = pool.submit(self._lower_compile, b)
        pool.shutdown(wait=False)

    def preloaded(self) -> str:
        """'done of fetched' for the executables `preload` fetches (a progress line for logs)."""
        pending = list(self._pending.values())
        return f"{sum(f.done() for f in pending) + len(self._executables)} of {len(pending) + len(self._executables)}"

    def build_batches(self) -> list[StepBatch]:
        """The buckets an engine build compiles: every decode bucket (up to max_num_seqs
        tokens) and the largest; the others compile on first use (into the engine's cache
        when it is writable)."""
        batches = self._warmup_batches()
        decode = bucket(self.max_num_seqs, 16)
        return [b for b in batches[:-1] if len(b.inputs["token_ids"]) <= decode] + batches[-1:]

    def precompile_seen(self, workers: int = 8) -> int:
        """Compile every token bucket greedy steps may take at each block-table width compiled so
        far (a benchmark's warm-up meets only some of the token buckets its timed run will).
        Returns how many were compiled."""
        widths = sorted({k[1] for k in self._executables} | {k[1] for k in self._pending})
        missing = {}
        for w in widths:
            for b in self._warmup_batches(blocks=w):
                if b.shape_key not in self._executables and b.shape_key not in self._pending:
                    missing[b.shape_key] = b
        if missing:
            self.precompile(workers, list(missing.values()))
        return len(missing)

    def warmup(self) -> None:
        """Compile the greedy step for every token bucket now, not on first use."""
        for b in self._warmup_batches():
            self.execute(b)
        self._prev_step = -1

    def precompile(self, workers: int = 8, batches: list[StepBatch] | None = None) -> None:
        """Compile `batches` (default: every token bucket) in parallel threads (XLA compiles
        outside the GIL), without running them: what `kiln build` uses to fill the persistent
        compilation cache, from which a later `execute` loads each executable."""
        from concurrent.futures import ThreadPoolExecutor

        def compile_one(b: StepBatch):
            self._executables[b.shape_key] = self._lower_compile(b)
            self.log(f"compiled tokens={b.inputs['token_ids'].shape[0]}")

        batches = self._warmup_batches() if batches is None else batches
        with ThreadPoolExecutor(max(1, min(workers, len(batches)))) as pool:
            list(pool.map(compile_one, batches))


def pack_step(batch: StepBatch) -> tuple[tuple, tuple[np.ndarray, ...]]:
    """A step's host arrays (inputs, from_prev, sampling) as one flat array per dtype, and the
    static layout that unpacks them (`unpack_step`, inside the jitted step). One host-to-device
    copy per dtype instead of one per array: on the H100 host it cut the dispatch of a
    512-sequence step (~20 arrays) from 3.5 to 2.5 ms (BENCHMARKS.md, session 5)."""
    entries = [("inputs", k, v) for k, v in batch.inputs.items()] + [("from_prev", "", batch.from_prev)] + \
        [("sampling", k, v) for k, v in batch.sampling.items()]
    dtypes: list[str] = []
    flat: list[list[np.ndarray]] = []
    sizes: list[int] = []
    layout = []
    for where, name, a in entries:
        a = np.asarray(a)
        d = a.dtype.str
        if d not in dtypes:
            dtypes.append(d)
            flat.append([])
            sizes.append(0)
        i = dtypes.index(d)
        layout.append((where, name, i, sizes[i], a.shape))
        flat[i].append(a.reshape(-1))
        sizes[i] += a.size
    packs = tuple(np.concatenate(f) if len(f) > 1 else f[0] for f in flat)
    return (tuple(dtypes), tuple(layout)), packs


def unpack_step(packs, layout: tuple) -> dict:
    """`pack_step`'s arrays back as {"inputs": {...}, "from_prev": array, "sampling": {...}}
    (static slices: free inside the compiled step)."""
    out: dict = {"inputs": {}, "sampling": {}, "from_prev": None}
    for where, name, i, off, shape in layout[1]:
        a = packs[i][off:off + int(np.prod(shape, dtype=np.int64))].reshape(shape)
        if where == "from_prev":
            out["from_prev"] = a
        else:
            out[where][name] = a
    return out


def _abstract(tree):
    """Shapes, dtypes and shardings of a tree of arrays (or of ShapeDtypeStructs)."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None))
                                  if hasattr(a, "shape") else a, tree)


def _dummy_sampling(S: int) -> dict:
    return dict(temperature=np.zeros(S, np.float32), top_k=np.zeros(S, np.int32), top_p=np.ones(S, np.float32),
                min_p=np.zeros(S, np.float32), keys=np.zeros((S, 2), np.uint32))
