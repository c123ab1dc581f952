"""End-to-end: Kiln vs the Hugging Face transformers baseline on the same model shape.

    python3 benchmarks/bench_e2e.py [--preset llama-3-8b] [--quick] [--quant fp8]
    python3 benchmarks/bench_e2e.py --part kiln --quant fp8 --workloads throughput_128_128,latency_128_512
    python3 benchmarks/bench_e2e.py --table        # the table of the results under $OUT

Runs, each part in its own process (so JAX and PyTorch do not share the GPU's memory):
  kiln  `kiln bench` throughput (ISL/OSL 128/128, 1024 requests; 2048/128; 128/2048) and
        batch-1 latency (128 in / 512 out), bf16, random weights
  hf    transformers on a random-weight model of the same shape: continuous batching
        (`generate_batch`, paged attention) on the same 128/128 workload, and plain
        `generate` at batch 1 (128 in / 512 out)
Writes bench_e2e_kiln_<quant>.json (after each workload) and bench_e2e_hf.json under $OUT
(or the current directory) and prints one table of them.
"""

import argparse
import json
import os
import subprocess
import sys
import time

OUT = os.environ.get("OUT", ".")


WORKLOADS = {  # name -> (bench args, requests at full size)
    "throughput_128_128": (dict(mode="throughput", isl=128, osl=128), 1024),
    "latency_128_512": (dict(mode="latency", isl=128, osl=512), 2),
    "throughput_2048_128": (dict(mode="throughput", isl=2048, osl=128), 512),
    "throughput_128_2048": (dict(mode="throughput", isl=128, osl=2048), 256),
}


