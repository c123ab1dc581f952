"""Build time, cold start and warm start for a Llama-3-8B-shaped engine (random weights).

    python3 benchmarks/bench_build.py [--preset llama-3-8b]

  build       `kiln build --random-weights PRESET -o ENGINE` (passes, orbax weights, the build buckets
              compiled with cuBLAS GEMMs: xla_gpu_enable_triton_gemm=false); its peak host RSS, also
              per build stage, beside a process that only starts JAX on the GPU
  cold start  a fresh process: LLM("random:PRESET") built in memory, no compilation cache,
              up to the first generated token (XLA's default GEMMs: the reference for the step
              speed, 8 more 128-token prompts timed after the first token)
  warm start  a fresh process: LLM(ENGINE) up to the first generated token (weights from
              orbax, steps from the engine's persistent compilation cache)
Each start is a separate process; results in $OUT/bench_build.json. `--warm-env KILN_RESTORE_THREADS=1`
adds a warm start with that environment (repeatable); `--build-env KILN_COMPILE_THREADS=4` one more build.
"""

import argparse
import json
import os
import subprocess
import sys
import time

OUT = os.environ.get("OUT", ".")
ENGINE_OPTS = ["--dtype", "bfloat16", "--max-num-seqs", "256", "--max-num-tokens", "2048", "--max-model-len", "2304",
               "--gpu-memory-utilization", "0.85"]
BUILD_OPTS = ["--compiler-option", "xla_gpu_enable_triton_gemm=false"]  # cuBLAS GEMMs: no Triton GEMM autotuning

START = r"""
import sys, time, json
t0 = time.perf_counter()
import jax
from jax import monitoring
misses = []
monitoring.register_event_listener(lambda n, **k: misses.append(n) if n == "/jax/compilation_cache/cache_misses" else None)
from kiln import LLM, SamplingParams
t_import = time.perf_counter() - t0
kw = json.loads(sys.argv[2])
llm = LLM(sys.argv[1], **kw)
t_load = time.perf_counter() - t0
out = llm.generate([[1000 + i for i in range(128)]], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
t_first = time.perf_counter() - t0
n_miss = len(misses)
# the same 128-token bucket again (new prompts: no prefix hit): the step's speed with this start's executable
t = time.perf_counter()
for r in range(1, 9):
    llm.generate([[2000 + 300 * r + i for i in range(128)]], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
prefill_ms = (time.perf_counter() - t) / 8 * 1e3
print("RESULT", json.dumps({"import_s": t_import, "load_s": t_load, "first_token_s": t_first,
                            "compile_misses": n_miss, "compile_s": llm.runner.compile_seconds,
                            "prefill128_request_ms": prefill_ms, "misses_after": len(misses) - n_miss}))
"""


def start(model, kw, env=None):
    r = subprocess.run([sys.executable, "-c", START, model, json.dumps(kw)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    if not line:
        print(r.stdout[-3000:], r.stderr[-3000:])
        return {"error": r.stderr[-500:]}
    out = json.loads(line[0][7:])
    out["log"] = [ln for ln in r.stderr.splitlines() if ln.startswith("kiln:")][:12]
    return out


def baseline_rss_gb() -> float | None:
    """Peak RSS of a process that only starts JAX on the GPU: what the runtime itself holds."""
    r = subprocess.run([sys.executable, "-c", "import jax, jax.numpy as jnp, resource; jnp.ones(4).block_until_ready(); "
                        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"], capture_output=True, text=True)
    return int(r.stdout.split()[-1]) * 1024 / 1e9 if r.stdout.split() else None


def build(a, env=None) -> dict:
    """`kiln build` of the preset into `a.engine` (with `env` added to the environment), its
    resident memory sampled every 0.1 s: the peak (VmHWM) and the peak within each stage of its
    log ("[build] ... ..." starts a stage)."""
    import tempfile
    import threading

    cmd = [sys.executable, "-m", "kiln.cli", "build", "--random-weights", a.preset, "-o", a.engine] + ENGINE_OPTS + BUILD_OPTS
    t = time.perf_counter()
    out = tempfile.TemporaryFile("w+")
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    stage, peaks, hwm, err = ["start"], {}, [0.0], []

    def read():
        for ln in p.stderr:
            err.append(ln)
            if ln.startswith("[build]") and ln.rstrip().endswith("..."):
                stage[0] = ln[8:].strip().rstrip(" .")[:60]

    th = threading.Thread(target=read, daemon=True)
    th.start()
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                kb = {x.split(":")[0]: int(x.split()[1]) for x in f if x.startswith(("VmRSS:", "VmHWM:"))}
            peaks[stage[0]] = max(peaks.get(stage[0], 0.0), kb["VmRSS"] * 1024 / 1e9)
            hwm[0] = kb["VmHWM"] * 1024 / 1e9
        except (OSError, KeyError):
            pass
        time.sleep(0.1)
    th.join()
    stderr = "".join(err)
    res = {"build_s": time.perf_counter() - t, "build_peak_host_rss_gb": hwm[0],
           "build_rss_gb_by_stage": {k: round(v, 2) for k, v in peaks.items()},
           "build_log": [ln for ln in stderr.splitlines() if ln.startswith("[build]")]}
    print("build", env or "", round(res["build_s"], 1), "peak host RSS GB", round(hwm[0], 2), "by stage",
          res["build_rss_gb_by_stage"], "\n".join(res["build_log"]), stderr[-1500:] if p.returncode else "", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--engine", default="/tmp/kiln-engine")
    ap.add_argument("--warm-env", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                    help="one more warm start with these environment variables (repeatable), "
                         "e.g. KILN_RESTORE_THREADS=1 or KILN_RESTORE_CONCURRENT_GB=4")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold start")
    ap.add_argument("--build-only", action="store_true", help="no starts: the build alone")
    ap.add_argument("--build-env", action="append", default=[], metavar="NAME=VALUE",
                    help="one more build with these environment variables (repeatable), e.g. KILN_COMPILE_THREADS=4")
    a = ap.parse_args()
    res = {"baseline_jax_gpu_rss_gb": baseline_rss_gb(), **build(a)}
    for item in a.build_env:  # more builds (the last one's engine is kept for the starts below)
        env = dict(kv.split("=", 1) for kv in item.split(","))
        res["build_" + "_".join(f"{k}={v}" for k, v in env.items())] = build(a, env)
    with open(os.path.join(OUT, "bench_build.json"), "w") as f:  # the builds alone (--build-only stops here)
        json.dump(res, f, indent=1)
    res["engine_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(a.engine) for f in fs)
    kw = dict(dtype="bfloat16", max_num_seqs=256, max_num_tokens=2048, max_model_len=2304, gpu_memory_utilization=0.85)
    runs = [] if a.build_only else [("warm_start", a.engine, {}, None), ("warm_start_2", a.engine, {}, None)]
    for item in a.warm_env:
        env = dict(kv.split("=", 1) for kv in item.split(","))
        runs.append(("warm_start_" + "_".join(f"{k}={v}" for k, v in env.items()), a.engine, {}, env))
    runs += [] if a.no_cold or a.build_only else [("cold_start", f"random:{a.preset}", kw, None)]
    for name, model, k, env in runs:
        res[name] = start(model, k, env)
        print(name, res[name], flush=True)
        with open(os.path.join(OUT, "bench_build.json"), "w") as f:  # after each part: a cut run keeps what it did
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
