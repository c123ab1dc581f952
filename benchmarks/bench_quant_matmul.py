"""Fused dequantizing matmuls (runtime/kernels/quant_matmul.py) against XLA's path and bf16.

One run does two things, all on random (never zero) weights quantized on the device with
passes/quantize.py's codecs:

1. checks the kernel against the fp32 dequantized-weights reference on the GPU;
2. times the 32-layer Llama-3-8B projection stack (qkv [4096, 6144], o [4096, 4096], gate_up
   [4096, 28672], down [14336, 4096]), unrolled in one jit, at M = 1, 16, 64, 256, in bf16,
   through XLA (int8_wo, fp8 W8A16 with [N, K] weights as the fp8 pipeline stores them,
   int4_wo) and through the kernels in a few tile variants
   per (weight kind, M) (`VARIANTS`); TB/s of weight bytes and TFLOP/s beside the measured
   copy bandwidth, and the best variant of each.

    python benchmarks/bench_quant_matmul.py [--layers 32] [--parts check,stack] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from kiln.passes import quantize as qz
from kiln.runtime.kernels import quant_matmul as qm
from bench_fp8 import bench  # the same median-of-20 timer (benchmarks/ is on sys.path when run as a script)

E, MLP = 4096, 14336
SHAPES = {"qkv": (E, 6144), "o": (E, E), "gate_up": (E, 2 * MLP), "down": (MLP, E)}
MODES = {"int8_wo": ("int8_wo", None), "fp8": ("fp8", None), "int4_wo": ("int4_wo", 128),
         "int8_nk": ("int8_wo", None), "fp8_w8a8": ("fp8", None)}
# fp8 weights as the fp8 pipeline stores them (passes/fp8_act.py): out-major [N, K]; int8_nk
# the same layout for int8; fp8_w8a8 the FP8 GEMM (cuBLASLt) with a per-token activation scale
NK = {"fp8", "int8_nk", "fp8_w8a8"}
# Tile variants timed on the whole stack, per (weight kind, M); {} = choose_config's default
# (run 3: the defaults are run 2's best). A per-shape microbenchmark in the first run was
# dominated by launch gaps (BENCHMARKS.md).
MAGIC = dict(magic=True)
VARIANTS = {
    ("8bit", 1): [{}, MAGIC], ("8bit", 16): [{}, MAGIC], ("8bit", 64): [{}], ("8bit", 256): [],
    ("int4", 1): [{}, MAGIC, dict(MAGIC, block_n=256, num_warps=8), dict(MAGIC, gemv=False)],
    ("int4", 16): [{}, MAGIC, dict(MAGIC, post_scale=True)],
    ("int4", 64): [{}, MAGIC], ("int4", 256): [{}],
}


_quantize = jax.jit(qz.quantize_weight, static_argnums=(0, 2))


def rand_w(key, shape):
    return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)


def make_w(key, shape, mode):
    w = rand_w(key, shape)
    if mode == "bf16":
        return (w,)
    m, g = MODES[mode]
    q = _quantize(m, w, g)
    return (q[0].T, *q[1:]) if mode in NK else tuple(q)


def nbytes(ws):
    return sum(a.nbytes for a in ws)


def matmul(mode, x, w, impl="xla", config=None):
    if mode == "bf16":
        return x @ w[0]
    m, g = MODES[mode]
    if mode == "fp8_w8a8":
        from kiln.passes.fp8_act import fp8_linear

        return fp8_linear(x, *w, in_features=x.shape[-1], bias=False, w_layout="nk", out_dtype=None,
                          w8a8_min_tokens=1)
    if impl == "pallas" and jax.default_backend() != "gpu":
        impl = "interpret"  # CPU smoke test
    return qm.quant_matmul(x, *w, mode=m, group_size=g, impl=impl, config=config,
                           w_layout="nk" if mode in NK else "kn")


def copy_bandwidth():
    a = jax.random.normal(jax.random.PRNGKey(1), (E * 64 * 1024,), jnp.float32)
    bw = 2 * a.nbytes / bench(jax.jit(lambda v: v * 1.0001), a)
    del a
    return bw


def check(out):
    """Relative error of kernel and XLA path against x @ dequant(w) in fp32 (HIGHEST)."""
    rows = []
    k, n = SHAPES["qkv"]
    for mode, (m_, g) in MODES.items():
        w = make_w(jax.random.PRNGKey(7), (k, n), mode)
        wk = (w[0].T, *w[1:]) if mode in NK else w
        wf = jnp.asarray(qz.dequantize(m_, *[np.asarray(a) for a in wk], group=g))
        for m in (1, 17, 130):
            x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.float32).astype(jnp.bfloat16)
            ref = jnp.matmul(x.astype(jnp.float32), wf, precision=jax.lax.Precision.HIGHEST)
            row = {"mode": mode, "M": m}
            for impl in ("xla", "pallas"):
                y = jax.jit(lambda x, w, impl=impl: matmul(mode, x, w, impl))(x, w).astype(jnp.float32)
                row[impl] = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
            rows.append(row)
            print("check", json.dumps(row), flush=True)
    out["check"] = rows


def stack(mode, layers, x, impl, configs):
    for lw in layers:  # unrolled: each layer's weights are their own arrays
        cfg = lambda name: configs.get(name) if configs else None  # noqa: E731
        qkv = matmul(mode, x, lw["qkv"], impl, cfg("qkv"))
        x = x + matmul(mode, qkv[:, :E], lw["o"], impl, cfg("o"))
        gu = matmul(mode, x, lw["gate_up"], impl, cfg("gate_up"))
        x = x + matmul(mode, jax.nn.silu(gu[:, :MLP]) * gu[:, MLP:], lw["down"], impl, cfg("down"))
    return x


def run_stack(out, n_layers, bw, deadline, path, modes=("bf16", "int8_wo", "fp8", "int4_wo"), ms=(1, 16, 64, 256)):
    """Every (mode, M): XLA's path, then each kernel variant; the best variant per (mode, M)."""
    n_params = sum(k * n for k, n in SHAPES.values()) * n_layers
    rows, best = [], {}
    for mode in modes:
        key = jax.random.PRNGKey(0)
        layers = [{name: make_w(jax.random.fold_in(key, 4 * l + i), s, mode)
                   for i, (name, s) in enumerate(SHAPES.items())}
                  for l in range(n_layers)]
        wbytes = sum(nbytes(w) for lw in layers for w in lw.values())
        kind = "int4" if mode == "int4_wo" else "8bit"
        for m in ms:
            x = jax.random.normal(jax.random.PRNGKey(m), (m, E), jnp.float32).astype(jnp.bfloat16)
            runs = [("xla", None)] + ([] if mode == "bf16" else [("pallas", v) for v in VARIANTS[(kind, m)]])
            for impl, over in runs:
                if time.time() > deadline:
                    print("stack skipped (deadline)", mode, m, impl, over, flush=True)
                    continue
                configs = None
                if impl == "pallas":
                    m_, g = MODES[mode]
                    configs = {name: qm.choose_config(m, k, n, m_, g, w_layout="nk" if mode in NK else "kn", **over)
                               for name, (k, n) in SHAPES.items()}
                fn = jax.jit(lambda ls, x, impl=impl, configs=configs: stack(mode, ls, x, impl, configs))
                try:
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(layers, x))
                    first = time.perf_counter() - t0
                    t = bench(fn, layers, x, iters=10)
                except Exception as e:
                    print("stack fail", mode, m, impl, over, repr(e)[:300], flush=True)
                    continue
                row = {"mode": mode, "impl": impl, "M": m, "variant": over, "ms": t * 1e3, "weight_GB": wbytes / 1e9,
                       "roofline_ms": wbytes / bw * 1e3, "TBps": wbytes / t / 1e12,
                       "TFLOPs": 2 * m * n_params / t / 1e12, "first_call_s": first}
                if configs:
                    row["configs"] = {k: dataclasses.asdict(c) for k, c in configs.items()}
                rows.append(row)
                print("stack", json.dumps({k: v for k, v in row.items() if k != "configs"}), flush=True)
                out["stack"] = rows
                json.dump(out, open(path, "w"), indent=1)
                k_ = (mode, impl, m)
                if k_ not in best or row["ms"] < best[k_]["ms"]:
                    best[k_] = row
        del layers
    return best