def kiln_part(preset, quick, extra, quant=None, workloads=None, scale=1.0, deadline=None, requests=None, tag=""):
    """Each workload in turn on one engine; results written after each (a later one may not
    finish inside the deadline). `scale` shrinks the throughput request counts."""
    from kiln import LLM
    from kiln.runtime import bench

    t0 = time.time()
    extra = {"max_num_seqs": 512, "max_num_tokens": 4096, **extra}
    llm = LLM(f"random:{preset}", dtype="bfloat16", quantization=quant, max_model_len=2304, **extra)
    res = {"_load_s": time.time() - t0, "_quant": quant or "bf16", "_compile_s_at_load": llm.runner.compile_seconds,
           "_engine": {**{k: extra.get(k) for k in ("max_num_seqs", "max_num_tokens", "kv_cache_dtype", "tp")},
                       "compiler_options": llm.runner.compiler_options, "kv_blocks": llm.runner.num_blocks}}
    names = workloads or (list(WORKLOADS)[:2] if quick else list(WORKLOADS))
    for name in names:
        if deadline and time.time() > deadline:
            res[name] = {"skipped": "deadline"}
            continue
        kw, n = WORKLOADS[name]
        n = n if kw["mode"] == "latency" else max(16, int(n * (0.125 if quick else scale)))
        n = (requests or {}).get(name, n)
        t, before, c0 = time.time(), llm.engine.time_split(), llm.runner.compile_seconds
        rep = bench.run(llm, bench.BenchArgs(num_requests=n, **kw), log=lambda m: print(m, file=sys.stderr, flush=True))
        rep["wall_s"] = time.time() - t
        rep["compile_s"] = llm.runner.compile_seconds - c0  # warm-up and timed run
        after = llm.engine.time_split()  # warm-up and timed run together (bench.run's engine_time: the timed run)
        rep["engine_time_with_warmup"] = {k: after[k] - before[k] for k in ("steps", "step_s", "device_wait_s", "host_s")}
        res[name] = rep
        print(name, res["_quant"], json.dumps(rep["results"]), json.dumps(rep["roofline"]), json.dumps(rep["engine_time"]),
              f"compile_s={rep['compile_s']:.1f}", flush=True)
        with open(os.path.join(OUT, f"bench_e2e_kiln_{res['_quant']}{tag}.json"), "w") as f:
            json.dump(res, f, indent=1)
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
    ap.add_argument("--quant", default=None, help="fp8 | int8_wo | int4_wo (kiln part)")
    ap.add_argument("--workloads", default=None, help=f"comma list of {', '.join(WORKLOADS)}")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the throughput request counts")
    ap.add_argument("--requests", default=None, help="per-workload request counts: NAME=N,...")
    ap.add_argument("--deadline-s", type=float, default=None, help="start no workload after this many seconds")
    ap.add_argument("--attention", default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size (skips the memory estimate's compile)")
    ap.add_argument("--max-num-seqs", type=int, default=512,
                    help="sequences per step (512: +10%% over 256 on the H100 8B shape)")
    ap.add_argument("--max-num-tokens", type=int, default=4096)
    ap.add_argument("--compiler-option", action="append", default=[], metavar="NAME=VALUE",
                    help="XLA option of the step compiles (repeatable; default: Kiln's rule)")
    ap.add_argument("--kv-cache-dtype", default=None, help="fp8: e4m3 KV cache")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel devices (kiln part)")
    ap.add_argument("--tag", default="", help="suffix of the result file name (bench_e2e_kiln_<quant><tag>.json)")
    a = ap.parse_args()
    extra = {"attention": a.attention} if a.attention else {}
    extra.update(max_num_seqs=a.max_num_seqs, max_num_tokens=a.max_num_tokens)
    if a.tp > 1:
        extra["tp"] = a.tp
    if a.kv_cache_dtype:
        extra["kv_cache_dtype"] = a.kv_cache_dtype
    if a.compiler_option:
        from kiln.cli import _compiler_options

        extra["compiler_options"] = _compiler_options(a.compiler_option)
    if a.num_kv_blocks:
        extra["num_kv_blocks"] = a.num_kv_blocks
    if a.gpu_memory_utilization:
        extra["gpu_memory_utilization"] = a.gpu_memory_utilization
    deadline = time.time() + a.deadline_s if a.deadline_s else None
    if a.part != "all":
        if a.part == "kiln":
            res = kiln_part(a.preset, a.quick, extra, a.quant, a.workloads and a.workloads.split(","), a.scale, deadline,
                            {k: int(v) for k, v in (kv.split("=") for kv in a.requests.split(","))} if a.requests else None,
                            a.tag)
        else:
            res = hf_part(a.preset, a.quick)
            with open(os.path.join(OUT, "bench_e2e_hf.json"), "w") as f:
                json.dump(res, f, indent=1)
        return
    for part in ("kiln",) + (() if a.skip_hf else ("hf",)):  # each part in its own process, same options
        subprocess.run([sys.executable, __file__] + sys.argv[1:] + ["--part", part], check=False)
    print_table()


def print_table():
    """One table of every bench_e2e_*.json under $OUT."""
    import glob

    print("\n| engine | workload | out tok/s | transformers out tok/s | TTFT p50 ms | TPOT p50 ms | ITL p50 ms | roofline tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    hf = {}
    if os.path.exists(os.path.join(OUT, "bench_e2e_hf.json")):
        hf = json.load(open(os.path.join(OUT, "bench_e2e_hf.json")))
    for p in sorted(glob.glob(os.path.join(OUT, "bench_e2e_kiln_*.json"))):
        res = json.load(open(p))
        for name, rep in res.items():
            if name.startswith("_") or "results" not in rep:
                continue
            r, roof = rep["results"], rep["roofline"]
            h = hf.get(name, {}).get("output_tokens_per_s")
            eng = res.get("_engine", {})
            kvd = f", {eng['kv_cache_dtype']} KV" if eng.get("kv_cache_dtype") else ""
            print(f"| {res['_quant']} (seqs {eng.get('max_num_seqs', 256)}, tokens {eng.get('max_num_tokens', 2048)}{kvd}) | {name} ({r['requests']} req) | {r['output_tokens_per_s']:,.0f} | {h and f'{h:,.0f}'} | "
                  f"{r['ttft_ms_p50']:.1f} | {r['tpot_ms_p50'] or 0:.2f} | {r['itl_ms_p50'] or 0:.2f} | "
                  f"{roof['roofline_output_tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        print_table()
    else:
        main()
