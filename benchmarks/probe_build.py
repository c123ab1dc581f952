"""Where the build and the warm start of a Llama-3-8B-shaped engine spend their time (issue #6).

    python3 benchmarks/probe_build.py [--preset llama-3-8b] [--parts random,llm,trace,compile,cache,orbax]

One process, each part timed on its own (results in $OUT/probe_build.json):
  random   random weights: `random_params` as is, against one jit per (shape, dtype) made in bf16
  llm      LLM("random:PRESET") construction (graph, weights, passes, KV sizing, runner)
  trace    tracing + lowering of one step bucket to StableHLO (what a cache hit still pays)
  compile  XLA compile of the buckets 16 / 128 / 2048 under several compiler options
  cache    a persistent-cache hit: lower + fetch of a compiled step, against a fresh compile
  orbax    save (device -> host -> disk) and restore (disk -> device) of the weights, zstd (orbax's
           default) against uncompressed, from the page cache and after dropping it
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

OUT = os.environ.get("OUT", ".")
RES: dict = {}


def record(key, value):
    RES[key] = value
    print(key, value, flush=True)
    with open(os.path.join(OUT, "probe_build.json"), "w") as f:
        json.dump(RES, f, indent=1)


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def drop_page_cache():
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--parts", default="random,llm,trace,compile,cache,orbax")
    ap.add_argument("--dir", default="/tmp/kiln-probe")
    a = ap.parse_args()
    parts = a.parts.split(",")
    t0 = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kiln.models.loader import random_params
    from kiln.models.presets import preset_config
    from kiln.models.registry import build_graph

    jax.devices()
    record("import_s", time.perf_counter() - t0)
    cfg = preset_config(a.preset)

    if "random" in parts:
        g, dt = timed(build_graph, cfg, "bfloat16")
        record("graph_build_s", dt)
        p, dt = timed(lambda: jax.block_until_ready(random_params(g, 0)))
        record("random_params_s", dt)
        del p
        p, dt = timed(lambda: jax.block_until_ready(random_params(g, 1)))
        record("random_params_again_s", dt)
        del p

    llm = None
    if "llm" in parts or "trace" in parts or "compile" in parts or "cache" in parts or "orbax" in parts:
        from kiln import LLM

        llm, dt = timed(LLM, f"random:{a.preset}", dtype="bfloat16", max_num_seqs=256, max_num_tokens=2048,
                        max_model_len=2304, gpu_memory_utilization=0.85)
        record("llm_construct_s", dt)
    if llm is None:
        return
    runner = llm.runner
    from kiln.runtime.runner import pack_step

    batches = {len(b.inputs["token_ids"]): b for b in runner._warmup_batches()}

    def lower(fn, b):
        from kiln.runtime.runner import _abstract

        prev = jax.ShapeDtypeStruct((runner.max_num_seqs,), jnp.int32,
                                    sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        layout, packs = pack_step(b)
        return fn.lower(_abstract(runner.params), runner._kv_like, prev, packs, layout=layout,
                        all_greedy=b.all_greedy, num_logprobs=b.num_logprobs)

    if "trace" in parts:
        for T in (128, 2048):
            lw, dt = timed(lower, runner._fn, batches[T])
            record(f"trace_lower_T{T}_s", dt)
            record(f"stablehlo_chars_T{T}", len(lw.as_text()))
            lw, dt = timed(lower, runner._fn, batches[T])
            record(f"trace_lower_T{T}_again_s", dt)

    if "compile" in parts:
        variants = {"default": {}, "no_triton_gemm": {"xla_gpu_enable_triton_gemm": False},
                    "no_triton_gemm+autotune0": {"xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 0}}
        for name, opts in variants.items():
            for T in (16, 2048):
                try:
                    fn = jax.jit(runner._fused_packed, donate_argnums=(1,),
                                 static_argnames=("layout", "all_greedy", "num_logprobs"),
                                 **({"compiler_options": opts} if opts else {}))
                    lw, t_low = timed(lower, fn, batches[T])
                    ex, t_comp = timed(lw.compile)
                    b = batches[T]
                    packs = pack_step(b)[1]
                    run = lambda: ex(runner.params, runner.kv, runner._prev_tokens, packs)  # noqa: E731
                    runner.kv, out = run()  # the pools are donated: pass the new ones each time
                    jax.block_until_ready(out)
                    t = time.perf_counter()
                    for _ in range(5):
                        runner.kv, out = run()
                    jax.block_until_ready(out)
                    record(f"compile_{name}_T{T}", {"lower_s": t_low, "compile_s": t_comp,
                                                    "step_ms": (time.perf_counter() - t) / 5 * 1e3})
                except Exception as e:  # an option this XLA does not take
                    record(f"compile_{name}_T{T}", {"error": str(e).splitlines()[0][:200]})

    if "cache" in parts:
        from kiln.runtime.engine_dir import use_compile_cache

        cdir = tempfile.mkdtemp()
        use_compile_cache(cdir)
        opts = {"xla_gpu_enable_triton_gemm": False}
        for T in (128, 2048):
            fn = jax.jit(runner._fused, donate_argnums=(1,), static_argnames=("all_greedy", "num_logprobs"),
                         compiler_options=opts)
            lw, t_low = timed(lower, fn, batches[T])
            _, t_comp = timed(lw.compile)
            jax.clear_caches()
            fn = jax.jit(runner._fused, donate_argnums=(1,), static_argnames=("all_greedy", "num_logprobs"),
                         compiler_options=opts)
            lw, t_low2 = timed(lower, fn, batches[T])
            _, t_fetch = timed(lw.compile)
            record(f"cache_T{T}", {"miss_lower_s": t_low, "miss_compile_s": t_comp, "hit_lower_s": t_low2,
                                   "hit_fetch_s": t_fetch,
                                   "entry_bytes": sum(os.path.getsize(os.path.join(cdir, f)) for f in os.listdir(cdir))})
        jax.config.update("jax_compilation_cache_dir", None)

    if "orbax" in parts:
        import orbax.checkpoint as ocp

        params = runner.params
        runner.kv = None  # room for a restored copy of the weights beside these
        llm.engine = None
        nbytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in params.values())
        record("weights_gb", nbytes / 1e9)
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=dev) for k, v in params.items()}
        flavours = {
            "zstd_standard": (lambda: ocp.StandardCheckpointer(), None),
            "raw_pytree_zarr3": (lambda: ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(use_zarr3=True, use_compression=False)),
                                 "pytree"),  # what runtime/engine_dir.py writes
        }
        for name, (make, kind) in flavours.items():
            d = os.path.join(a.dir, name)
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(a.dir, exist_ok=True)
            ck = make()
            t = time.perf_counter()
            if kind == "pytree":
                ck.save(d, args=ocp.args.PyTreeSave(params))
            else:
                ck.save(d, params)
            t_block = time.perf_counter() - t
            ck.wait_until_finished()
            t_save = time.perf_counter() - t
            size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)

            def restore():
                if kind == "pytree":
                    c = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_zarr3=True, use_compression=False))
                    return c.restore(d, args=ocp.args.PyTreeRestore(
                        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
                return ocp.StandardCheckpointer().restore(d, target)

            r, t_warm = timed(lambda: jax.block_until_ready(restore()))
            del r
            dropped = drop_page_cache()
            r, t_cold = timed(lambda: jax.block_until_ready(restore()))
            del r
            record(f"orbax_{name}", {"save_blocking_s": t_block, "save_total_s": t_save, "disk_gb": size / 1e9,
                                     "restore_page_cache_s": t_warm, "restore_after_drop_s": t_cold,
                                     "cache_dropped": dropped, "restore_gb_per_s": nbytes / 1e9 / t_warm})
            shutil.rmtree(d, ignore_errors=True)
    record("total_s", time.perf_counter() - t0)


if __name__ == "__main__":
    sys.exit(main())
