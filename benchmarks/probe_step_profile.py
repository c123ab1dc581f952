"""Where does the real Llama-3-8B-shaped step lose time? One process per precision:

    python3 benchmarks/probe_step_profile.py --quant none|fp8 [--isl 128 --osl 64 --num-requests 256]
    python3 benchmarks/probe_step_profile.py --mlp      # the 32-layer MLP stack, W8A8 spellings

Engine part: load (phases timed), one throughput run through the engine (compiles), a second
identical run timed per engine step, then for the largest prefill step and the largest decode
step of that run: the device time per step (10 back-to-back calls), a JAX profiler trace of 3
calls summarised per kernel and per source line (from the compiled HLO's metadata), the
compiled HLO (gzipped, to $OUT) with its input_output_alias entries, pool-shaped copies,
transposes and GEMM custom calls, and memory statistics. Writes profile_<quant>.json.

MLP part: gate_up [4096, 2 x 14336] + SwiGLU + down [14336, 4096] for 32 layers in one jit at
M = 2048 and 256: bf16, W8A16, W8A8 with weights [K, N] and [N, K] (cuBLASLt FP8 wants both
operands K-major), each with its GEMM custom calls and transposes counted in the HLO.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

OUT = os.environ.get("OUT", ".")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- HLO and trace reading


def hlo_sources(text: str) -> dict[str, str]:
    """instruction name -> 'file:line op' from the compiled HLO's metadata (fusions carry the
    metadata of their root)."""
    out = {}
    for ln in text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", ln)
        if not m:
            continue
        f = re.search(r'source_file="([^"]+)"', ln)
        line = re.search(r"source_line=(\d+)", ln)
        op = re.search(r'op_name="([^"]+)"', ln)
        if f:
            out[m.group(1)] = f"{os.path.basename(f.group(1))}:{line.group(1) if line else '?'} " \
                              f"{(op.group(1).split('/')[-1] if op else '')[:40]}"
    return out


def hlo_categories(text: str) -> dict[str, str]:
    """instruction name -> a coarse kind for the per-kind split of a trace: 'gemm <out shape>'
    for cuBLAS calls, the Pallas kernel's name for Triton custom calls, 'fusion <op> <out shape>'
    else."""
    out = {}
    for ln in text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(?[\w\[\],{}\s]*?\)?)\s+[\w\-]+\(", ln)
        if not m:
            continue
        name, sh = m.group(1), re.search(r"\w+\[[\d,]*\]", m.group(2))
        shape = sh.group(0) if sh else "?"
        op = re.search(r'op_name="([^"]+)"', ln)
        opn = op.group(1) if op else ""
        if "__cublas" in ln:
            out[name] = f"gemm {shape}"
        elif "xla.gpu.triton" in ln and "pallas" in opn:
            out[name] = "pallas " + next((p for p in opn.split("/") if p.startswith("kiln_") or "attention" in p), opn[-50:])
        elif " fusion(" in ln:  # with its output shape: which activation a slow fusion produces
            out[name] = f"fusion {opn.split('/')[-1][:40]} {shape}"
    return out


def hlo_report(text: str, pool_shape: tuple) -> dict:
    dims = ",".join(str(d) for d in pool_shape)
    header = text.splitlines()[0] if text else ""
    alias = re.search(r"input_output_alias=\{(.*?)\}\s*(?:,|$)", header)
    targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
    copies = [ln.strip()[:200] for ln in text.splitlines()
              if re.search(r"\b(copy|copy-start)\(", ln) and dims in ln.split("=")[1 if "=" in ln else 0][:120]]
    transposes = [ln.strip()[:200] for ln in text.splitlines() if re.search(r"\btranspose\(", ln)
                  and "f8e4m3" in ln]
    return {"input_output_alias_entries": header.count("may-alias") + header.count("must-alias"),
            "alias_text_head": alias.group(1)[:300] if alias else None,
            "custom_call_targets": dict(targets), "pool_shaped_copies": copies[:8],
            "num_pool_shaped_copies": len(copies), "f8_transposes": transposes[:6],
            "num_f8_transposes": len(transposes),
            "num_fusions": len(re.findall(r"\bfusion\(", text))}


def trace_summary(logdir: str, sources: dict[str, str], steps: int, top: int = 30, cats: dict | None = None) -> dict:
    """Device kernels of a jax.profiler trace: total per kernel and per source line."""
    paths = glob.glob(os.path.join(logdir, "plugins/profile/*/*.trace.json.gz")) + \
        glob.glob(os.path.join(logdir, "plugins/profile/*/perfetto_trace.json.gz"))
    if not paths:
        return {"error": "no trace file"}
    d = json.load(gzip.open(paths[0]))
    ev = d["traceEvents"] if isinstance(d, dict) else d
    pname = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    tname = {(e["pid"], e.get("tid")): e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "thread_name"}
    dev = {p for p, n in pname.items() if "GPU" in n or "device" in n.lower()}
    by_kernel, by_src, threads = collections.Counter(), collections.Counter(), collections.Counter()
    by_cat = collections.Counter()
    count = collections.Counter()
    t_lo, t_hi = None, None
    for e in ev:
        if e.get("ph") != "X" or e.get("pid") not in dev:
            continue
        tn = tname.get((e["pid"], e.get("tid")), "")
        threads[tn] += e.get("dur", 0)
        if "Stream" not in tn and "stream" not in tn:
            continue
        args = e.get("args") or {}
        hop = args.get("hlo_op") or args.get("long_name") or ""
        name = e.get("name", "")
        key = hop or name
        by_kernel[key] += e["dur"]
        count[key] += 1
        by_src[sources.get(hop, "?" if hop else name[:60])] += e["dur"]
        by_cat[(cats or {}).get(key, "other " + key.split(".")[0][:30])] += e["dur"]
        t_lo = e["ts"] if t_lo is None else min(t_lo, e["ts"])
        t_hi = e["ts"] + e["dur"] if t_hi is None else max(t_hi, e["ts"] + e["dur"])
    busy = sum(by_kernel.values())
    return {"kernel_us_per_step": busy / steps, "span_us_per_step": ((t_hi or 0) - (t_lo or 0)) / steps,
            "threads_us": dict(threads.most_common(8)),
            "top_kernels": [(k, round(v / steps, 1), count[k] // steps, sources.get(k, "")) for k, v in by_kernel.most_common(top)],
            "by_source_us_per_step": [(k, round(v / steps, 1)) for k, v in by_src.most_common(top)],
            "by_kind_us_per_step": [(k, round(v / steps, 1)) for k, v in by_cat.most_common(40)]}


# --------------------------------------------------------------------------- engine part


def step_call(runner, batch):
    """A function that runs `batch`'s compiled step once more on the runner's cache (its inputs
    packed once), as the engine would, and returns the step's outputs."""
    from kiln.runtime.runner import pack_step

    fn, packs = runner._executables[batch.shape_key], pack_step(batch)[1]

    def call():
        runner.kv, out = fn(runner.params, runner.kv, runner._prev_tokens, packs)
        runner._prev_tokens = out["tokens"]
        return out
    return call