# The decode sweep (`--parts sweep`), in priority order: fp8 [N, K] at M = 16 (a batch-1 decode
# step pads to 16 tokens), then M = 1, the per-projection split, M = 64, int8 and int4. Each
# entry: (mode, M, [kernel variants]); XLA's path (and bf16's) is timed first for every (mode, M).
G1 = dict(gemv=True, defer_sum=True, splits=1)
TC1 = dict(gemv=False, splits=1, num_warps=4)
SWEEP = [
    ("fp8", 16, [{}, dict(TC1, block_n=16, block_k=256, num_stages=4), dict(TC1, block_n=32, block_k=256, num_stages=4),
                 dict(TC1, block_n=32, block_k=512, num_stages=3), dict(TC1, block_n=64, block_k=256, num_stages=4),
                 dict(TC1, block_n=16, block_k=512, num_stages=3), dict(TC1, block_n=64, block_k=128, num_stages=6),
                 dict(TC1, block_n=32, block_k=256, num_stages=4, splits=None),
                 dict(TC1, block_n=32, block_k=256, num_stages=5, num_warps=2),
                 dict(TC1, block_n=16, block_k=256, num_stages=6, num_warps=2)]),
    ("fp8_w8a8", 16, []),
    ("fp8", 1, [{}, dict(G1, block_n=16, block_k=512, num_warps=4, num_stages=3),
                dict(G1, block_n=16, block_k=256, num_warps=4, num_stages=4),
                dict(G1, block_n=8, block_k=512, num_warps=4, num_stages=4),
                dict(G1, block_n=32, block_k=256, num_warps=4, num_stages=4),
                dict(G1, block_n=16, block_k=512, num_warps=8, num_stages=3),
                dict(G1, block_n=16, block_k=512, num_warps=4, num_stages=3, defer_sum=False),
                dict(G1, block_n=32, block_k=512, num_warps=8, num_stages=4),
                dict(G1, block_n=16, block_k=1024, num_warps=4, num_stages=2),
                dict(TC1, block_n=16, block_k=256, num_stages=4)]),
    ("fp8_w8a8", 1, []),
    ("fp8", 64, [{}, dict(TC1, block_n=32, block_k=256, num_stages=4), dict(TC1, block_n=64, block_k=256, num_stages=4),
                 dict(TC1, block_n=64, block_k=128, num_stages=4, splits=None)]),
    ("fp8_w8a8", 64, []),
    ("int8_nk", 1, [dict(G1, block_n=16, block_k=512, num_warps=4, num_stages=3),
                    dict(G1, block_n=32, block_k=256, num_warps=4, num_stages=4)]),
    ("int8_nk", 16, [dict(TC1, block_n=32, block_k=256, num_stages=4), dict(TC1, block_n=16, block_k=256, num_stages=4)]),
    ("int8_wo", 1, [{}]), ("int8_wo", 16, [{}]),
    ("int4_wo", 1, [{}, dict(block_n=256, block_k=256, num_warps=8, num_stages=4, splits=None),
                    dict(block_n=64, block_k=256, num_warps=4, num_stages=4, splits=1),
                    dict(block_n=64, block_k=128, num_warps=4, num_stages=5)]),
    ("int4_wo", 16, [{}, dict(block_n=32, block_k=256, num_warps=4, num_stages=4, splits=1, gemv=False)]),
]

