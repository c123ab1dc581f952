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
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    res = {"device": str(jax.devices()[0]), "rows": [], "check": []}
    path = os.path.join(a.out, "probe_fp8_skinny.json")
    bw = copy_bandwidth()
    res["copy_TBps"] = bw / 1e12
    print("copy bandwidth", bw / 1e12, flush=True)
    configs = parse_configs(a.configs)

    # correctness on the GPU against the fp32 reference, every shape, M = 1, 5, 16, 64
    for name, (k, n) in SHAPES.items():
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

    for kind in ("bf16", "fp8"):
        key = jax.random.PRNGKey(0)
        mode = "bf16" if kind == "bf16" else "fp8_w8a8"
        layers = [{nm: make_w(jax.random.fold_in(key, 4 * l + i), s, mode) for i, (nm, s) in enumerate(SHAPES.items())}
                  for l in range(a.layers)]
        wbytes = sum(nbytes(w) for lw in layers for w in lw.values())
        runs = [("bf16", None)] if kind == "bf16" else (
            [("w8a16_xla", None), ("w8a16_kernel", None), ("w8a8_cublas", None)] + [("mgpu", c) for c in configs])
        for m in [int(v) for v in a.ms.split(",")]:
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
