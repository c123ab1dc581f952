"""The MoE layer on the GPU: grouped (sorted + grouped matmuls) against dense all-experts.

Times Kiln's `moe` op lowering (graph/ops_extra.py: routing, sort by expert, three grouped
matmuls, unsort, weighted sum) for the Mixtral-8x7B layer shape (hidden 4096, ffn 14336,
8 experts, top-2, bf16) at several token counts, with each grouped-matmul implementation
(runtime/kernels/grouped_matmul.py) and the dense baseline that runs every expert on every
token. References measured in the same run: a bf16 8192^3 matmul (TFLOP/s ceiling) and a
device-to-device copy (HBM bandwidth); the floor of each row is
max(useful FLOPs / ceiling, expert bytes read / bandwidth).

    python benchmarks/bench_moe.py [--tokens 16,256,2048,8192] [--out DIR] [--small]

`ragged_dot_cudnn` runs in a child process with XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=true
(XLA reads its flags once per process). Results: a table on stdout, JSON in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from kiln.graph.ops_extra import moe_dense, moe_grouped, route
from kiln.runtime.kernels import grouped_matmul as gm

MIXTRAL = dict(hidden=4096, ffn=14336, experts=8, top_k=2)
SMALL = dict(hidden=256, ffn=512, experts=8, top_k=2)
CUDNN_FLAG = "--xla_gpu_experimental_use_ragged_dot_fusion=true"


def timed(fn, *args, iters=10):
    """Median wall time (ms) of `iters` calls after two warm-up calls (the first compiles)."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def ceilings(small: bool) -> dict:
    n = 1024 if small else 8192
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
    mm = timed(jax.jit(lambda a, b: a @ b), a, b)
    buf = jax.random.normal(jax.random.PRNGKey(3), ((64 if small else 1024) * 2 ** 20,), jnp.float32)
    cp = timed(jax.jit(lambda x: x * 1.0001), buf)
    return {"matmul_tflops": 2 * n ** 3 / mm / 1e9, "hbm_tbps": 2 * buf.nbytes / cp / 1e9}


def layer(shape: dict, tokens: int, seed: int = 0):
    e, f, n = shape["hidden"], shape["ffn"], shape["experts"]
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(ks[0], (tokens, e), jnp.bfloat16)
    logits = jax.random.normal(ks[1], (tokens, n), jnp.float32)
    wg, wu = (jax.random.normal(k, (n, e, f), jnp.bfloat16) * 0.02 for k in ks[2:4])
    wd = jax.random.normal(ks[4], (n, f, e), jnp.bfloat16) * 0.02
    return x, logits, wg, wu, wd


def moe_fn(variant: str, top_k: int):
    """The op's lowering with one implementation: routing + experts + combine, jitted."""
    if variant == "dense":
        body = moe_dense
    else:
        body = partial(moe_grouped, gemm={"ragged_dot_cudnn": "ragged_dot", "ragged_dot_triton": "ragged_dot",
                                          "mgpu_bm64": "mgpu", "mgpu_bm128": "mgpu"}.get(variant, variant))

    def f(x, logits, wg, wu, wd):
        w, idx = route(logits, top_k, True)
        return body(x, w, idx, wg, wu, wd)
    return jax.jit(f)


