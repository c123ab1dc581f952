"""The runner: the one place that turns a scheduled step into device work.

    StepBatch (host numpy) ──► jit(step + sample) per shape bucket ──► sampled tokens [max_num_seqs]
                                    ▲ KV cache donated, updated in place

`execute` only dispatches: JAX runs the call asynchronously, so the engine plans and
prepares step N+1 while step N runs, and a decode token sampled by step N reaches step
N+1 on the device (`from_prev`), never through the host. `read` copies a step's samples
back (started early with `copy_to_host_async`) and blocks only on that step.

Params arrive already placed (a pass pipeline or a sharding plan may have transformed and
sharded them); a sharding plan passes its own step function and KV-pool allocator.
"""

from __future__ import annotations

import sys
import time
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


class Runner:
    def __init__(self, graph: Graph, params: dict, *, dtype: str, block_size: int, max_num_seqs: int,
                 max_num_tokens: int, max_model_len: int, num_kv_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.9, attention: str = "auto", step_fn=None, allocate_kv=None,
                 kv_shards: int = 1, log=_log_stderr):
        self.graph, self.params, self.dtype = graph, params, dtype
        self.block_size, self.max_num_seqs, self.max_num_tokens = block_size, max_num_seqs, max_num_tokens
        self.max_blocks = -(-max_model_len // block_size)
        self.log = log or (lambda msg: None)
        # a sharding plan (passes/sharding.py) brings its own step and its own sharded pools;
        # each device then holds 1/kv_shards of every KV block
        self._step = step_fn or lower(graph, attention=attention)
        self._allocate_kv = allocate_kv or (lambda n, bs, dt: allocate_kv_cache(graph, n, bs, dt))
        self.kv_shards = kv_shards
        self._fn = jax.jit(self._fused, donate_argnums=(1,), static_argnames=("all_greedy", "num_logprobs"))
        self._compiled: set = set()
        self.compile_seconds = 0.0
        self.num_blocks = num_kv_blocks or self._blocks_from_memory(gpu_memory_utilization)
        self.kv = self._allocate_kv(self.num_blocks, block_size, dtype)
        self._prev_tokens = jnp.zeros(max_num_seqs, jnp.int32)
        self._prev_step = -1

    # -- memory
    def _blocks_from_memory(self, utilization: float) -> int:
        """vLLM's rule: the KV pool takes what is left of `utilization` x device memory after
        the weights and the largest step's activations. Without memory statistics (CPU),
        enough blocks for max_num_seqs full-length sequences."""
        per_block = kv_cache_bytes_per_block(self.graph, self.block_size, self.dtype) // self.kv_shards
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" not in stats:  # host memory: at most CPU_KV_BYTES, at least one full sequence
            cap = max(self.max_blocks + 1, CPU_KV_BYTES // max(per_block, 1))
            return min(self.max_num_seqs * self.max_blocks + 1, cap)
        activations = self._activation_bytes()
        avail = utilization * stats["bytes_limit"] - stats.get("bytes_in_use", 0) - activations
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
        try:
            compiled = jax.jit(self._fused, static_argnames=("all_greedy", "num_logprobs")).lower(
                self.params, kv, inputs, self._prev_like(), np.full(T, -1, np.int32), samp,
                all_greedy=False, num_logprobs=0).compile()
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

    # -- steps
    def execute(self, batch: StepBatch) -> StepHandle:
        """Dispatch one step; returns at once (the device works on)."""
        key = batch.shape_key
        first = key not in self._compiled
        if first:
            self._compiled.add(key)
            self.log(f"compiling step #{len(self._compiled)}: tokens={key[0]} blocks/seq={key[1]}"
                     f"{'' if key[2] else ' sampling'}{f' logprobs={key[3]}' if key[3] else ''}"
                     f"{' penalties' if key[4] else ''}{' min_tokens' if key[6] else ''}")
            t0 = time.perf_counter()
        if batch.from_prev.max() >= 0:
            assert self._prev_step == batch.step - 1, "a pending token must come from the step just before"
        self.kv, out = self._fn(self.params, self.kv, batch.inputs, self._prev_tokens, batch.from_prev,
                                batch.sampling, all_greedy=batch.all_greedy, num_logprobs=batch.num_logprobs)
        if first:
            out["tokens"].block_until_ready()
            self.compile_seconds += time.perf_counter() - t0
        self._prev_tokens, self._prev_step = out["tokens"], batch.step
        for a in out.values():
            a.copy_to_host_async()
        return StepHandle(batch, out)

    @staticmethod
    def read(handle: StepHandle) -> dict[str, np.ndarray]:
        """The step's samples on the host (waits for that step only)."""
        return {k: np.asarray(v) for k, v in handle.out.items()}

    def _warmup_batches(self) -> list[StepBatch]:
        """One greedy batch per token bucket (writes nothing to the cache)."""
        from kiln.runtime.batch import SeqChunk, prepare_inputs

        out, T = [], 16
        while True:
            S = min(T, self.max_num_seqs)
            inputs, _ = prepare_inputs([SeqChunk([0], 0, [0])], self.block_size, pad_tokens=T, pad_seqs=S,
                                       pad_blocks=min(self.max_blocks, 16), pad_logits=S)
            inputs["slot_mapping"][:] = -1  # writes nothing
            out.append(StepBatch(-10, inputs, np.full(T, -1, np.int32), _dummy_sampling(S), True, 0, 1))
            if T >= self.max_num_tokens:
                return out
            T *= 2

    def warmup(self) -> None:
        """Compile the greedy step for every token bucket now, not on first use."""
        for b in self._warmup_batches():
            self.execute(b)
        self._prev_step = -1

    def precompile(self, workers: int = 8) -> None:
        """Compile every token bucket in parallel threads (XLA compiles outside the GIL),
        without running them: what `kiln build` uses to fill the persistent compilation
        cache, from which a later `execute` loads each executable."""
        from concurrent.futures import ThreadPoolExecutor

        def compile_one(b: StepBatch):
            self._fn.lower(self.params, self.kv, b.inputs, self._prev_tokens, b.from_prev, b.sampling,
                           all_greedy=b.all_greedy, num_logprobs=b.num_logprobs).compile()
            self.log(f"compiled tokens={b.inputs['token_ids'].shape[0]}")

        batches = self._warmup_batches()
        with ThreadPoolExecutor(max(1, min(workers, len(batches)))) as pool:
            list(pool.map(compile_one, batches))

def _dummy_sampling(S: int) -> dict:
    return dict(temperature=np.zeros(S, np.float32), top_k=np.zeros(S, np.int32), top_p=np.ones(S, np.float32),
                min_p=np.zeros(S, np.float32), keys=np.zeros((S, 2), np.uint32))
