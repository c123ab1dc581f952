"""Where an engine step's wall time goes on the host, in a throughput run on one GPU.

    python3 benchmarks/probe_engine_loop.py [--quant fp8 --kv-cache-dtype fp8] [--isl 128 --osl 128 --num-requests 1024]
    python3 benchmarks/probe_engine_loop.py --latency --num-requests 2 --osl 512 [--split-k-tile-layout]  # batch 1
    python3 benchmarks/probe_engine_loop.py --tile-layout | --prefetch-pages | --attention-config 32/2/2  # A/B
    python3 benchmarks/probe_engine_loop.py --quant fp8 --kv-cache-dtype fp8 \
        --variant inline:KILN_DISPATCH_THREAD=0 --variant thread:KILN_DISPATCH_THREAD=1   # one engine, alternating
    python3 benchmarks/probe_engine_loop.py --quant fp8 --kv-cache-dtype fp8 \
        --variant gc:KILN_FREEZE_HEAP=0 --variant frozen:KILN_FREEZE_HEAP=1   # the collector's pauses (each run reports them)

Builds the engine as `bench_e2e.py` does (random llama-3-8b, 512 sequences / 4096 tokens per
step), runs `kiln bench`'s throughput workload once (warm-up and compiles), then runs it again
with each part of `Engine.step` timed: intake + schedule, the step's host arrays
(`StepBuilder.build`), the runner's dispatch (`execute`), the wait for the previous step's
samples (`read`: the device still busy), resolving them (`_process` without the wait) and
building the outputs. Decode-only steps and mixed steps are reported apart (medians, ms).
With the loop overlapped, a device-bound step waits in `read`; a host-bound one barely does.
Writes engine_loop.json under $OUT (or .)."""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--quant", default=None)
    ap.add_argument("--kv-cache-dtype", default=None)
    ap.add_argument("--num-kv-blocks", type=int, default=16000)
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=128)
    ap.add_argument("--num-requests", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-tokens", type=int, default=4096)
    ap.add_argument("--compiler-option", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:ENV=VALUE,...",
                    help="timed runs per variant on the one engine, alternating (as ab_step.py; for variables read "
                         "per step, e.g. inline:KILN_DISPATCH_THREAD=0 thread:KILN_DISPATCH_THREAD=1)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--latency", action="store_true",
                    help="one request at a time (kiln bench's latency mode; e.g. --num-requests 2 --osl 512)")
    ap.add_argument("--tile-layout", action="store_true",
                    help="attention through the q relayout / tile outputs / gather (in_place=False): an A/B")
    ap.add_argument("--split-k-tile-layout", action="store_true",
                    help="split-K attention (batch 1) with its partials in tile layout, the old default (in_place_split_k=False)")
    ap.add_argument("--prefetch-pages", action="store_true",
                    help="attention key steps read the next step's block-table entries (prefetch_pages=True)")
    ap.add_argument("--attention-config", default=None,
                    help="force the decode attention tiles: block_k/warps/stages (an A/B against the default)")
    a = ap.parse_args()

    from kiln import LLM
    if a.attention_config or a.tile_layout or a.split_k_tile_layout or a.prefetch_pages:
        import dataclasses

        from kiln.runtime.kernels import ragged_paged_attention as rpa
        choose = rpa._choose

        def forced(*args):
            cfg = choose(*args)
            if a.tile_layout:
                cfg = dataclasses.replace(cfg, in_place=False)
            if a.split_k_tile_layout:
                cfg = dataclasses.replace(cfg, in_place_split_k=False)
            if a.prefetch_pages:
                cfg = dataclasses.replace(cfg, prefetch_pages=True)
            if a.attention_config and cfg.splits == 1 and cfg.block_q * 4 <= 16:  # decode-shaped tiles only
                bk, warps, stages = (int(x) for x in a.attention_config.split("/"))
                cfg = dataclasses.replace(cfg, block_k=bk, num_warps=warps, num_stages=stages)
            return cfg
        rpa._choose = forced
    from kiln.runtime import bench

    # cuBLAS GEMMs, as bench_e2e.py --compiler-option; not at batch 1, where fp8 weights run W8A16 through
    # XLA's Triton convert-in-dot (without it they are dequantized whole: 64.6 tok/s, BENCHMARKS.md session 5)
    from kiln.cli import _compiler_options

    opts = {**({} if a.latency else {"xla_gpu_enable_triton_gemm": False}), **_compiler_options(a.compiler_option)}
    llm = LLM(f"random:{a.preset}", dtype="bfloat16", quantization=a.quant, max_model_len=2304, max_num_seqs=a.max_num_seqs,
              max_num_tokens=a.max_num_tokens, kv_cache_dtype=a.kv_cache_dtype, num_kv_blocks=a.num_kv_blocks,
              compiler_options=opts)
    args = bench.BenchArgs(mode="latency" if a.latency else "throughput", isl=a.isl, osl=a.osl, num_requests=a.num_requests)
    first = bench.run(llm, args, log=lambda m: print(m, file=sys.stderr, flush=True))["results"]
    print("warm-up run", json.dumps(first), flush=True)

    eng, run = llm.engine, llm.runner
    rec: list[dict] = []
    cur: dict = {}

    def timed(obj, name, key):
        fn = getattr(obj, name)

        def wrapper(*args, **kw):
            t = time.perf_counter()
            out = fn(*args, **kw)
            cur[key] = cur.get(key, 0.0) + time.perf_counter() - t
            if key == "build":
                cur["tokens"] = len(out.inputs["token_ids"])
                cur["real"] = int((out.inputs["slot_mapping"] >= 0).sum())
                cur["seqs"] = out.num_seqs
            return out
        setattr(obj, name, wrapper)

    timed(eng.scheduler, "schedule", "schedule")
    timed(eng.builder, "build", "build")
    timed(run, "execute", "execute")  # on the dispatch thread where the engine submits (runner.py)
    timed(run, "submit", "submit")
    timed(run, "read", "read")
    timed(eng, "_process", "process")
    timed(eng, "_output", "output")
    step = eng.step

    def step_wrapper():
        cur.clear()
        t = time.perf_counter()
        out = step()
        cur["step"] = time.perf_counter() - t
        rec.append(dict(cur))
        return out
    eng.step = step_wrapper

    gcs: list[tuple[int, float]] = []  # (generation, seconds) of each collection during a timed run

    def on_gc(phase, info):
        if phase == "start":
            on_gc.t = time.perf_counter()
        elif hasattr(on_gc, "t"):
            gcs.append((info["generation"], time.perf_counter() - on_gc.t))
    gc.callbacks.append(on_gc)

    seeds = iter(range(7, 1000))  # fresh prompts for every timed run: no prefix-cache hits across runs

    def summary(rows):
        if not rows:
            return {}
        out = {"n": len(rows)}
        for k in ("step", "schedule", "build", "submit", "execute", "read", "process", "output"):
            out[k + "_ms"] = statistics.median(r.get(k, 0.0) for r in rows) * 1e3
        steps = sorted(r.get("step", 0.0) for r in rows)
        out["step_p90_ms"], out["step_max_ms"] = steps[int(0.9 * (len(steps) - 1))] * 1e3, steps[-1] * 1e3
        out["process_minus_read_ms"] = statistics.median(r.get("process", 0) - r.get("read", 0) for r in rows) * 1e3
        out["sum_ms"] = sum(r.get("step", 0) for r in rows) * 1e3
        out["read_sum_ms"] = sum(r.get("read", 0) for r in rows) * 1e3
        return out

    def timed_run(label: str) -> dict:
        rec.clear()
        gcs.clear()
        reqs = bench.synthetic_requests(a.num_requests, a.isl, a.osl, llm.runner.graph.meta.get("vocab_size", 32000),
                                        seed=next(seeds))
        t = time.perf_counter()
        res = (bench.run_latency if a.latency else bench.run_throughput)(llm, reqs)
        wall = time.perf_counter() - t
        print(f"timed run {label}", json.dumps(res), flush=True)
        decode = [r for r in rec if r.get("seqs") and r.get("real") == r.get("seqs")]
        mixed = [r for r in rec if r.get("seqs") and r.get("real", 0) > r.get("seqs", 0)]
        rep = {"wall_s": wall, "steps": len(rec), "results": res, "decode": summary(decode), "mixed": summary(mixed),
               "decode_shapes": collections.Counter(r["tokens"] for r in decode).most_common(4),
               "host_outside_read_ms_total": sum(r["step"] - r.get("read", 0) for r in rec) * 1e3,
               "gc": {f"gen{g}": {"n": len(ps), "ms": round(sum(ps) * 1e3, 2), "max_ms": round(max(ps, default=0.0) * 1e3, 2)}
                      for g in range(3) for ps in [[s for gen, s in gcs if gen == g]]}}
        for k in ("decode", "mixed"):
            print(k, json.dumps({x: (round(v, 3) if isinstance(v, float) else v) for x, v in rep[k].items()}), flush=True)
        print("wall", round(wall, 3), "steps", len(rec), "host outside read (s)",
              round(rep["host_outside_read_ms_total"] / 1e3, 3), "gc", json.dumps(rep["gc"]), flush=True)
        return rep

    if not a.variant:
        rep = timed_run("")
    else:  # the same engine, variants alternating: environment variables read per step (KILN_DISPATCH_THREAD)
        from ab_step import parse_variant, set_env

        variants = [parse_variant(v) for v in a.variant]
        base_env = {k: os.environ.get(k) for _, e in variants for k in e}
        rep = {"runs": []}
        for r in range(a.rounds):
            for name, env in variants:
                set_env(env, base_env)
                rep["runs"].append({"variant": name, "round": r, **timed_run(f"{name} (round {r})")})
        rep["out_tok_s"] = {name: [x["results"]["output_tokens_per_s"] for x in rep["runs"] if x["variant"] == name]
                            for name, _ in variants}
        print("out tok/s per variant", json.dumps(rep["out_tok_s"]), flush=True)
    eng.step = step
    with open(os.path.join(os.environ.get("OUT", "."), "engine_loop.json"), "w") as f:
        json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