def run_variant(variant: str, shape: dict, tokens: list[int], ref_cache: dict) -> list[dict]:
    rows = []
    saved_tiles = dict(gm.MGPU_TILES)
    if variant.startswith("mgpu_bm"):  # a fixed row block instead of mgpu_block_m's rule
        gm.MGPU_TILES["block_m"] = int(variant[len("mgpu_bm"):])
    triton_flag = "jax_ragged_dot_use_gpu_pallas_triton_lowering"
    if variant == "ragged_dot_triton":
        jax.config.update(triton_flag, True)
    try:
        for t in tokens:
            args = layer(shape, t)
            row = {"variant": variant, "tokens": t}
            try:
                fn = moe_fn(variant, shape["top_k"])
                out = np.asarray(fn(*args).astype(jnp.float32))
                if t in ref_cache:
                    ref = ref_cache[t]
                    row["rel_err_vs_dense"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                elif variant == "dense":
                    ref_cache[t] = out
                row["ms"] = timed(fn, *args)
            except Exception as e:  # a variant this jax / GPU cannot run: say so, go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            del args
    finally:
        gm.MGPU_TILES.clear()
        gm.MGPU_TILES.update(saved_tiles)
        if variant == "ragged_dot_triton":
            jax.config.update(triton_flag, False)
    return rows


def floor_ms(shape: dict, tokens: int, ceil: dict) -> tuple[float, float]:
    """(useful GFLOP, floor ms): top-k experts' FLOPs at the matmul ceiling vs the bytes of the
    experts a uniform routing touches at the HBM bandwidth."""
    e, f, n, k = shape["hidden"], shape["ffn"], shape["experts"], shape["top_k"]
    flops = 2 * tokens * k * 3 * e * f
    touched = n * (1 - (1 - 1 / n) ** (tokens * k))          # expected experts hit
    bytes_ = touched * 3 * e * f * 2
    return flops / 1e9, max(flops / (ceil["matmul_tflops"] * 1e12), bytes_ / (ceil["hbm_tbps"] * 1e12)) * 1e3


def child_rows(variant: str, args) -> list[dict]:
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + CUDNN_FLAG).strip()}
    cmd = [sys.executable, __file__, "--child", variant, "--tokens", ",".join(map(str, args.tokens))]
    cmd += ["--small"] if args.small else []
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    rows = [r for r in rows if r["variant"] == variant]  # the child's own dense rows only fed its error column
    if p.returncode and not rows:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1][:200]
        rows = [{"variant": variant, "tokens": t, "error": f"child exited {p.returncode}: {tail}"} for t in args.tokens]
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=[16, 256, 2048, 8192])
    ap.add_argument("--variants", default="dense,ragged_dot,mgpu_bm64,mgpu_bm128,mgpu,ragged_dot_triton,ragged_dot_cudnn")
    ap.add_argument("--small", action="store_true", help="a small layer (for a CPU smoke run)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = SMALL if args.small else MIXTRAL
    if args.child:  # dense first, for the error column, then the variant
        cache = {}
        run_variant("dense", shape, args.tokens, cache)
        run_variant(args.child, shape, args.tokens, cache)
        return

    dev = jax.devices()[0]
    print(f"# {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, shape {shape}", flush=True)
    ceil = ceilings(args.small)
    print(f"# ceilings: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, copy {ceil['hbm_tbps']:.2f} TB/s", flush=True)
    rows, cache = [], {}
    for v in args.variants.split(","):
        if v == "ragged_dot_cudnn":
            rows += child_rows(v, args)
        else:
            rows += run_variant(v, shape, args.tokens, cache)
    dense = {r["tokens"]: r.get("ms") for r in rows if r["variant"] == "dense"}
    print(f"\n{'variant':18s} {'tokens':>6s} {'ms':>9s} {'useful TF/s':>11s} {'floor ms':>9s} {'x floor':>8s} "
          f"{'vs dense':>9s} {'err':>8s}")
    for r in rows:
        gflop, fl = floor_ms(shape, r["tokens"], ceil)
        r["floor_ms"] = fl
        if "ms" not in r:
            print(f"{r['variant']:18s} {r['tokens']:6d}  {r.get('error', '')}")
            continue
        speed = dense.get(r["tokens"]) / r["ms"] if dense.get(r["tokens"]) else float("nan")
        err = r.get("rel_err_vs_dense", float("nan"))
        print(f"{r['variant']:18s} {r['tokens']:6d} {r['ms']:9.3f} {gflop / r['ms']:11.1f} {fl:9.3f} "
              f"{r['ms'] / fl:8.2f} {speed:8.2f}x {err:8.1e}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_moe.json"), "w") as fh:
        json.dump({"device": dev.device_kind, "jax": jax.__version__, "shape": shape, "ceilings": ceil,
                   "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
