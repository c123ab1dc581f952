"""Quantized matmuls in the Llama-3-8B layer stack: bf16 vs fp8 W8A8 vs int8 weight-only.

The 32-layer stack of the 8B's projections in their fused layouts (qkv [4096, 8, 6, 128],
o [4096, 4096], gate_up [4096, 2, 14336], down [14336, 4096]), each matmul through Kiln's
own `linear` / `qlinear` lowerings, unrolled in one jit, at M = 1, 64, 2048 tokens. Weights
are random (never zeros) and quantized on the device with passes/quantize.py's codecs.
Each figure sits beside the card's roofline: weight bytes over the measured copy bandwidth
(small M) and FLOPs over the measured bf16 GEMM rate (large M). The compiled HLO is checked
for the FP8 cuBLASLt call.

    python benchmarks/bench_fp8.py [--layers 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import kiln  # noqa: F401  (registers the ops)
from kiln.graph.ops import REGISTRY
from kiln.passes import quantize as qz

E, KVH, G, D, MLP = 4096, 8, 4, 128, 14336
SHAPES = {"qkv": (E, KVH, G + 2, D), "o": (E, E), "gate_up": (E, 2, MLP), "down": (MLP, E)}


_quantize = jax.jit(qz.quantize_weight, static_argnums=0)


def make_layer(key, mode):
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        w = (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * 0.02).astype(jnp.bfloat16)
        if mode == "bf16":
            out[name] = (w,)
        else:
            q, s = _quantize(mode, w)
            out[name] = (q, s)
        del w
    return out


def matmul(mode, x, w):
    if mode == "bf16":
        return REGISTRY["linear"].lower(None, x, w[0])
    return REGISTRY["qlinear"].lower(None, x, w[0], w[1], mode=mode, in_features=x.shape[-1])


def stack(mode, layers, x):
    for lw in layers:  # unrolled: each layer's weights are their own arrays
        qkv = matmul(mode, x, lw["qkv"])                          # [M, 8, 6, 128]
        attn = qkv[:, :, :G, :].reshape(x.shape[0], E)            # stand-in for attention
        x = x + matmul(mode, attn, lw["o"])
        gu = matmul(mode, x, lw["gate_up"])                       # [M, 2, 14336]
        x = x + matmul(mode, jax.nn.silu(gu[:, 0]) * gu[:, 1], lw["down"])
    return x


def bench(fn, *args, iters=20):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def ceilings():
    a = jax.random.normal(jax.random.PRNGKey(1), (E * 64 * 1024,), jnp.float32)  # 1 GiB at full size
    copy = jax.jit(lambda v: v * 1.0001)
    bw = 2 * a.nbytes / bench(copy, a)
    n = 2 * E
    m = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
    gemm = jax.jit(lambda p, q: p @ q)
    tf = 2 * n ** 3 / bench(gemm, m, m)
    del a, m
    return bw, tf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--modes", default="bf16,fp8,int8_wo")
    ap.add_argument("--shrink", type=int, default=1, help="divide the model dims (CPU smoke test)")
    args = ap.parse_args()
    global E, MLP
    E, MLP = E // args.shrink, MLP // args.shrink
    SHAPES.update(qkv=(E, KVH, G + 2, E // (KVH * G)), o=(E, E), gate_up=(E, 2, MLP), down=(MLP, E))
    dev = jax.devices()[0]
    bw, tf = ceilings()
    print(f"device {dev.device_kind}, jax {jax.__version__}: copy {bw / 1e12:.2f} TB/s, bf16 GEMM {tf / 1e12:.0f} TFLOP/s")
    n_params = sum(int(np.prod(s)) for s in SHAPES.values()) * args.layers
    results = {"device": dev.device_kind, "jax": jax.__version__, "copy_TBps": bw / 1e12, "gemm_bf16_TFLOPs": tf / 1e12,
               "layers": args.layers, "runs": []}
    key = jax.random.PRNGKey(0)
    for mode in args.modes.split(","):
        layers = [make_layer(jax.random.fold_in(key, l), mode) for l in range(args.layers)]
        wbytes = sum(a.nbytes for lw in layers for t in lw.values() for a in t)
        fn = jax.jit(lambda ls, x, mode=mode: stack(mode, ls, x))
        for m in (1, 64, 2048):
            x = jax.random.normal(jax.random.PRNGKey(m), (m, E), jnp.float32).astype(jnp.bfloat16)
            hlo = fn.lower(layers, x).compile().as_text() if m in (64, 2048) else ""
            t = bench(fn, layers, x)
            floor = max(wbytes / bw, 2 * m * n_params / tf)
            row = {"mode": mode, "M": m, "ms": t * 1e3, "weight_GB": wbytes / 1e9, "roofline_ms": floor * 1e3,
                   "TBps": wbytes / t / 1e12, "TFLOPs": 2 * m * n_params / t / 1e12}
            if hlo:
                row["f8_cublaslt_calls"] = hlo.count("__cublas$lt$matmul$f8")
                row["cublaslt_calls"] = hlo.count("__cublas$lt$matmul")
                row["gemm_calls"] = hlo.count('custom_call_target="__cublas$gemm"')
                with open(os.path.join(args.out, f"hlo_{mode}_M{m}.txt"), "w") as f:
                    f.write(hlo)
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
        del layers
    with open(os.path.join(args.out, "bench_fp8.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
