"""End-to-end: Kiln vs the Hugging Face transformers baseline on the same model shape.

    python3 benchmarks/bench_e2e.py [--preset llama-3-8b] [--quick]

Runs, each part in its own process (so JAX and PyTorch do not share the GPU's memory):
  kiln  `kiln bench` throughput (ISL/OSL 128/128, 1024 requests; 2048/128; 128/2048) and
        batch-1 latency (128 in / 512 out), bf16, random weights
  hf    transformers on a random-weight model of the same shape: continuous batching
        (`generate_batch`, paged attention) on the same 128/128 workload, and plain
        `generate` at batch 1 (128 in / 512 out)
Prints one table; writes bench_e2e.json under $OUT (or the current directory).
"""

import argparse
import json
import os
import subprocess
import sys
import time

OUT = os.environ.get("OUT", ".")


def kiln_part(preset, quick, extra):
    from kiln import LLM
    from kiln.runtime import bench

    n = 128 if quick else 1024
    llm = LLM(f"random:{preset}", dtype="bfloat16", max_num_seqs=256, max_num_tokens=2048, max_model_len=2304,
              **extra)
    res = {}
    runs = [("throughput_128_128", dict(mode="throughput", isl=128, osl=128, num_requests=n)),
            ("latency_128_512", dict(mode="latency", isl=128, osl=512, num_requests=2))]
    if not quick:
        runs += [("throughput_2048_128", dict(mode="throughput", isl=2048, osl=128, num_requests=n // 2)),
                 ("throughput_128_2048", dict(mode="throughput", isl=128, osl=2048, num_requests=n // 4))]
    for name, kw in runs:
        t, before = time.time(), llm.engine.time_split()
        rep = bench.run(llm, bench.BenchArgs(**kw), log=lambda m: print(m, file=sys.stderr, flush=True))
        rep["wall_s"] = time.time() - t
        after = llm.engine.time_split()  # warm-up and timed run together: host work vs waiting on the device
        rep["engine_time"] = {k: after[k] - before[k] for k in ("steps", "step_s", "device_wait_s", "host_s")}
        rep["engine_time"]["host_ms_per_step"] = rep["engine_time"]["host_s"] / max(rep["engine_time"]["steps"], 1) * 1e3
        res[name] = rep
        print(name, json.dumps(rep["results"]), json.dumps(rep["roofline"]), json.dumps(rep["engine_time"]), flush=True)
    return res


def hf_part(preset, quick):
    import numpy as np
    import torch
    import transformers

    from kiln.models.presets import preset_dict

    d = preset_dict(preset)
    cfg = transformers.AutoConfig.for_model(d.pop("architectures")[0].replace("ForCausalLM", "").lower(), **d)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    rng = np.random.default_rng(0)
    res = {}
    # batch 1: plain generate
    ids = torch.tensor([rng.integers(100, 32000, 128).tolist()], device="cuda")
    gc = transformers.GenerationConfig(max_new_tokens=512, min_new_tokens=512, do_sample=False, eos_token_id=None,
                                       pad_token_id=0)
    model.generate(ids, generation_config=transformers.GenerationConfig(max_new_tokens=8, do_sample=False,
                                                                       eos_token_id=None, pad_token_id=0))
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate(ids, generation_config=gc)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    res["latency_128_512"] = {"output_tokens_per_s": (out.shape[1] - 128) / dt, "duration_s": dt}
    print("hf latency", res["latency_128_512"], flush=True)
    # continuous batching
    n = 128 if quick else 1024
    prompts = [rng.integers(100, 32000, 128).tolist() for _ in range(n)]
    try:
        if hasattr(model, "set_attn_implementation"):  # the name changed across transformers versions
            try:
                model.set_attn_implementation("paged|sdpa")
            except Exception:
                model.set_attn_implementation("sdpa_paged")
    except Exception as e:  # older/newer names
        print("hf: sdpa_paged not available:", e, flush=True)
    gcb = transformers.GenerationConfig(max_new_tokens=128, min_new_tokens=128, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)
    try:
        model.generate_batch(inputs=prompts[:8], generation_config=gcb)
        t = time.perf_counter()
        outs = model.generate_batch(inputs=prompts, generation_config=gcb)
        dt = time.perf_counter() - t
        toks = sum(len(o.generated_tokens) for o in outs.values())
        res["throughput_128_128"] = {"output_tokens_per_s": toks / dt, "duration_s": dt, "requests": len(outs)}
    except Exception as e:
        res["throughput_128_128"] = {"error": f"{type(e).__name__}: {e}"[:400]}
    print("hf throughput", res["throughput_128_128"], flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--part", choices=["kiln", "hf", "all"], default="all")
    ap.add_argument("--attention", default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    a = ap.parse_args()
    extra = {"attention": a.attention} if a.attention else {}
    if a.gpu_memory_utilization:
        extra["gpu_memory_utilization"] = a.gpu_memory_utilization
    if a.part != "all":
        res = kiln_part(a.preset, a.quick, extra) if a.part == "kiln" else hf_part(a.preset, a.quick)
        with open(os.path.join(OUT, f"bench_e2e_{a.part}.json"), "w") as f:
            json.dump(res, f, indent=1)
        return
    for part in ("kiln",) + (() if a.skip_hf else ("hf",)):
        cmd = [sys.executable, __file__, "--part", part, "--preset", a.preset] + (["--quick"] if a.quick else [])
        if a.attention:
            cmd += ["--attention", a.attention]
        subprocess.run(cmd, check=False)
    res = {}
    for part in ("kiln", "hf"):
        p = os.path.join(OUT, f"bench_e2e_{part}.json")
        if os.path.exists(p):
            res[part] = json.load(open(p))
    print("\n| workload | Kiln out tok/s | transformers out tok/s | Kiln TTFT p50 ms | Kiln TPOT p50 ms | roofline tok/s |")
    print("|---|---|---|---|---|---|")
    for name, rep in res.get("kiln", {}).items():
        r, roof = rep["results"], rep["roofline"]
        hf = res.get("hf", {}).get(name, {}).get("output_tokens_per_s")
        print(f"| {name} | {r['output_tokens_per_s']:,.0f} | {hf and f'{hf:,.0f}'} | {r['ttft_ms_p50']:.1f} | "
              f"{r['tpot_ms_p50'] or 0:.2f} | {roof['roofline_output_tokens_per_s']:,.0f} |")
    with open(os.path.join(OUT, "bench_e2e.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