# Run 2 of the sweep (`--sweep 2`): the tensor-core form at M = 16 around run 1's best (block_n 32,
# block_k 256, split-K 4: 4.16 ms against XLA's 3.70), with f16 dots; M = 1 around its best.
TCS = dict(gemv=False, splits=None, num_warps=4)
SWEEP2 = [
    ("fp8", 16, [dict(TCS, block_n=32, block_k=256, num_stages=4), dict(TCS, block_n=32, block_k=256, num_stages=4,
                                                                         f16_dot=True),
                 dict(TCS, block_n=32, block_k=256, num_stages=4, splits=1, f16_dot=True),
                 dict(TCS, block_n=64, block_k=128, num_stages=4, f16_dot=True),
                 dict(TCS, block_n=32, block_k=128, num_stages=6, f16_dot=True),
                 dict(TCS, block_n=32, block_k=256, num_stages=3, splits=2, f16_dot=True),
                 dict(TCS, block_n=32, block_k=512, num_stages=3, f16_dot=True)]),
    ("fp8", 1, [dict(G1, block_n=16, block_k=1024, num_warps=4, num_stages=2),
                dict(G1, block_n=16, block_k=1024, num_warps=4, num_stages=3),
                dict(G1, block_n=8, block_k=1024, num_warps=4, num_stages=3),
                dict(G1, block_n=16, block_k=2048, num_warps=8, num_stages=2),
                dict(G1, block_n=32, block_k=1024, num_warps=8, num_stages=2)]),
]
# Run 3 (`--sweep 3`): the best of runs 1-2 again, also timed with calls queued back to back
SWEEP3 = [
    ("fp8", 16, [dict(TCS, block_n=32, block_k=256, num_stages=4), dict(TCS, block_n=64, block_k=128, num_stages=4)]),
    ("fp8", 1, [dict(G1, block_n=16, block_k=1024, num_warps=4, num_stages=2),
                dict(G1, block_n=8, block_k=1024, num_warps=4, num_stages=3), {}]),
    ("int8_nk", 16, [dict(TC1, block_n=32, block_k=256, num_stages=4), dict(TCS, block_n=32, block_k=256, num_stages=4)]),
    ("int4_wo", 1, [{}]),
]
# Run 4 (`--sweep 4`, session 7): int4 forms without a per-step reduction: multiply-and-sum into a
# tile-shaped partial summed once (`defer_sum`, with the I2F unit or integer ops), and the
# tensor-core form fed the codes as 128 + q built by integer ops (`or_codes`)
I4 = dict(gemv=True, defer_sum=True)
SWEEP4 = [
    ("int4_wo", 1, [{}, I4, dict(I4, magic=True), dict(I4, block_n=64), dict(I4, block_n=256, num_warps=8),
                    dict(I4, magic=True, block_k=256), dict(or_codes=True, gemv=False),
                    dict(or_codes=True, gemv=False, block_n=128, block_k=256)]),
    ("int4_wo", 16, [{}, dict(post_scale=True), dict(or_codes=True), dict(or_codes=True, block_n=128, block_k=256),
                     dict(or_codes=True, block_n=32, block_k=512)]),
]
# Run 5 (`--sweep 5`): the tensor-core form with `or_codes` on the GPU, its nibbles by inline PTX
# (PRMT + LOP3: about one instruction per weight against ~6 for the fp32 conversions)
OR = dict(or_codes=True, gemv=False, num_warps=4, num_stages=4)
SWEEP5 = [
    ("int4_wo", 1, [{}, dict(OR, block_n=64, block_k=128), dict(OR, block_n=64, block_k=256),
                    dict(OR, block_n=128, block_k=128), dict(OR, block_n=128, block_k=256),
                    dict(OR, block_n=32, block_k=256), dict(OR, block_n=64, block_k=256, num_stages=3),
                    dict(OR, block_n=128, block_k=128, num_warps=8), dict(OR, block_n=64, block_k=512, num_stages=3)]),
    ("int4_wo", 16, [{}, dict(OR, block_n=64, block_k=128), dict(OR, block_n=64, block_k=256),
                     dict(OR, block_n=128, block_k=128), dict(OR, block_n=128, block_k=256)]),
    ("int4_wo", 64, [{}, dict(OR, block_n=64, block_k=256), dict(OR, block_n=128, block_k=128),
                     dict(OR, block_n=128, block_k=256, num_warps=8)]),
]
# Run 6 (`--sweep 6`): around run 5's best (or_codes, block_n 128, block_k 128, 4 warps, 4 stages,
# now the default "{}"): stages, warps, wider tiles, split-K; M = 256 with or_codes
SWEEP6 = [
    ("int4_wo", 1, [{}, dict(num_stages=3), dict(num_stages=6), dict(num_warps=2), dict(num_warps=8, block_n=256),
                    dict(splits=1), dict(block_n=256), dict(gemv=True, block_n=128, block_k=128, or_codes=False)]),
    ("int4_wo", 16, [{}, dict(num_stages=3), dict(num_stages=6), dict(splits=1)]),
    ("int4_wo", 256, [{}, dict(or_codes=True), dict(or_codes=True, block_m=64, num_warps=4, num_stages=4)]),
]
# Run 7 (`--sweep 7`): M = 1 on the CUDA cores with the PTX codes: (128 + q) s + (m - 128 s), one
# FMA per weight, into a tile-shaped partial summed once (no tensor-core operand staging)
GO = dict(gemv=True, defer_sum=True, or_codes=True, block_k=128, num_warps=4, num_stages=4)
SWEEP7 = [
    ("int4_wo", 1, [{}, dict(GO, block_n=32), dict(GO, block_n=64), dict(GO, block_n=128), dict(GO, block_n=64, num_warps=2),
                    dict(GO, block_n=64, num_stages=3), dict(GO, block_n=32, num_warps=2), dict(GO, block_n=16)]),
]
SWEEPS = {"1": SWEEP, "2": SWEEP2, "3": SWEEP3, "4": SWEEP4, "5": SWEEP5, "6": SWEEP6, "7": SWEEP7}
# `--parts profile`: (mode, M, impl, variant); the kernel variants are runs 1-2's best
PROFILE = [("bf16", 16, "xla", None), ("fp8", 16, "xla", None),
           ("fp8", 16, "pallas", dict(TCS, block_n=32, block_k=256, num_stages=4)),
           ("fp8", 1, "xla", None), ("fp8", 1, "pallas", dict(G1, block_n=16, block_k=1024, num_warps=4, num_stages=2))]


