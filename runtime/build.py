"""`kiln build`: checkpoint -> engine directory, stage by stage.

    load config ─► build graph ─► load weights ─► passes ─► save graph, tokenizer
                ─► compile the decode buckets and the largest into the engine's compilation cache
                   (while orbax writes the weights from the host) ─► commit

Each stage reports its time. The KV pool size is fixed here (it is part of the compiled
shapes): from `num_kv_blocks`, or from `gpu_memory_utilization` of this device's memory.
Peak host memory is one tensor: weights stream from the checkpoint to the device one at a
time, the passes transform them on the device, and orbax writes them from there.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from kiln.runtime.engine_dir import BuildConfig, EngineWriter, use_compile_cache
from kiln.runtime.kernels.quant_matmul import set_tuned_table

COMPILE_THREADS = 8


class _Stages:
    def __init__(self, log):
        self.log, self.times = log, {}

    @contextmanager
    def __call__(self, name: str):
        self.log(f"[build] {name} ...")
        t = time.perf_counter()
        yield
        self.times[name] = dt = time.perf_counter() - t
        self.log(f"[build] {name}: {dt:.1f} s")


def build(model: str | None, out_dir: str | Path, bc: BuildConfig, *, log=print, command: str | None = None) -> Path:
    """Build `model` (a checkpoint, a .gguf, None for the default, or `random:PRESET`) into
    `out_dir` with the options of `bc`. Returns the engine directory."""
    stage = _Stages(log)
    t0 = time.perf_counter()
    writer = EngineWriter(out_dir)
    try:
        use_compile_cache(writer.compile_cache_dir)  # every compile below lands in the engine,
        from kiln.runtime.llm import LLM              # the small ones made at import time too

        with stage("load and transform the model"):
            llm = LLM(model, dtype=bc.dtype, quantization=bc.quantization, kv_cache_dtype=bc.kv_cache_dtype,
                      tp=bc.tp, pp=bc.pp, max_num_seqs=bc.max_num_seqs, max_num_tokens=bc.max_num_tokens,
                      max_model_len=bc.max_model_len, kv_block_size=bc.kv_block_size,
                      num_kv_blocks=bc.num_kv_blocks, gpu_memory_utilization=bc.gpu_memory_utilization,
                      attention=bc.attention, compiler_options=bc.compiler_options, log=log)
        bc.compiler_options = llm.runner.compiler_options  # those this XLA accepted (None: the default rule's)
        bc.small_step_compiler_options = llm.runner.small_step_options
        bc.passes = list(llm.passes_run)
        bc.num_kv_blocks = llm.runner.num_blocks
        bc.max_model_len = llm.max_model_len
        with stage("save graph and tokenizer, start writing weights"):
            writer.save_graph(llm.graph)
            writer.save_tokenizer(llm.tokenizer)
            writer.save_weights(llm.params, wait=False)  # written in the background while we compile
            log(f"[build] weights' save: {writer.save_note}")
        files = ()
        from kiln.runtime.autotune import qlinear_shapes

        if bc.autotune_budget_s is not None and bc.tp * bc.pp == 1 and qlinear_shapes(llm.graph):
            with stage(f"autotune the quantized matmuls (budget {bc.autotune_budget_s:g} s)"):
                files = (_autotune(llm, writer, bc, log),)
        batches = llm.runner.build_batches()
        # compiles in parallel: each holds ~3 GB of host memory for the 8B shape (BENCHMARKS.md), so
        # their number bounds the build's peak host memory (KILN_COMPILE_THREADS)
        threads = max(1, int(os.environ.get("KILN_COMPILE_THREADS") or COMPILE_THREADS))
        with stage(f"compile {len(batches)} shape buckets ({min(threads, len(batches))} in parallel): tokens "
                   + ",".join(str(len(b.inputs["token_ids"])) for b in batches)):
            llm.runner.precompile(workers=threads, batches=batches)
        with stage("finish writing weights"):
            writer.wait()
        writer.write_manifest(config=llm.config.to_json(), build=bc, params=llm.params,
                              mesh_shape={"tp": bc.tp, "pp": bc.pp},
                              command=command or f"kiln build {model or ''} -o {out_dir}", files=files)
        path = writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        set_tuned_table(None)  # the table belongs to the engine: LLM(ENGINE_DIR) sets it again
    log(f"[build] engine written to {path} in {time.perf_counter() - t0:.1f} s")
    return path


def _autotune(llm, writer: EngineWriter, bc: BuildConfig, log) -> str:
    """Time the quantized matmuls of every token bucket, save autotune.json and set the table
    before the steps are traced (the compiled steps hold the choice). Returns the file's name."""
    import jax

    from kiln.runtime import autotune

    counts = [len(b.inputs["token_ids"]) for b in llm.runner._warmup_batches()]
    # the timing compiles stay out of the engine's cache: entries are written only above this
    # compile time, read per write (turning the cache off would stick: JAX checks that once)
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    try:
        table = autotune.autotune(llm.graph, llm.dtype, counts, budget_s=bc.autotune_budget_s, log=log)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
    autotune.save(table, writer.tmp, device_kind=jax.devices()[0].device_kind, budget_s=bc.autotune_budget_s)
    set_tuned_table(autotune.as_table(table))
    kernel = sum(v["impl"] != "xla" for v in table.values())
    log(f"[build] autotune: {len(table)} (shape, tokens) entries, {kernel} on the kernel")
    return autotune.FILE
