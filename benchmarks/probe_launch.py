"""How long does the host take to dispatch one real engine step, and how long does the device
take to run it? (issue #8: at 512 sequences the fp8 decode loop became host-bound after the
decode attention got faster; `runner.execute` was 4.6 ms of the 12.7 ms step.)

    python3 benchmarks/probe_launch.py [--quant fp8 --kv-cache-dtype fp8]
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 benchmarks/probe_launch.py   # graphs off

Builds the random llama-3-8b engine (512 sequences), runs 512 short requests to meet a real
512-row decode batch, then for that batch's compiled step: the host time of one call with
the device idle before it (the call returns once everything is enqueued), the same with the
device still busy with the previous call, and the device time per call back to back. Writes
launch_<quant>.json under $OUT."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default=None)
    ap.add_argument("--kv-cache-dtype", default=None)
    ap.add_argument("--preset", default="llama-3-8b")
    a = ap.parse_args()

    import jax
    import numpy as np

    from kiln import LLM
    from kiln.runtime.sampling_params import SamplingParams
    from probe_step_profile import step_call  # benchmarks/ is on sys.path as the script's directory

    opts = {"xla_gpu_enable_triton_gemm": False} if a.quant == "fp8" else {}
    llm = LLM(f"random:{a.preset}", dtype="bfloat16", quantization=a.quant, max_model_len=512, max_num_seqs=512,
              max_num_tokens=4096, kv_cache_dtype=a.kv_cache_dtype, num_kv_blocks=16000, compiler_options=opts)
    eng, r = llm.engine, llm.runner
    seen = {}
    orig = r.execute

    def execute(batch):  # the decode-only batch with the most sequences
        real = int((batch.inputs["slot_mapping"] >= 0).sum())
        if real == batch.num_seqs and batch.num_seqs >= seen.get("decode", batch).num_seqs:
            seen["decode"] = batch
        return orig(batch)
    r.execute = execute
    rng = np.random.default_rng(0)
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for _ in range(512):
        eng.add_request(rng.integers(100, 32000, 120).tolist(), sp, output_kind="delta")
    while eng.has_unfinished():
        eng.step()
    b = seen["decode"]
    fn = r._executables[b.shape_key]
    call = step_call(r, b)
    for _ in range(3):
        call()["tokens"].block_until_ready()
    idle = []
    for _ in range(20):
        t = time.perf_counter()
        out = call()
        idle.append(time.perf_counter() - t)
        out["tokens"].block_until_ready()
    busy = []
    out = call()
    for _ in range(20):
        t = time.perf_counter()
        out = call()
        busy.append(time.perf_counter() - t)
    out["tokens"].block_until_ready()
    t = time.perf_counter()
    for _ in range(10):
        out = call()
    out["tokens"].block_until_ready()
    dev = (time.perf_counter() - t) / 10
    res = {"quant": a.quant or "bf16", "seqs": b.num_seqs, "tokens": len(b.inputs["token_ids"]), "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "dispatch_idle_ms": statistics.median(idle) * 1e3, "dispatch_busy_ms": statistics.median(busy) * 1e3,
           "device_ms_back_to_back": dev * 1e3, "device": jax.devices()[0].device_kind,
           "hlo_custom_calls": fn.as_text().count("custom_call_target")}
    print(json.dumps(res), flush=True)
    tag = (a.quant or "bf16") + ("_nocb" if "command_buffer=" in res["xla_flags"] else "")
    with open(os.path.join(os.environ.get("OUT", "."), f"launch_{tag}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
