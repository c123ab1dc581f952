"""The Mosaic GPU FP8 W8A8 skinny kernel (runtime/kernels/fp8_skinny_mgpu.py) on the 32-layer
Llama-3-8B projection stack, beside the paths it would replace, in one process:

    bf16 (XLA, cuBLAS)  |  fp8 W8A16 XLA  |  fp8 W8A16 Triton kernel (Kiln's default)  |
    fp8 W8A8 cuBLASLt   |  fp8 W8A8 Mosaic GPU kernel (a few tile configs)

at M = 1, 16, 64 tokens; every W8A8 path quantizes its activation per token inside the stack.
Also each kernel's error against the fp32 reference on the GPU. TB/s of weight bytes beside the
measured copy bandwidth.

    python3 benchmarks/probe_fp8_skinny.py [--layers 32] [--ms 1,16,64] [--configs '128/128/6,64/128/8']
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from kiln.runtime.kernels import act_quant
from kiln.runtime.kernels import fp8_skinny_mgpu as fs
from bench_fp8 import bench
from bench_quant_matmul import E, MLP, SHAPES, copy_bandwidth, make_w, matmul, nbytes


def skinny(x, w, cfg):
    xq, sa = act_quant.act_quant("rows", x)
    return fs.fp8_skinny_matmul(xq, sa, w[0], w[1], out_dtype=x.dtype, config=cfg)


def stack(kind, layers, x, cfg):
    def mm(x, w):
        if kind == "mgpu":
            return skinny(x, w, cfg)
        mode, impl = {"bf16": ("bf16", "xla"), "w8a16_xla": ("fp8", "xla"), "w8a16_kernel": ("fp8", "pallas"),
                      "w8a8_cublas": ("fp8_w8a8", "xla")}[kind]
        return matmul(mode, x, w, impl)

    for lw in layers:
        qkv = mm(x, lw["qkv"])
        x = x + mm(qkv[:, :E], lw["o"])
        gu = mm(x, lw["gate_up"])
        x = x + mm(jax.nn.silu(gu[:, :MLP]) * gu[:, MLP:], lw["down"])
    return x


def profile(res, configs, ms, copies=8):
    """Per-kernel device times (jax.profiler trace; run with XLA's command buffers off): each
    projection alone, `copies` independent matmuls on their own weights per jit, per path and M.
    Kernel events are grouped by name with trailing numbers removed; median microseconds each."""
    import collections
    import gzip
    import glob
    import re
    import statistics
    import tempfile

    out = res.setdefault("profile", [])
    runs = [("w8a16_kernel", None), ("w8a16_xla", None), ("w8a8_cublas", None)] + [("mgpu", c) for c in configs]
    for name, (k, n) in SHAPES.items():
        ws = [make_w(jax.random.PRNGKey(10 + i), (k, n), "fp8_w8a8") for i in range(copies)]
        for m in ms:
            x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.float32).astype(jnp.bfloat16)
            for path, cfg in runs:
                def many(ws, x, path=path, cfg=cfg):
                    if path == "mgpu":
                        return [skinny(x, w, cfg) for w in ws]
                    mode, impl = {"w8a16_kernel": ("fp8", "pallas"), "w8a16_xla": ("fp8", "xla"),
                                  "w8a8_cublas": ("fp8_w8a8", "xla")}[path]
                    return [matmul(mode, x, w, impl) for w in ws]
                fn = jax.jit(many)
                try:
                    jax.block_until_ready(fn(ws, x))
                except Exception as e:  # noqa: BLE001
                    print("profile fail", name, m, path, cfg, repr(e)[:300], flush=True)
                    continue
                d = tempfile.mkdtemp()
                jax.profiler.start_trace(d)
                for _ in range(3):
                    y = fn(ws, x)
                jax.block_until_ready(y)
                jax.profiler.stop_trace()
                paths = glob.glob(os.path.join(d, "plugins/profile/*/*.trace.json.gz"))
                ev = json.load(gzip.open(paths[0]))["traceEvents"]
                pname = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
                tname = {(e["pid"], e.get("tid")): e["args"]["name"] for e in ev
                         if e.get("ph") == "M" and e.get("name") == "thread_name"}
                groups = collections.defaultdict(list)
                for e in ev:
                    if e.get("ph") != "X" or "GPU" not in pname.get(e.get("pid"), ""):
                        continue
                    if "tream" not in tname.get((e["pid"], e.get("tid")), ""):
                        continue
                    groups[re.sub(r"[._]?\d+$", "", e.get("name", "?"))[:60]].append(e["dur"])
                kern = {g: (round(statistics.median(v), 2), len(v) // 3) for g, v in groups.items()}
                total = max(sum(sum(v) for v in groups.values()) / 3 / copies, 1e-3)
                row = {"shape": name, "M": m, "path": path, "config": str(cfg), "us_per_matmul": round(total, 2),
                       "TBps": round(nbytes(ws[0]) / total / 1e6, 3), "kernels": kern}
                out.append(row)
                print("profile", json.dumps(row), flush=True)
        del ws


def parse_configs(s):
    out = []
    for c in s.split(","):
        bn, bk, st, *sp = c.split("/")
        out.append(fs.SkinnyConfig(int(bn), int(bk), int(st), int(sp[0]) if sp else None))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ms", default="1,16,64")
    ap.add_argument("--configs", default="128/128/6,64/128/8,128/256/4,128/128/8")
    ap.add_argument("--parts", default="check,stack", help="check, stack, profile")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    res = {"device": str(jax.devices()[0]), "rows": [], "check": []}
    path = os.path.join(a.out, "probe_fp8_skinny.json")
    bw = copy_bandwidth()
    res["copy_TBps"] = bw / 1e12
    print("copy bandwidth", bw / 1e12, flush=True)
    configs = parse_configs(a.configs)

    ms = [int(v) for v in a.ms.split(",")]
    if "profile" in a.parts:
        profile(res, configs, ms)
        json.dump(res, open(path, "w"), indent=1)
    # correctness on the GPU against the fp32 reference, every shape, M = 1, 5, 16, 64
    for name, (k, n) in ({} if "check" not in a.parts else SHAPES).items():
        w = make_w(jax.random.PRNGKey(3), (k, n), "fp8_w8a8")
        for m in (1, 5, 16, 64):
            x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.float32).astype(jnp.bfloat16)
            xq, sa = act_quant.act_quant("rows", x)
            ref = fs.reference(xq, sa, w[0], w[1], out_dtype=jnp.float32)
            for cfg in configs[:2]:
                try:
                    y = jax.jit(lambda *v, cfg=cfg: fs.fp8_skinny_matmul(*v, out_dtype=jnp.float32, config=cfg))(
                        xq, sa, w[0], w[1])
                    err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
                except Exception as e:  # noqa: BLE001 - reported, the run goes on
                    err = repr(e)[:400]
                row = {"shape": name, "M": m, "config": str(cfg), "rel_err": err}
                res["check"].append(row)
                print("check", json.dumps(row), flush=True)
    json.dump(res, open(path, "w"), indent=1)

    for kind in ("bf16", "fp8") if "stack" in a.parts else ():
        key = jax.random.PRNGKey(0)
        mode = "bf16" if kind == "bf16" else "fp8_w8a8"
        layers = [{nm: make_w(jax.random.fold_in(key, 4 * l + i), s, mode) for i, (nm, s) in enumerate(SHAPES.items())}
                  for l in range(a.layers)]
        wbytes = sum(nbytes(w) for lw in layers for w in lw.values())
        runs = [("bf16", None)] if kind == "bf16" else (
            [("w8a16_xla", None), ("w8a16_kernel", None), ("w8a8_cublas", None)] + [("mgpu", c) for c in configs])
        for m in ms:
            x = jax.random.normal(jax.random.PRNGKey(m), (m, E), jnp.float32).astype(jnp.bfloat16)
            for name, cfg in runs:
                fn = jax.jit(lambda ls, x, name=name, cfg=cfg: stack(name, ls, x, cfg))
                try:
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(layers, x))
                    first = time.perf_counter() - t0
                    t = bench(fn, layers, x, iters=10)
                except Exception as e:  # noqa: BLE001
                    print("fail", name, m, cfg, repr(e)[:600], flush=True)
                    continue
                row = {"path": name, "M": m, "config": str(cfg), "ms": t * 1e3, "TBps": wbytes / t / 1e12,
                       "roofline_ms": wbytes / bw * 1e3, "first_call_s": first}
                res["rows"].append(row)
                print("stack", json.dumps(row), flush=True)
                json.dump(res, open(path, "w"), indent=1)
        del layers


if __name__ == "__main__":
    main()