def queued(fn, *args, calls=10, rounds=3):
    """Seconds per call with `calls` calls queued back to back before one sync (median of
    `rounds`): the host's per-call dispatch and sync overlap the device's work, unlike `bench`."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            y = fn(*args)
        jax.block_until_ready(y)
        ts.append((time.perf_counter() - t0) / calls)
    return float(np.median(ts))


def _stack_fn(mode, m, impl, over, shapes):
    """jit of the stack (all four projections per layer) or of one projection per layer, with
    the kernel configs for `over`; (fn, configs), fn None where a config does not tile."""
    configs = None
    if impl == "pallas":
        m_, g = MODES[mode]
        configs = {name: qm.choose_config(m, *SHAPES[name], m_, g, w_layout="nk" if mode in NK else "kn", **over)
                   for name in shapes}
        if any(c is None for c in configs.values()):
            print("sweep untileable", mode, m, over, flush=True)
            return None, None

    def one(ls, x):  # one projection per layer; its input zero-padded to K, its output cut to E
        for lw in ls:
            for name in shapes:
                xk = jnp.pad(x, ((0, 0), (0, max(0, SHAPES[name][0] - E))))
                x = x + matmul(mode, xk, lw[name], impl, configs and configs[name])[:, :E]
        return x

    if shapes == tuple(SHAPES):
        return jax.jit(lambda ls, x: stack(mode, ls, x, impl, configs)), configs
    return jax.jit(one), configs


def _time_stack(mode, layers, x, impl, over, shapes, wbytes, bw, n_params, tag=""):
    m = x.shape[0]
    fn, configs = _stack_fn(mode, m, impl, over, shapes)
    if fn is None:
        return None
    t0 = time.perf_counter()
    jax.block_until_ready(fn(layers, x))
    first = time.perf_counter() - t0
    t = bench(fn, layers, x, iters=10)
    tq = queued(fn, layers, x)
    row = {"mode": mode, "impl": impl, "M": m, "shapes": tag or "all", "variant": over, "ms": t * 1e3,
           "ms_queued": tq * 1e3, "TBps_queued": wbytes / tq / 1e12,
           "weight_GB": wbytes / 1e9, "TBps": wbytes / t / 1e12, "roofline_ms": wbytes / bw * 1e3,
           "TFLOPs": 2 * m * n_params / t / 1e12, "first_call_s": first}
    if configs:
        row["configs"] = {k: dataclasses.asdict(c) for k, c in configs.items()}
    print("sweep", json.dumps({k: v for k, v in row.items() if k != "configs"}), flush=True)
    return row


def _try(out, path, *args):
    """_time_stack(*args) appended to out["sweep"] and saved; None when it fails or does not tile."""
    try:
        row = _time_stack(*args)
    except Exception as e:
        print("sweep fail", *args[:1], *args[3:5], args[2].shape[0], repr(e)[:300], flush=True)
        return None
    if row:
        out["sweep"].append(row)
        json.dump(out, open(path, "w"), indent=1)
    return row


def run_sweep(out, n_layers, bw, deadline, path, sweep=SWEEP):
    """SWEEP in order on the whole stack, then each projection alone (32 of it in one jit:
    per-kernel rates, so the small shapes' fixed costs show) for bf16, fp8 XLA and the best
    fp8 kernel at M = 16."""
    out.setdefault("sweep", [])
    by_mode: dict[str, list] = {}
    for mode, m, variants in sweep:
        by_mode.setdefault(mode, []).append((m, variants))
    order = ["bf16"] + list(dict.fromkeys(mode for mode, _, _ in sweep))
    best: dict = {}
    for mode in order:
        if time.time() > deadline:
            print("sweep skipped (deadline)", mode, flush=True)
            continue
        key = jax.random.PRNGKey(0)
        wmode = "fp8" if mode == "fp8_w8a8" else mode
        layers = [{name: make_w(jax.random.fold_in(key, 4 * l + i), s, wmode)
                   for i, (name, s) in enumerate(SHAPES.items())} for l in range(n_layers)]
        plan = [(m, []) for m in sorted({m for _, m, _ in sweep})] if mode == "bf16" else by_mode[mode]
        n_params = sum(k * n for k, n in SHAPES.values()) * n_layers
        for m, variants in plan:
            x = jax.random.normal(jax.random.PRNGKey(m), (m, E), jnp.float32).astype(jnp.bfloat16)
            wbytes = sum(nbytes(lw[n]) for lw in layers for n in SHAPES)
            for impl, over in [("xla", None)] + [("pallas", v) for v in variants]:
                if time.time() > deadline:
                    continue
                row = _try(out, path, mode, layers, x, impl, over, tuple(SHAPES), wbytes, bw, n_params)
                if row:
                    k_ = (mode, impl, m)
                    if k_ not in best or row["ms"] < best[k_]["ms"]:
                        best[k_] = row
        if mode in ("bf16", "fp8") and sweep is SWEEP:  # per projection, M = 16
            x = jax.random.normal(jax.random.PRNGKey(16), (16, E), jnp.float32).astype(jnp.bfloat16)
            runs = [("xla", None)]
            if mode == "fp8" and ("fp8", "pallas", 16) in best:
                runs.append(("pallas", best[("fp8", "pallas", 16)]["variant"]))
            for name in SHAPES:
                wbytes = sum(nbytes(lw[name]) for lw in layers)
                k, n = SHAPES[name]
                for impl, over in runs:
                    if time.time() > deadline:
                        continue
                    _try(out, path, mode, layers, x, impl, over, (name,), wbytes, bw, k * n * n_layers, name)
        del layers
    return best


def run_profile(out, n_layers, runs):
    """Device kernels of one call (jax.profiler trace, 3 calls) of the stack and of each
    projection alone (32 of it per jit), per (mode, M, impl, variant) in `runs`: the time in
    kernels, the span, the kernel count and the largest kernels. Run with XLA's command buffers
    off (XLA_FLAGS=--xla_gpu_enable_command_buffer=) to see the kernels, not one graph."""
    import tempfile

    from probe_step_profile import trace_summary

    res = out.setdefault("profile", {})
    for mode, m, impl, over in runs:
        layers = [{name: make_w(jax.random.fold_in(jax.random.PRNGKey(0), 4 * l + i), s, mode)
                   for i, (name, s) in enumerate(SHAPES.items())} for l in range(n_layers)]
        x = jax.random.normal(jax.random.PRNGKey(m), (m, E), jnp.float32).astype(jnp.bfloat16)
        for shapes in [tuple(SHAPES)] + [(n,) for n in SHAPES]:
            fn, _ = _stack_fn(mode, m, impl, over, shapes)
            if fn is None:
                continue
            jax.block_until_ready(fn(layers, x))
            d = tempfile.mkdtemp()
            jax.profiler.start_trace(d, create_perfetto_trace=True)
            for _ in range(3):
                y = fn(layers, x)
            jax.block_until_ready(y)
            jax.profiler.stop_trace()
            summ = trace_summary(d, {}, 3, top=40)
            wbytes = sum(nbytes(lw[n]) for lw in layers for n in shapes)
            label = f"{mode}/M={m}/{impl}/{over}/{'+'.join(shapes) if len(shapes) == 1 else 'all'}"
            busy = summ.get("kernel_us_per_step", 0)
            top = summ.get("top_kernels", [])
            big = sum(t for _, t, _, _ in top[:1]) if len(shapes) == 1 else 0
            summ["weight_GB"] = wbytes / 1e9
            res[label] = summ
            print(f"profile {label}: kernels {busy:.0f} us per call ({wbytes / max(busy, 1e-9) / 1e6:.2f} TB/s of "
                  f"weights), span {summ.get('span_us_per_step', 0):.0f} us, "
                  f"{sum(c for _, _, c, _ in top)} kernels" + (f"; largest kernel {big:.0f} us" if big else ""),
                  flush=True)
            for k in top[:4]:
                print("    ", str(k)[:150], flush=True)
        del layers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--deadline", type=float, default=520.0, help="seconds after start: later stack runs are skipped")
    ap.add_argument("--shrink", type=int, default=1, help="divide the model dims (CPU smoke test)")
    ap.add_argument("--parts", default="check,stack", help="check, stack, sweep, profile")
    ap.add_argument("--sweep", default="1", help="which SWEEPS list")
    ap.add_argument("--modes", default="bf16,int8_wo,fp8,int4_wo")
    ap.add_argument("--ms", default="1,16,64,256")
    args = ap.parse_args()
    deadline = time.time() + args.deadline
    global E, MLP
    E, MLP = E // args.shrink, MLP // args.shrink
    SHAPES.update(qkv=(E, 3 * E // 2), o=(E, E), gate_up=(E, 2 * MLP), down=(MLP, E))
    if args.shrink > 1:
        MODES["int4_wo"] = ("int4_wo", 32)
    dev = jax.devices()[0]
    bw = copy_bandwidth()
    print(f"device {dev.device_kind}, jax {jax.__version__}: copy {bw / 1e12:.2f} TB/s", flush=True)
    out = {"device": dev.device_kind, "jax": jax.__version__, "copy_TBps": bw / 1e12, "layers": args.layers}
    path = os.path.join(args.out, "bench_quant_matmul.json")
    parts = args.parts.split(",")
    if "check" in parts:
        check(out)
        json.dump(out, open(path, "w"), indent=1)
    if "profile" in parts:
        run_profile(out, args.layers, PROFILE)
        json.dump(out, open(path, "w"), indent=1)
    if "sweep" in parts:
        best = run_sweep(out, args.layers, bw, deadline, path, SWEEPS[args.sweep])
        bf16 = {m: r["ms"] for (mode, _, m), r in best.items() if mode == "bf16"}
        print(f"\ncopy {bw / 1e12:.2f} TB/s; best per (mode, impl, M): ms (TB/s of weight bytes, x bf16) variant")
        for (mode, impl, m), r in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
            print(f"{mode:8} {impl:6} M={m:<4} {r['ms']:6.2f} ({r['TBps']:.2f}, {bf16.get(m, 0) / r['ms']:.2f}x) "
                  f"queued {r.get('ms_queued', 0):6.2f} ms ({r.get('TBps_queued', 0):.2f}) {r['variant']}")
        for r in out["sweep"]:
            if r["shapes"] != "all":
                print(f"  {r['mode']:5} {r['impl']:6} {r['shapes']:8} x{args.layers} M=16 {r['ms']:6.3f} ms "
                      f"({r['TBps']:.2f} TB/s)")
    if "stack" not in parts:
        return
    best = run_stack(out, args.layers, bw, deadline, path, args.modes.split(","), [int(m) for m in args.ms.split(",")])
    bf16 = {m: r["ms"] for (mode, _, m), r in best.items() if mode == "bf16"}
    print(f"\ncopy {bw / 1e12:.2f} TB/s; best per (mode, impl, M): ms (TB/s of weight bytes, x bf16) variant")
    for (mode, impl, m), r in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        ratio = bf16.get(m, 0) / r["ms"]
        print(f"{mode:8} {impl:6} M={m:<4} {r['ms']:6.2f} ({r['TBps']:.2f}, {ratio:.2f}x) {r['variant']}")


if __name__ == "__main__":
    main()