def engine_part(quant: str | None, isl: int, osl: int, n: int, mem_util: float, preset: str = "llama-3-8b",
                max_num_seqs: int = 256, kv_cache_dtype: str | None = None, max_num_tokens: int = 2048) -> dict:
    import jax
    import numpy as np

    import kiln.models.loader as loader
    import kiln.passes.pipeline as pipeline
    from kiln import LLM
    from kiln.runtime.sampling_params import SamplingParams

    rep: dict = {"quant": (quant or "bf16") + (f"_kv{kv_cache_dtype}" if kv_cache_dtype else ""),
                 "phases": {"transforms": []}}
    orig_rp, orig_tr = loader.random_params, pipeline._apply_transforms

    def rp(*a, **k):
        t = time.perf_counter()
        r = jax.block_until_ready(orig_rp(*a, **k))
        rep["phases"]["random_params_s"] = time.perf_counter() - t
        return r

    def tr(res, params):
        t = time.perf_counter()
        r = jax.block_until_ready(orig_tr(res, params))
        rep["phases"]["transforms"].append((len(res.transforms), round(time.perf_counter() - t, 2)))
        return r

    loader.random_params, pipeline._apply_transforms = rp, tr
    t = time.perf_counter()
    llm = LLM(f"random:{preset}", dtype="bfloat16", quantization=quant, max_num_seqs=max_num_seqs, max_num_tokens=max_num_tokens,
              max_model_len=2304, gpu_memory_utilization=mem_util, kv_cache_dtype=kv_cache_dtype,
              **({"num_kv_blocks": int(os.environ["PROBE_KV_BLOCKS"])} if "PROBE_KV_BLOCKS" in os.environ else {}))
    rep["phases"]["llm_init_s"] = time.perf_counter() - t
    log("init", rep["phases"])
    r = llm.runner
    pool = r.kv[0]["k"]
    rep["kv_blocks"] = r.num_blocks
    rep["mem_after_init"] = jax.devices()[0].memory_stats()

    seen: dict = {}
    orig_exec = r.execute

    def execute(batch):
        seen[batch.shape_key] = batch
        return orig_exec(batch)

    r.execute = execute
    sp = SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True)

    def one_run(seed):  # fresh random prompts each run: no prefix-cache hits
        rng = np.random.default_rng(seed)
        eng = llm.engine
        for _ in range(n):
            eng.add_request(rng.integers(100, 32000, isl).tolist(), sp, output_kind="delta")
        steps = []
        while eng.has_unfinished():
            t0 = time.perf_counter()
            eng.step()
            steps.append(time.perf_counter() - t0)
        return steps

    t = time.perf_counter()
    one_run(0)
    rep["first_run_s"] = time.perf_counter() - t
    rep["compile_s"] = r.compile_seconds
    rep["mem_after_first_run"] = jax.devices()[0].memory_stats()
    # timed run, per engine step: which batch shape each step dispatched
    sizes = []
    orig2 = r.execute

    def execute2(batch):
        sizes.append((len(batch.inputs["token_ids"]), int((batch.inputs["slot_mapping"] >= 0).sum()), batch.num_seqs))
        return orig2(batch)

    r.execute = execute2
    t = time.perf_counter()
    steps = one_run(1)
    rep["second_run_s"] = time.perf_counter() - t
    rep["second_run_out_tok_s"] = n * osl / rep["second_run_s"]
    walls = [s * 1e3 for s in steps]
    rep["engine_steps"] = len(steps)
    # step i's wall time covers dispatching step i and reading back step i-1
    pre = [w for w, s in zip(walls, sizes) if s[1] > s[2]]
    dec = [w for w, s in zip(walls, sizes) if s[1] == s[2] and s[2] > 0]
    rep["engine_step_ms"] = {"prefill_median": statistics.median(pre) if pre else None, "prefill_n": len(pre),
                             "decode_median": statistics.median(dec) if dec else None, "decode_n": len(dec),
                             "decode_p90": float(np.percentile(dec, 90)) if dec else None,
                             "shapes": collections.Counter(str(s) for s in sizes).most_common(12)}
    log("engine", rep["engine_step_ms"], rep["second_run_s"])
    r.execute = orig_exec

    keys = sorted(seen, key=lambda k: -k[0])
    picks = {"prefill": keys[0]}
    dec_keys = [k for k in keys if seen[k].num_seqs == int((seen[k].inputs["slot_mapping"] >= 0).sum())]
    if dec_keys:
        picks["decode"] = dec_keys[0]
    rep["steps"] = {}
    for label, key in picks.items():
        b = seen[key]
        fn = r._executables[key]
        call = step_call(r, b)
        for _ in range(2):
            call()["tokens"].block_until_ready()
        t = time.perf_counter()
        for _ in range(10):
            out = call()
        out["tokens"].block_until_ready()
        dt = (time.perf_counter() - t) / 10
        text = fn.as_text()
        with gzip.open(os.path.join(OUT, f"hlo_{rep['quant']}_{label}.txt.gz"), "wt") as f:
            f.write(text)
        info = {"key": str(key), "tokens": key[0], "real_tokens": int((b.inputs["slot_mapping"] >= 0).sum()),
                "seqs": b.num_seqs, "device_ms": dt * 1e3, "hlo": hlo_report(text, tuple(pool.shape))}
        try:
            ma = fn.memory_analysis()
            info["memory"] = {k: getattr(ma, k) for k in ("temp_size_in_bytes", "alias_size_in_bytes",
                                                          "argument_size_in_bytes", "output_size_in_bytes")}
        except Exception as e:  # noqa: BLE001
            info["memory"] = str(e)[:200]
        info["pool_bytes_all"] = 2 * len(r.kv) * pool.size * pool.dtype.itemsize
        d = tempfile.mkdtemp()
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(3):
            out = call()
        out["tokens"].block_until_ready()
        jax.profiler.stop_trace()
        info["trace"] = trace_summary(d, hlo_sources(text), 3, cats=hlo_categories(text))
        rep["steps"][label] = info
        log(label, json.dumps({k: v for k, v in info.items() if k != "trace"})[:1500])
        tr_ = info["trace"]
        log(f"  kernels {tr_.get('kernel_us_per_step', 0):.0f} us/step, span {tr_.get('span_us_per_step', 0):.0f}")
        for k, v in tr_.get("by_kind_us_per_step", [])[:25]:
            log(f"    {v:9.1f} us  {k}")
        for k, v in tr_.get("by_source_us_per_step", [])[:6]:
            log(f"    {v:9.1f} us  {k}")
        for k in tr_.get("top_kernels", [])[:12]:
            log("    ", k)
    rep["mem_end"] = jax.devices()[0].memory_stats()
    return rep


