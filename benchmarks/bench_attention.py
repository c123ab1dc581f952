"""Paged-attention benchmark on one GPU: Kiln's Pallas kernel vs the plain-JAX reference under
XLA vs jax's own Pallas GPU kernels, on the same inputs, with the machine's ceilings measured
in the same run.

    python3 benchmarks/bench_attention.py [--quick] [--out DIR]

Decode: batch 64, Llama-3-8B heads (32 q / 8 kv heads, head dim 128), bf16, 16-token pages
shuffled across the pool, contexts 2k-32k; figure = K/V bytes read / time (HBM GB/s).
Prefill: causal chunks of 2k-8k tokens; figure = useful attention FLOPs / time (TFLOP/s).
Ceilings: a device-to-device copy (bytes read + written) and a bf16 8192^3 matmul.
Also checks the kernel against the reference on the GPU, and times the KV-cache write.
Writes attention.json and attention.md under --out (default $OUT or .)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from kiln.runtime.kernels.attention import paged_attention_reference, write_kv
from kiln.runtime.kernels.ragged_paged_attention import (KernelConfig, choose_config, kernel_call, kernel_inputs,
                                                         ragged_paged_attention, tile_metadata)

KVH, H, D, PAGE = 8, 32, 128, 16
INTERPRET = False  # --smoke: every Pallas call in interpret mode at tiny sizes (a CPU dry run of this script)


def bench(f, *args, target_s: float = 0.15, reps: int = 5) -> float:
    """Median seconds per call: calls queued back to back, one sync per repetition."""
    jax.block_until_ready(f(*args))
    if INTERPRET:
        return 1.0
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    one = time.perf_counter() - t0
    n = int(min(200, max(3, target_s / max(one, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def ceilings() -> dict:
    x = jax.random.normal(jax.random.PRNGKey(0), (1 << (16 if INTERPRET else 30),), jnp.bfloat16)  # 2 GiB
    copy = jax.jit(lambda x: x * 2)
    t = bench(copy, x)
    hbm = 2 * x.nbytes / t
    del x
    n = 512 if INTERPRET else 8192
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
    t = bench(jax.jit(lambda a, b: a @ b), a, b)
    return {"copy_GBps": hbm / 1e9, "matmul_bf16_TFLOPs": 2 * n ** 3 / t / 1e12}


def make_batch(rng, q_lens, ctx_lens, dtype=jnp.bfloat16, pool_dtype=None, page=PAGE, heads=(H, KVH), d=D, pad_to=1):
    """A ragged batch over freshly filled pools; pages of each sequence shuffled across the pool.
    `pad_to`: padding tokens (sequence 0, position 0) up to a multiple of it, as the runner's buckets."""
    s = len(q_lens)
    (h, kvh), PAGE, D = heads, page, d  # noqa: N806
    pages = [-(-c // PAGE) for c in ctx_lens]
    nb = sum(pages)
    width = max(pages)
    perm = rng.permutation(nb).astype(np.int32)
    tables = np.zeros((s, width), np.int32)
    o = 0
    for i, p in enumerate(pages):
        tables[i, :p] = perm[o:o + p]
        o += p
    t = -(-sum(q_lens) // pad_to) * pad_to
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    seq_ids = np.r_[np.repeat(np.arange(s), q_lens), np.zeros(t - sum(q_lens))].astype(np.int32)
    positions = np.r_[np.concatenate([np.arange(c - q, c) for q, c in zip(q_lens, ctx_lens)]),
                      np.zeros(t - sum(q_lens))].astype(np.int32)
    key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
    kq, kk, kv = jax.random.split(key, 3)
    pool_dtype = pool_dtype or dtype
    mk = lambda k: jax.random.normal(k, (kvh, nb, PAGE, D), jnp.float32).astype(pool_dtype)  # noqa: E731
    return dict(q=jax.random.normal(kq, (t, h, D), jnp.float32).astype(dtype), k=mk(kk), v=mk(kv),
                positions=jnp.asarray(positions), seq_ids=jnp.asarray(seq_ids), tables=jnp.asarray(tables),
                ctx=jnp.asarray(np.asarray(ctx_lens, np.int32)), qsl=jnp.asarray(qsl))


def kiln_fn(cfg=None, **kw):
    def f(b):
        return ragged_paged_attention(b["q"], b["k"], b["v"], b["seq_ids"], b["tables"], b["ctx"], b["qsl"],
                                      scale=D ** -0.5, config=cfg, interpret=INTERPRET, **kw)
    return jax.jit(f)


def kiln_core_fn(b, cfg=None):
    """The pallas_call alone on precomputed operands (tile metadata, q in the kernel's layout: token
    rows with one split, by kv head with split-K): the kernel without the small XLA ops around it.
    Returns (jitted fn, its argument)."""
    c, args, _ = kernel_inputs(b["q"], b["k"], b["tables"], b["ctx"], b["qsl"], config=cfg)
    group = b["q"].shape[1] // b["k"].shape[0]
    f = jax.jit(lambda a: kernel_call(c, *a, group=group, scale=D ** -0.5, interpret=INTERPRET))
    return f, (*args, b["k"], b["v"])


def kiln_layer_fn(b):
    """The op as one layer of a model step sees it: the tile metadata computed beforehand (in a
    step XLA computes it once for all layers), the kernel and what surrounds it (q relayout and
    output gather with split-K; the padding mask in token layout) timed."""
    t, s = b["q"].shape[0], b["tables"].shape[0]
    cfg = choose_config(t, s, KVH, H // KVH, D, PAGE, b["tables"].shape[1] * PAGE,
                        kv_itemsize=jnp.dtype(b["k"].dtype).itemsize)
    md = tile_metadata(b["qsl"], b["ctx"], cfg.block_q, max(1, min(t, -(-t // cfg.block_q) + s)))

    def f(b, md):
        return ragged_paged_attention(b["q"], b["k"], b["v"], b["seq_ids"], b["tables"], b["ctx"], b["qsl"],
                                      scale=D ** -0.5, config=cfg, interpret=INTERPRET, metadata=md)
    return jax.jit(f), jax.block_until_ready(md)


def jax_mgpu_fn(block_q: int, block_kv: int):
    """jax's Mosaic GPU (Hopper) flash attention: contiguous [1, T, heads, D] q/K/V, GQA, causal."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu as am

    cfg = am.TuningConfig(block_q=block_q, block_kv=block_kv, max_concurrent_steps=2, causal=True)
    return jax.jit(lambda q, k, v: am.attention(q, k, v, cfg))


def ref_fn(**kw):
    def f(b):
        return paged_attention_reference(b["q"], b["k"], b["v"], b["positions"], b["seq_ids"], b["tables"],
                                         b["ctx"], scale=b["q"].shape[-1] ** -0.5, **kw)
    return jax.jit(f)


def mgpu_fn(cfg=None):
    """Kiln's Mosaic GPU paged prefill kernel (`paged_prefill_mgpu.py`), the whole op."""
    from kiln.runtime.kernels.paged_prefill_mgpu import paged_prefill

    def f(b):
        return paged_prefill(b["q"], b["k"], b["v"], b["seq_ids"], b["tables"], b["ctx"], b["qsl"],
                             scale=b["q"].shape[-1] ** -0.5, config=cfg, interpret=INTERPRET)
    return jax.jit(f)


def hook_layout_check(log):
    """jax 0.11's Mosaic layout inference asserts on some shapes: log the check's source and arguments."""
    try:
        import inspect

        from jax.experimental.mosaic.gpu import layout_inference as li

        check = li._check_unsatisfiable_divisibility_constraints
        log("layout check source:\n" + inspect.getsource(check)[:3000])

        def logged(*a, **k):
            try:
                return check(*a, **k)
            except AssertionError:
                log("layout check failed on: " + repr(a)[:3000] + " " + repr(k)[:500])
                raise
        li._check_unsatisfiable_divisibility_constraints = logged
    except Exception as e:  # noqa: BLE001
        log(f"(no layout check hook: {e})")


def prefill_mgpu(rng, res, log, mm):
    """Issue #4 (a): the Mosaic GPU paged prefill kernel against the fp32 reference on ragged shapes,
    then prefill 2k/4k/8k/4x2k beside the Triton kernel, as TFLOP/s and % of the matmul ceiling."""
    from kiln.runtime.kernels.paged_prefill_mgpu import MgpuConfig

    hook_layout_check(log)
    default = MgpuConfig()
    mgpu_checks(rng, res, log, [(default, jnp.bfloat16), (default, jnp.float16)])

    from kiln.runtime.kernels import attention as attn

    q2k = jax.ShapeDtypeStruct((2048, H, D), jnp.bfloat16)
    pool = jax.ShapeDtypeStruct((KVH, 128, PAGE, D), jnp.bfloat16)
    log(f"dispatch: hopper() {attn.hopper()}, 2k-token prefill step over 8 sequence rows goes to Mosaic GPU: "
        f"{attn._use_mgpu('pallas', q2k, pool, (8, 1), None, None)}, over 1024 rows: "
        f"{attn._use_mgpu('pallas', q2k, pool, (1024, 1), None, None)}")
    cfgs = [MgpuConfig(64, 3), MgpuConfig(64, 2), MgpuConfig(64, 4), MgpuConfig(128, 2), MgpuConfig(128, 3)]
    for ql in ([2048], [4096], [8192], [2048] * 4):
        log(f"prefill {ql}")
        b = make_batch(rng, ql, ql)
        flops = sum(4 * H * D * q * (q + 1) / 2 for q in ql)
        row = {"q_lens": ql, "flops": flops, "kiln": try_time("kiln Triton (default config)", kiln_fn(), b, log=log)}
        tm = {str(c): try_time(f"kiln mgpu {c}", mgpu_fn(c), b, log=log) for c in cfgs}
        row["mgpu_all"] = tm
        row["mgpu"] = min([x for x in tm.values() if x] or [None]) if any(tm.values()) else None
        b.clear()
        for page in (32, 64):  # larger pages: fewer, larger TMA copies per key step
            b = make_batch(rng, ql, ql, page=page)
            row[f"mgpu_page{page}"] = try_time(f"kiln mgpu, {page}-token pages", mgpu_fn(), b, log=log)
            b.clear()
        for k in ("kiln", "mgpu", "mgpu_page32", "mgpu_page64"):
            if row.get(k):
                row[k + "_TFLOPs"] = flops / row[k] / 1e12
                row[k + "_pct"] = 100 * row[k + "_TFLOPs"] / mm
                log(f"  {k}: {row[k + '_TFLOPs']:.0f} TFLOP/s = {row[k + '_pct']:.0f}% of matmul")
        res.setdefault("prefill_mgpu", []).append(row)


MGPU_CASES = [  # (name, q lens, context lens, (q heads, kv heads), head dim, page)
    ("ragged prefill + chunk + decode, GQA 4", [300, 77, 1, 129], [300, 900, 50, 1000], (32, 8), 128, 16),
    ("GQA 1, head dim 64", [200, 65], [333, 65], (8, 8), 64, 16),
    ("GQA 8, pages 32", [513, 3], [700, 3], (64, 8), 128, 32),
    ("GQA 2, pages 256 > block_kv (slices of a page)", [400, 9], [1000, 9], (16, 8), 128, 256),
]


def mgpu_checks(rng, res, log, cfgs):
    """The Mosaic GPU kernel (whole op) against the fp32 reference on upcast inputs, ragged shapes,
    tokens padded to a multiple of 8 (the runner's buckets; `direct_q` needs it)."""
    for (name, ql, cx, heads, d, page), (cfg, dt) in ((c, x) for x in cfgs for c in MGPU_CASES):
        try:
            b = make_batch(rng, ql, cx, dt, page=page, heads=heads, d=d, pad_to=8)
            out = mgpu_fn(cfg)(b)
            bf = {**b, "q": b["q"].astype(jnp.float32), "k": b["k"].astype(jnp.float32),
                  "v": b["v"].astype(jnp.float32)}
            err = rel_err(out, ref_fn()(bf), sum(ql))
            pad = np.asarray(out[sum(ql):], np.float32)
            err = err if not pad.size or not np.abs(pad).max() else float("nan")  # padding tokens are zeros
        except Exception:
            err = float("nan")
            log(" | ".join(traceback.format_exc().strip().splitlines()[-4:])[:600])
        case = f"mgpu {name} {jnp.dtype(dt).name} {cfg}"
        res["checks"].append({"case": case, "rel_err": err})
        log(f"check {case}: rel err {err:.2e}")


PARTS_LAYOUTS = ("by_tile", "direct_q", "direct_q_out")


def prefill_parts(rng, res, log, mm, sizes, names=PARTS_LAYOUTS, triton=True):
    """Issue #4: where the Mosaic GPU prefill op's time goes. Per layout (q gathered by tile vs read
    in place), each part timed alone (tile metadata, q relayout, kernel, output gather), the whole
    op, and the op with the metadata computed beforehand (a model step computes it once for all
    layers); the Triton kernel (whole op) beside it."""
    from kiln.runtime.kernels import paged_prefill_mgpu as mg
    from kiln.runtime.kernels.ragged_paged_attention import tile_metadata, tiles_to_tokens

    group, gp = H // KVH, 4
    bq = 128 // gp
    layouts = {"by_tile": mg.MgpuConfig(128, 2, False, False), "direct_q": mg.MgpuConfig(128, 2, True, False),
               "direct_q_out": mg.MgpuConfig(128, 2, True, True)}
    layouts = {n: layouts[n] for n in names}
    for ql in sizes:
        log(f"prefill parts {ql}")
        b = make_batch(rng, ql, ql, pad_to=8)
        t, s, width = b["q"].shape[0], len(ql), b["tables"].shape[1]
        flops = sum(4 * H * D * q * (q + 1) / 2 for q in ql)
        row = {"q_lens": ql, "flops": flops,
               "triton": try_time("Triton kernel, whole op", kiln_fn(), b, log=log) if triton else None}
        for name, cfg in layouts.items():
            direct, dout = cfg.direct_q, cfg.direct_out
            nt = max(1, min(t, -(-t // bq) + (2 if direct else 1) * s + (2 if dout else 0)))
            mdf = jax.jit(lambda qsl, ctx, direct=direct, nt=nt, dout=dout: (
                mg.aligned_tile_metadata(qsl, ctx, bq, nt, t if dout else None) if direct
                else tile_metadata(qsl, ctx, bq, nt)))
            meta, first = mdf(b["qsl"], b["ctx"])
            qf = jax.jit(lambda q, meta, direct=direct: (q.reshape(t, H * D) if direct
                                                         else mg.q_by_tile(q, meta, KVH, gp)))
            qg = qf(b["q"], meta)
            tables = b["tables"].reshape(-1)
            kf = jax.jit(lambda meta, tables, qg, k, v, cfg=cfg: mg.tile_call(
                meta, tables, qg, k, v, width=width, group=group, scale=D ** -0.5, config=cfg, interpret=INTERPRET))
            tiles = kf(meta, tables, qg, b["k"], b["v"])
            of = jax.jit(lambda o, q, sid, qsl, first, direct=direct: (
                mg.aligned_tiles_to_tokens if direct else tiles_to_tokens)(o, q, sid, qsl, first, bq, gp))

            def layer(b, md, cfg=cfg):
                return mg.paged_prefill(b["q"], b["k"], b["v"], b["seq_ids"], b["tables"], b["ctx"], b["qsl"],
                                        scale=D ** -0.5, config=cfg, metadata=md, interpret=INTERPRET)
            r = {"metadata": try_time(f"{name}: tile metadata", mdf, b["qsl"], b["ctx"], log=log),
                 "q_relayout": None if direct else try_time(f"{name}: q relayout", qf, b["q"], meta, log=log),
                 "kernel": try_time(f"{name}: kernel alone", kf, meta, tables, qg, b["k"], b["v"], log=log),
                 "out_gather": None if dout else try_time(f"{name}: output gather", of, tiles, b["q"], b["seq_ids"],
                                                          b["qsl"], first, log=log),
                 "layer": try_time(f"{name}: op, metadata beforehand", jax.jit(layer), b, (meta, first), log=log),
                 "whole": try_time(f"{name}: whole op", mgpu_fn(cfg), b, log=log)}
            del qg, tiles
            row[name] = r
        for k, v in [("triton", row["triton"])] + [(f"{n}.{p}", row[n][p]) for n in layouts for p in
                                                   ("kernel", "layer", "whole")]:
            if v:
                row[k + "_TFLOPs"] = flops / v / 1e12
                log(f"  {k}: {v * 1e3:.3f} ms = {flops / v / 1e12:.0f} TFLOP/s = {100 * flops / v / 1e12 / mm:.0f}%")
        b.clear()
        res.setdefault("prefill_parts", []).append(row)


def jax_paged_fn(ppcb: int, k_splits: int):
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    def f(b):
        return paged_attention(b["q"] * D ** -0.5, b["k"], b["v"], b["tables"], b["ctx"],
                               pages_per_compute_block=ppcb, k_splits=k_splits, interpret=INTERPRET)
    return jax.jit(f)


def rel_err(out, ref, n):
    out, ref = np.asarray(out[:n], np.float32), np.asarray(ref[:n], np.float32)
    if not np.all(np.isfinite(out)):
        return float("nan")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def try_time(name, fn, *args, log):
    try:
        t = bench(fn, *args)
        log(f"  {name}: {t * 1e3:.3f} ms")
        return t
    except Exception as e:  # a config that does not compile (shared memory) or does not fit
        log(f"  {name}: FAILED {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}")
        if type(e).__name__ == "AssertionError":  # a compiler assertion: where it fired
            log("    " + " | ".join(traceback.format_exc().strip().splitlines()[-4:])[:600])
        return None


def sweep(cfgs, b, log):
    """Time every config; returns ({config: seconds or None}, the three fastest configs)."""
    times = {str(c): try_time(str(c), kiln_fn(c), b, log=log) for c in cfgs}
    good = sorted(((t, c) for c, t in zip(cfgs, times.values()) if t), key=lambda x: x[0])
    return times, [c for _, c in good[:3]]


def time_best(row, cfgs, b, log):
    for i, cfg in enumerate(cfgs):
        row[f"kiln_best{i}"] = try_time(f"kiln {cfg}", kiln_fn(cfg), b, log=log)
        row[f"kiln_best{i}_cfg"] = str(cfg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer sizes and configs")
    ap.add_argument("--checks-only", action="store_true", help="GPU checks and the 8k prefill only")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run: interpret mode, tiny sizes")
    ap.add_argument("--wide", action="store_true", help="wide config sweeps (decode 2k/8k, fp8, prefill tiles)")
    ap.add_argument("--mgpu", action="store_true", help="also time jax's Mosaic GPU attention_mgpu on prefill")
    ap.add_argument("--prefill-mgpu", action="store_true",
                    help="only the Mosaic GPU prefill kernel: checks, prefill beside Triton")
    ap.add_argument("--prefill-parts", default="",
                    help="only the Mosaic GPU prefill op: 'checks' / 'checks_default' (against the reference: "
                         "four layouts / the default), or comma-separated "
                         f"layouts of {PARTS_LAYOUTS} taken apart (metadata, q relayout, kernel, output), "
                         "the first beside the Triton kernel")
    ap.add_argument("--no-ceilings", action="store_true", help="skip the copy and matmul ceilings")
    ap.add_argument("--parts-sizes", default="", help="prefill sizes for --prefill-parts, e.g. 2048,2048x2048")
    ap.add_argument("--decode-ctx", default="", help="comma-separated decode contexts (overrides the defaults)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    import faulthandler

    faulthandler.enable()  # a crash inside a compiler or kernel still says where
    global INTERPRET
    INTERPRET = args.smoke
    os.makedirs(args.out, exist_ok=True)

    def log(s):
        print(s, flush=True)
        with open(os.path.join(args.out, "attention.log"), "a") as f:  # kept if the run is cut short
            f.write(s + "\n")

    rng = np.random.default_rng(0)
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "decode": [], "prefill": [],
           "checks": [], "sweeps": {}}
    log(f"device {res['device']}  jax {jax.__version__}")
    res["ceilings"] = cl = {"copy_GBps": 0, "matmul_bf16_TFLOPs": 1} if args.no_ceilings else ceilings()
    log(f"ceilings: copy {cl['copy_GBps']:.0f} GB/s, bf16 matmul {cl['matmul_bf16_TFLOPs']:.0f} TFLOP/s")
    if args.prefill_parts:
        from kiln.runtime.kernels.paged_prefill_mgpu import MgpuConfig

        hook_layout_check(log)
        if args.prefill_parts == "checks":
            mgpu_checks(rng, res, log, [(MgpuConfig(128, 2, False, False), jnp.bfloat16),
                                        (MgpuConfig(128, 2, True, False), jnp.bfloat16),
                                        (MgpuConfig(128, 2, True, True), jnp.bfloat16),
                                        (MgpuConfig(128, 2, True, True), jnp.float16)])
        elif args.prefill_parts == "checks_default":
            mgpu_checks(rng, res, log, [(MgpuConfig(), jnp.bfloat16), (MgpuConfig(), jnp.float16)])
        else:
            names = args.prefill_parts.split(",")
            sizes = [[64], [32, 24]] if args.smoke else [[2048], [2048] * 4, [4096], [8192]]
            if args.parts_sizes:
                sizes = [[int(x) for x in z.split("x")] for z in args.parts_sizes.split(",")]
            prefill_parts(rng, res, log, cl["matmul_bf16_TFLOPs"], sizes, names, triton=not args.no_ceilings)
        with open(os.path.join(args.out, f"attention_{args.prefill_parts.replace(',', '_')}.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        return 0
    if args.prefill_mgpu:
        prefill_mgpu(rng, res, log, cl["matmul_bf16_TFLOPs"])
        with open(os.path.join(args.out, "attention.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        return 0

    # ---- correctness on the GPU (f32 reference on upcast inputs)
    for name, ql, cx, kw, dt, pdt in [
        ("decode bf16", [1] * 16, list(rng.integers(1, 3000, 16)), {}, jnp.bfloat16, None),
        ("decode bf16 split-K forced", [1] * 16, list(rng.integers(1, 3000, 16)),
         dict(cfg=KernelConfig(4, 128, 4)), jnp.bfloat16, None),
        ("mixed bf16 window+softcap", [300, 1, 1, 77, 1], [700, 90, 2000, 77, 5],
         dict(sliding_window=256, soft_cap=30.0), jnp.bfloat16, None),
        ("prefill fp32 exact", [512, 200], [512, 900], {}, jnp.float32, None),
        ("decode fp8 kv", [1] * 16, list(rng.integers(1, 3000, 16)), dict(k_scale=0.5, v_scale=0.25),
         jnp.bfloat16, jnp.float8_e4m3fn),
    ]:
        try:
            if args.smoke:
                ql, cx = [max(1, q // 8) for q in ql][:3], [max(1, c // 8) for c in cx][:3]
            b = make_batch(rng, ql, cx, dt, pdt)
            cfg = kw.pop("cfg", None)
            out = kiln_fn(cfg, **kw)(b)
            bf = {**b, "q": b["q"].astype(jnp.float32), "k": b["k"].astype(jnp.float32),
                  "v": b["v"].astype(jnp.float32)}
            ref = ref_fn(**kw)(bf)
            err = rel_err(out, ref, sum(ql))
        except Exception:
            err = float("nan")
            log(traceback.format_exc())
        res["checks"].append({"case": name, "rel_err": err})
        log(f"check {name}: rel err {err:.2e}")

    # ---- decode
    ctxs = ([] if args.checks_only else [256] if args.smoke else [2048, 8192] if args.quick or args.wide
            else [2048, 8192, 32768])
    if args.decode_ctx:
        ctxs = [int(c) for c in args.decode_ctx.split(",")]
    sweep_ctx = 256 if args.smoke else 2048
    decode_cfgs = [KernelConfig(4, bk, 1, w, st) for bk in (32, 64) for w in (4, 8) for st in (2, 3)]
    decode_cfgs += [KernelConfig(4, 64, 2, 4, 3), KernelConfig(4, 128, 1, 4, 3)]
    fp8_cfgs = []
    if args.wide:  # 2026-11-24: block_k 32-128 x stages 2-4, 8 warps, split-K 2, the old grid order
        decode_cfgs = [KernelConfig(4, bk, 1, 4, st) for bk in (32, 64, 128) for st in (2, 3, 4)]
        decode_cfgs += [KernelConfig(4, 128, 1, 8, 3), KernelConfig(4, 64, 2, 4, 3),
                        KernelConfig(4, 64, 1, 4, 3, longest_first=False)]
        fp8_cfgs = [KernelConfig(4, 64, 1, 4, 3), KernelConfig(4, 128, 1, 4, 3), KernelConfig(4, 256, 1, 4, 2),
                    KernelConfig(4, 64, 1, 4, 3, fp8_f16=False), KernelConfig(4, 128, 1, 4, 3, fp8_f16=False)]
    if args.quick or args.smoke:
        decode_cfgs = decode_cfgs[::3] if args.quick else decode_cfgs[:2]
    best_cfg = {}
    nb = 4 if args.smoke else 64  # decode batch
    for ctx in ctxs:
        log(f"decode batch {nb} ctx {ctx}")
        b = make_batch(rng, [1] * nb, [ctx] * nb)
        kv_bytes = 2 * nb * ctx * KVH * D * 2
        flops = 4 * nb * ctx * H * D
        row = {"ctx": ctx, "batch": nb, "kv_bytes": kv_bytes,
               "default_cfg": str(choose_config(nb, nb, KVH, 4, D, PAGE, ctx))}
        row["kiln_default"] = try_time("kiln (default config)", kiln_fn(), b, log=log)
        core, core_args = kiln_core_fn(b)
        row["kiln_core"] = try_time("kiln default, pallas_call alone", core, core_args, log=log)
        del core_args
        try:
            lf, md = kiln_layer_fn(b)
            row["kiln_layer"] = try_time("kiln default, tile metadata computed beforehand", lf, b, md, log=log)
        except Exception as e:  # noqa: BLE001
            log(f"  metadata beforehand: FAILED {type(e).__name__}: {e}")
        if ctx == sweep_ctx:
            res["sweeps"]["decode"], best_cfg["decode"] = sweep(decode_cfgs, b, log)
        time_best(row, best_cfg.get("decode", []), b, log)
        jt = {}
        for ppcb, ks in ((8, 16), (16, 8), (4, 16)):
            jt[f"ppcb{ppcb}_ks{ks}"] = try_time(f"jax paged_attention ppcb={ppcb} k_splits={ks}",
                                                 jax_paged_fn(ppcb, ks), b, log=log)
        row["jax_paged"] = min([t for t in jt.values() if t] or [None]) if any(jt.values()) else None
        row["jax_paged_all"] = jt
        row["reference"] = try_time("reference (XLA)", ref_fn(), b, log=log) if ctx <= 8192 or not args.quick else None
        bf8 = {**b, "k": b["k"].astype(jnp.float8_e4m3fn), "v": b["v"].astype(jnp.float8_e4m3fn)}
        if fp8_cfgs and ctx == sweep_ctx:
            t8 = {str(c): try_time(f"fp8 {c}", kiln_fn(c, k_scale=1.0, v_scale=1.0), bf8, log=log) for c in fp8_cfgs}
            res["sweeps"]["decode_fp8"] = t8
            best_cfg["decode_fp8"] = [c for _, c in sorted(((t, c) for c, t in zip(fp8_cfgs, t8.values()) if t),
                                                           key=lambda x: x[0])[:2]]
        fp8_try = best_cfg.get("decode_fp8") or [best_cfg.get("decode", [None])[0]]
        t8 = [try_time(f"kiln fp8 kv {c}", kiln_fn(c, k_scale=1.0, v_scale=1.0), bf8, log=log) for c in fp8_try]
        t8 = [t for t in t8 if t]
        row["kiln_fp8"] = min(t8) if t8 else None
        row["kiln_fp8_default"] = try_time("kiln fp8 kv (default config)", kiln_fn(None, k_scale=1.0, v_scale=1.0),
                                           bf8, log=log)
        del bf8
        kts = [row[k] for k in row if k.startswith("kiln_") and not k.endswith("cfg") and row[k]
               and not k.startswith("kiln_fp8") and k not in ("kiln_core", "kiln_layer")]
        row["kiln"] = min(kts) if kts else None
        for k in ("kiln", "kiln_default", "kiln_core", "kiln_layer", "jax_paged", "reference"):
            if row.get(k):
                row[k + "_GBps"] = kv_bytes / row[k] / 1e9
                row[k + "_TFLOPs"] = flops / row[k] / 1e12
        for k in ("kiln_fp8", "kiln_fp8_default"):
            if row.get(k):
                row[k + "_GBps"] = kv_bytes / 2 / row[k] / 1e9
        # the KV write of this step's 64 tokens into the pools (donated: in place)
        wk = jax.jit(lambda kp, vp, k, v, sl: write_kv(kp, vp, k, v, sl), donate_argnums=(0, 1))
        newk = jnp.ones((nb, KVH, D), jnp.bfloat16)
        slots = jnp.asarray(rng.choice(b["k"].shape[1] * PAGE, nb, replace=False).astype(np.int32))
        kp, vp = b["k"], b["v"]
        b.clear()
        try:
            kp, vp = wk(kp, vp, newk, newk, slots)
            jax.block_until_ready(kp)
            t0 = time.perf_counter()
            for _ in range(50):
                kp, vp = wk(kp, vp, newk, newk, slots)
            jax.block_until_ready(kp)
            row["write_kv_us"] = (time.perf_counter() - t0) / 50 * 1e6
            log(f"  write_kv ({nb} tokens, donated pools): {row['write_kv_us']:.1f} us; a pass over the pools "
                f"would take {kv_bytes / (cl['copy_GBps'] * 1e9 / 2) * 1e6:.0f} us")
        except Exception as e:
            log(f"  write_kv FAILED {e}")
        del kp, vp
        res["decode"].append(row)

    # ---- decode at small batch: where split-K matters (few sequences, long contexts)
    for nbs, ctx in ([] if args.checks_only or args.wide else [(2, 256)] if args.smoke else [(1, 32768), (4, 32768), (8, 8192)]):
        log(f"decode batch {nbs} ctx {ctx}")
        b = make_batch(rng, [1] * nbs, [ctx] * nbs)
        kv_bytes = 2 * nbs * ctx * KVH * D * 2
        cfg = choose_config(nbs, nbs, KVH, 4, D, PAGE, ctx)
        row = {"ctx": ctx, "batch": nbs, "kv_bytes": kv_bytes, "default_cfg": str(cfg),
               "kiln_splitk": try_time(f"kiln split-K {cfg}", kiln_fn(cfg), b, log=log),
               "kiln_nosplit": try_time("kiln splits=1", kiln_fn(KernelConfig(cfg.block_q, cfg.block_k, 1, 4, 3)), b,
                                        log=log),
               "jax_paged": try_time("jax paged_attention ppcb=8 k_splits=16", jax_paged_fn(8, 16), b, log=log)}
        for k in ("kiln_splitk", "kiln_nosplit", "jax_paged"):
            if row.get(k):
                row[k + "_GBps"] = kv_bytes / row[k] / 1e9
        res.setdefault("decode_small", []).append(row)
        b.clear()

    # ---- prefill
    prefills = [[8192]] if args.checks_only else [[64], [32] * 2] if args.smoke else [[2048], [8192]] if args.quick else [[2048], [4096], [8192], [2048] * 4]
    prefill_cfgs = [KernelConfig(32, bk, 1, w, st) for bk in (64, 128) for w in (4, 8) for st in (2, 3, 4)]
    if args.wide:  # 2026-11-24: 64- and 256-row tiles, 8 warps, and the old grid order (first tile first)
        prefill_cfgs = [KernelConfig(32, bk, 1, 4, st) for bk in (64, 128) for st in (2, 3, 4)]
        prefill_cfgs += [KernelConfig(32, 64, 1, 8, 2), KernelConfig(16, 64, 1, 4, 3), KernelConfig(64, 64, 1, 8, 2),
                         KernelConfig(64, 128, 1, 8, 2), KernelConfig(32, 64, 1, 4, 2, longest_first=False)]
    if args.quick or args.smoke:
        prefill_cfgs = prefill_cfgs[::4] if args.quick else prefill_cfgs[:2]
    for ql in prefills:
        t = sum(ql)
        log(f"prefill {ql}")
        b = make_batch(rng, ql, ql)
        flops = sum(4 * H * D * q * (q + 1) / 2 for q in ql)
        row = {"q_lens": ql, "flops": flops, "default_cfg": str(choose_config(t, len(ql), KVH, 4, D, PAGE, max(ql)))}
        row["kiln_default"] = try_time("kiln (default config)", kiln_fn(), b, log=log)
        if ql == [4096] or ((args.quick and ql == [2048]) or (args.smoke and ql == [64])):
            res["sweeps"]["prefill"], best_cfg["prefill"] = sweep(prefill_cfgs, b, log)
        time_best(row, best_cfg.get("prefill", []), b, log)
        # jax's flash attention (contiguous K/V, heads repeated for GQA), one sequence
        if len(ql) == 1:
            from jax.experimental.pallas.ops.gpu.attention import mha

            kc = jax.random.normal(jax.random.PRNGKey(5), (1, t, H, D), jnp.bfloat16)
            qc = b["q"].reshape(1, t, H, D)
            row["jax_mha"] = try_time("jax attention.mha (contiguous, causal)",
                                      jax.jit(lambda q, k, v: mha(q, k, v, None, sm_scale=D ** -0.5, causal=True,
                                                                     interpret=INTERPRET)),
                                      qc, kc, kc, log=log)
            if args.mgpu and not INTERPRET:  # jax's Hopper (Mosaic GPU) flash attention, GQA K/V
                # f16: jax 0.11.2's kernel rejects bf16 ("src had type bfloat16 and dst had type float16");
                # the tensor cores run f16 and bf16 at the same rate
                kg = jax.random.normal(jax.random.PRNGKey(6), (1, t, KVH, D), jnp.float16)
                q16 = qc.astype(jnp.float16)
                tm = {f"bq{a}_bkv{c}": try_time(f"jax attention_mgpu f16 block_q={a} block_kv={c}", jax_mgpu_fn(a, c),
                                                q16, kg, kg, log=log) for a, c in ((64, 64), (64, 128), (64, 256))}
                row["jax_mgpu_all"] = tm
                row["jax_mgpu"] = min([x for x in tm.values() if x] or [None]) if any(tm.values()) else None
                del kg, q16
            del kc
        row["reference"] = try_time("reference (XLA)", ref_fn(), b, log=log) if t <= 2048 else None
        kts = [row[k] for k in row if k.startswith("kiln_") and not k.endswith("cfg") and row[k]]
        row["kiln"] = min(kts) if kts else None
        for k in ("kiln", "kiln_default", "jax_mha", "jax_mgpu", "reference"):
            if row.get(k):
                row[k + "_TFLOPs"] = flops / row[k] / 1e12
        b.clear()
        res["prefill"].append(row)

    res["best_configs"] = {k: [str(c) for c in v] for k, v in best_cfg.items()}
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    md = table(res)
    with open(os.path.join(args.out, "attention.md"), "w") as f:
        f.write(md)
    print(md)


def table(res) -> str:
    cl = res["ceilings"]
    hbm, mm = cl["copy_GBps"], cl["matmul_bf16_TFLOPs"]
    f = lambda x, d=0: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    out = [f"GPU {res['device']}, jax {res['jax']}. Ceilings measured in this run: copy {hbm:.0f} GB/s "
           f"(read+write), bf16 matmul {mm:.0f} TFLOP/s.", "",
           f"Decode, batch {res['decode'][0]['batch'] if res['decode'] else 64}, 32 q / 8 kv heads, head dim 128, bf16, 16-token pages (GB/s of K/V read; % of copy):",
           "", "| context | Kiln kernel | % | metadata beforehand | % | pallas_call alone | % | jax paged_attention | % | "
           "XLA reference | % | Kiln fp8 KV (GB/s of fp8; best / default) | write_kv us |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["decode"]:
        g = lambda k: r.get(k + "_GBps")  # noqa: E731
        pct = lambda k: None if g(k) is None else 100 * g(k) / hbm  # noqa: E731
        out.append(f"| {r['ctx']} | {f(g('kiln'))} | {f(pct('kiln'))} | {f(g('kiln_layer'))} | {f(pct('kiln_layer'))} | "
                   f"{f(g('kiln_core'))} | {f(pct('kiln_core'))} | "
                   f"{f(g('jax_paged'))} | {f(pct('jax_paged'))} | {f(g('reference'))} | {f(pct('reference'))} | "
                   f"{f(r.get('kiln_fp8_GBps'))} / {f(r.get('kiln_fp8_default_GBps'))} | {f(r.get('write_kv_us'), 1)} |")
    out += ["", "Decode at small batch (split-K), GB/s of K/V read:", "",
            "| batch x context | Kiln split-K (default) | Kiln splits=1 | jax paged_attention |", "|---|---|---|---|"]
    for r in res.get("decode_small", []):
        out.append(f"| {r['batch']} x {r['ctx']} | {f(r.get('kiln_splitk_GBps'))} | {f(r.get('kiln_nosplit_GBps'))} | "
                   f"{f(r.get('jax_paged_GBps'))} |")
    out += ["", "Prefill, causal, fresh sequences, same heads (TFLOP/s of useful attention FLOPs; % of matmul):", "",
            "| tokens | Kiln kernel | % | Kiln default | jax attention.mha (contiguous) | % | jax attention_mgpu "
            "(contiguous) | % | XLA reference | % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["prefill"]:
        g = lambda k: r.get(k + "_TFLOPs")  # noqa: E731
        pct = lambda k: None if g(k) is None else 100 * g(k) / mm  # noqa: E731
        out.append(f"| {'+'.join(map(str, r['q_lens']))} | {f(g('kiln'))} | {f(pct('kiln'))} | {f(g('kiln_default'))} | "
                   f"{f(g('jax_mha'))} | {f(pct('jax_mha'))} | {f(g('jax_mgpu'))} | {f(pct('jax_mgpu'))} | "
                   f"{f(g('reference'))} | {f(pct('reference'))} |")
    out += ["", "GPU checks (rel err vs f32 reference): " +
            ", ".join(f"{c['case']} {c['rel_err']:.1e}" for c in res["checks"]),
            "Best configs: " + json.dumps(res.get("best_configs", {}))]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