# --------------------------------------------------------------------------- MLP stack part


def mlp_part(layers: int = 32, E: int = 4096, F: int = 14336, which: str = "default") -> dict:
    """The MLP stack per spelling, M and XLA option: run time, TFLOP/s, compile time, GEMM calls."""
    import jax
    import jax.numpy as jnp

    from kiln.passes.fp8_act import QAct, fp8_linear, quantize_rows

    key = jax.random.PRNGKey(0)

    def weight(i, j, shape):
        return jax.random.normal(jax.random.fold_in(key, 2 * i + j), shape, jnp.float32) * 0.02

    def q_nk(w):  # [N, K] fp32 -> (f8 [N, K], f32 [N])
        s = jnp.max(jnp.abs(w), axis=1) / 448.0
        return (w / s[:, None]).astype(jnp.float8_e4m3fn), s

    bf16 = [(weight(i, 0, (E, 2 * F)).astype(jnp.bfloat16), weight(i, 1, (F, E)).astype(jnp.bfloat16))
            for i in range(layers)]
    nk = jax.block_until_ready([(q_nk(weight(i, 0, (2 * F, E))), q_nk(weight(i, 1, (E, F)))) for i in range(layers)])

    def swiglu32(y):
        y = y.astype(jnp.float32)
        return jax.nn.silu(y[:, :F]) * y[:, F:]

    def stack_bf16(x, ws):
        for gu, dn in ws:
            x = x + jnp.dot(swiglu32(jnp.dot(x, gu)).astype(x.dtype), dn)
        return x

    def lin(a, wq, ws, n_in):
        return fp8_linear(a, wq, ws, in_features=n_in, bias=False, w_layout="nk", out_dtype="bfloat16",
                          w8a8_min_tokens=256)

    def stack_w8a8(x, qs):  # activations quantized by their producers (as fuse_fp8_act lowers them)
        for (gq, gs), (dq, ds) in qs:
            a = quantize_rows(x.astype(jnp.float32))
            x = x + lin(quantize_rows(swiglu32(lin(a, gq, gs, E))), dq, ds, F)
        return x

    def stack_w8a8_kernel(x, qs):  # as the fp8 pipeline lowers it now: SwiGLU from the raw GEMM output
        from kiln.runtime.kernels import act_quant

        for (gq, gs), (dq, ds) in qs:
            raw = {}
            fp8_linear(quantize_rows(x.astype(jnp.float32)), gq, gs, in_features=E, bias=False, w_layout="nk",
                       out_dtype="bfloat16", w8a8_min_tokens=256, raw_out=raw)
            g, sa, ws = raw["raw"]
            a = QAct(*act_quant.act_quant("swiglu_scaled", g.reshape(-1, 2, F), sa, ws.reshape(2, F)))
            x = x + lin(a, dq, ds, F)
        return x

    def stack_w8a16(x, qs):
        for (gq, gs), (dq, ds) in qs:
            x = x + lin(swiglu32(lin(x, gq, gs, E)).astype(x.dtype), dq, ds, F)
        return x

    runs = [("bf16", 2048, stack_bf16, bf16, None), ("w8a8_nk", 2048, stack_w8a8, nk, None),
            ("w8a8_nk_autotune0", 2048, stack_w8a8, nk, {"xla_gpu_autotune_level": 0}),
            ("w8a8_nk_no_triton_gemm", 2048, stack_w8a8, nk, {"xla_gpu_enable_triton_gemm": False}),
            ("bf16", 256, stack_bf16, bf16, None), ("w8a8_nk", 256, stack_w8a8, nk, None),
            ("w8a16_nk", 256, stack_w8a16, nk, None),
            ("bf16", 16, stack_bf16, bf16, None), ("w8a16_nk", 16, stack_w8a16, nk, None),
            ("w8a16_nk_autotune0", 16, stack_w8a16, nk, {"xla_gpu_autotune_level": 0})]
    if which == "w8a8":  # W8A8 against bf16 at M >= 1024 (issue #14), cuBLAS GEMMs for both
        cub = {"xla_gpu_enable_triton_gemm": False}
        runs = [(n, M, f, w, cub) for M in (1024, 2048, 4096)
                for n, f, w in (("bf16", stack_bf16, bf16), ("w8a8_nk", stack_w8a8, nk),
                                ("w8a8_nk_swiglu_kernel", stack_w8a8_kernel, nk))]
    res = {}
    flops_per_row = 2 * layers * (E * 2 * F + F * E)
    for name, M, f, w, opts in runs:
        x = jax.random.normal(key, (M, E), jnp.float32).astype(jnp.bfloat16)
        t = time.perf_counter()
        try:
            c = jax.jit(f, **({"compiler_options": opts} if opts else {})).lower(x, w).compile()
        except Exception as e:  # noqa: BLE001
            log(f"mlp {name} M={M}: {type(e).__name__}: {str(e)[:200]}")
            continue
        ct = time.perf_counter() - t
        text = c.as_text()
        c(x, w).block_until_ready()
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            c(x, w).block_until_ready()
            ts.append(time.perf_counter() - t)
        dt = statistics.median(ts)
        wbytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(w))
        r = {"ms": dt * 1e3, "tflops": flops_per_row * M / dt / 1e12, "weight_TBps": wbytes / dt / 1e12,
             "compile_s": ct, "custom_calls": dict(collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))),
             "triton_gemm_fusions": text.count('"kind":"__triton_gemm"'),
             "f8_transposes": sum(1 for ln in text.splitlines() if "f8e4m3" in ln and re.search(r"\btranspose\(", ln))}
        res[f"{name}_M{M}"] = r
        log(f"mlp {name:24s} M={M:5d}: {r['ms']:7.2f} ms {r['tflops']:6.0f} TF/s {r['weight_TBps']:5.2f} TB/s "
            f"compile {ct:5.1f} s {r['custom_calls']} triton_gemm={r['triton_gemm_fusions']} f8T={r['f8_transposes']}")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="none")
    ap.add_argument("--mlp", action="store_true")
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--mlp-dims", default="32,4096,14336", help="layers,embed,mlp")
    ap.add_argument("--mlp-set", default="default", choices=["default", "w8a8"],
                    help="w8a8: bf16 vs W8A8 (XLA's SwiGLU quantization, the kernel's) at M = 1024, 2048, 4096")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.55)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-tokens", type=int, default=2048)
    ap.add_argument("--kv-cache-dtype", default=None, help="fp8: e4m3 KV cache")
    a = ap.parse_args()
    if a.mlp:
        rep, name = mlp_part(*[int(v) for v in a.mlp_dims.split(",")], which=a.mlp_set), f"mlp_{a.mlp_set}"
    else:
        q = None if a.quant == "none" else a.quant
        rep, name = engine_part(q, a.isl, a.osl, a.num_requests, a.gpu_memory_utilization, a.preset,
                                  a.max_num_seqs, a.kv_cache_dtype, a.max_num_tokens), a.quant + (f"_kv{a.kv_cache_dtype}" if a.kv_cache_dtype else "")
    with open(os.path.join(OUT, f"profile_{name}.json"), "w") as f:
        json.dump(rep, f, indent=1, default=str)


if __name__ == "__main__":
    main()
