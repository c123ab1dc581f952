"""Decode attention at serving batch sizes: many sequences, short contexts (issue #8).

    python3 benchmarks/bench_decode_batch.py [--seqs 512] [--ctx 160,256,1024] [--fp8] [--wide]

The throughput benchmark's decode step (512 sequences of ~130-260 tokens, Llama-3-8B heads)
spends ~3.6 ms of ~16 ms in the Triton decode kernel (probe_step_profile.py): about half of
the HBM rate its K/V bytes allow. This times, on the same inputs, the kernel with the
config `choose_config` picks and with every config of a small sweep (block_k, warps, stages),
the kernel alone and the whole op (tile metadata, q relayout, output gather), as K/V GB/s
beside the device's copy bandwidth measured in the same run. Writes decode_batch.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from kiln.runtime.batch import bucket
from kiln.runtime.kernels.ragged_paged_attention import (KernelConfig, choose_config, kernel_call, kernel_inputs,
                                                         ragged_paged_attention)

import bench_attention as ba  # its timer, ceilings and head shapes (benchmarks/ is on sys.path as a script)
from bench_attention import D, H, KVH, PAGE, bench

OUT = os.environ.get("OUT", ".")


def inputs(seqs: int, ctx: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    width = -(-ctx // PAGE)
    nb = seqs * width + 16
    perm = rng.permutation(nb)[: seqs * width].reshape(seqs, width).astype(np.int32)
    kd = jnp.float8_e4m3fn if dtype == "fp8" else jnp.bfloat16
    k = jax.random.normal(jax.random.PRNGKey(1), (KVH, nb, PAGE, D), jnp.float32).astype(kd)
    v = jax.random.normal(jax.random.PRNGKey(2), (KVH, nb, PAGE, D), jnp.float32).astype(kd)
    q = jax.random.normal(jax.random.PRNGKey(3), (seqs, H, D), jnp.float32).astype(jnp.bfloat16)
    lens = jnp.asarray(rng.integers(ctx // 2, ctx + 1, seqs), jnp.int32)  # ragged: ctx/2 .. ctx
    qsl = jnp.arange(seqs + 1, dtype=jnp.int32)
    seq_ids = jnp.arange(seqs, dtype=jnp.int32)
    kv_bytes = int(lens.sum()) * KVH * D * 2 * jnp.dtype(kd).itemsize
    return q, k, v, seq_ids, jnp.asarray(perm), lens, qsl, kv_bytes


def mixed_inputs(T: int, n_dec: int, n_pre: int, chunk: int, dtype, seed: int = 0, S: int = 512):
    """A throughput step as the scheduler builds it: `n_dec` decode tokens (contexts 64-256)
    first, then `n_pre` fresh prompts' chunks of `chunk` tokens, padded to T tokens / S rows."""
    rng = np.random.default_rng(seed)
    dec_ctx = rng.integers(64, 257, n_dec)
    qlen = np.concatenate([np.ones(n_dec, np.int64), np.full(n_pre, chunk)])
    ctx = np.concatenate([dec_ctx, np.full(n_pre, chunk)])
    width = -(-max(256, chunk) // PAGE)
    nb = S * width + 16
    tables = np.zeros((S, width), np.int32)
    tables[: len(ctx)] = rng.permutation(nb)[: len(ctx) * width].reshape(len(ctx), width)
    qsl = np.full(S + 1, qlen.sum(), np.int32)
    qsl[0] = 0
    qsl[1: len(qlen) + 1] = np.cumsum(qlen)
    lens = np.zeros(S, np.int32)
    lens[: len(ctx)] = ctx
    seq_ids = np.zeros(T, np.int32)
    seq_ids[: qlen.sum()] = np.repeat(np.arange(len(qlen)), qlen)
    kd = jnp.float8_e4m3fn if dtype == "fp8" else jnp.bfloat16
    k = jax.random.normal(jax.random.PRNGKey(1), (KVH, nb, PAGE, D), jnp.float32).astype(kd)
    v = jax.random.normal(jax.random.PRNGKey(2), (KVH, nb, PAGE, D), jnp.float32).astype(kd)
    q = jax.random.normal(jax.random.PRNGKey(3), (T, H, D), jnp.float32).astype(jnp.bfloat16)
    return q, k, v, jnp.asarray(seq_ids), jnp.asarray(tables), jnp.asarray(lens), jnp.asarray(qsl)


def mixed(dtype: str) -> list:
    """Whole-op time of each kernel choice on mixed decode + prefill steps, and the two halves
    (decode rows alone, prefill chunks alone) as separate calls: what a split would cost."""
    from kiln.runtime.kernels import attention as am
    from kiln.runtime.kernels.paged_prefill_mgpu import paged_prefill

    out = []
    # (sequence rows, tokens, decodes, prefill chunks, chunk): a 512-row throughput engine, and the
    # default 64-row engine (16 tokens per row: where the Mosaic threshold of 32 per row is untested)
    for S, T, n_dec, n_pre, chunk in ((512, 4096, 450, 28, 128), (512, 2048, 420, 7, 128), (512, 4096, 100, 2, 1990),
                                      (64, 1024, 0, 1, 1024), (64, 1024, 50, 1, 960), (64, 1024, 50, 8, 120)):
        case = {"dtype": dtype, "rows": S, "T": T, "decode_rows": n_dec, "prefill_chunks": n_pre, "chunk": chunk}
        scales = dict(k_scale=jnp.float32(0.5), v_scale=jnp.float32(0.5)) if dtype == "fp8" else {}
        parts = {"mixed": (T, n_dec, n_pre)}
        if n_dec and n_pre:
            parts.update(decode_only=(bucket(n_dec, 16), n_dec, 0), prefill_only=(bucket(n_pre * chunk, 16), 0, n_pre))
        for part, (t, nd, npre) in parts.items():
            q, k, v, seq_ids, bt, lens, qsl = mixed_inputs(t, nd, npre, chunk, dtype, S=S)
            d = choose_config(t, S, KVH, H // KVH, D, PAGE, bt.shape[1] * PAGE, itemsize=2,
                              kv_itemsize=2 if dtype == "bf16" else 1)
            cfgs = {"triton_default": d, "triton_bq16_k64": KernelConfig(16, 64, 1, 4, 2),
                    "triton_bq16_k64_4w1s": KernelConfig(16, 64, 1, 4, 1),
                    "triton_bq16_k32_4w1s": KernelConfig(16, 32, 1, 4, 1),
                    "triton_bq16_k64_8w1s": KernelConfig(16, 64, 1, 8, 1),
                    "triton_bq32_k64_4w1s": KernelConfig(32, 64, 1, 4, 1),
                    "triton_bq8_k64_2w1s": KernelConfig(8, 64, 1, 2, 1)}
            for name, cfg in cfgs.items():
                f = jax.jit(lambda q, k, v, cfg=cfg: ragged_paged_attention(q, k, v, seq_ids, bt, lens, qsl,
                                                                            scale=D ** -0.5, config=cfg, **scales))
                try:
                    case[f"{part}/{name}_us"] = bench(f, q, k, v) * 1e6
                except Exception as e:  # noqa: BLE001
                    case[f"{part}/{name}_us"] = f"{type(e).__name__}: {str(e)[:100]}"
            if dtype == "bf16" and am.hopper():
                f = jax.jit(lambda q, k, v: paged_prefill(q, k, v, seq_ids, bt, lens, qsl, scale=D ** -0.5))
                try:
                    case[f"{part}/mosaic_us"] = bench(f, q, k, v) * 1e6
                except Exception as e:  # noqa: BLE001
                    case[f"{part}/mosaic_us"] = f"{type(e).__name__}: {str(e)[:100]}"
        print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in case.items()}), flush=True)
        out.append(case)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="512")
    ap.add_argument("--ctx", default="160,256,1024")
    ap.add_argument("--fp8", action="store_true", help="also e4m3 pools")
    ap.add_argument("--wide", action="store_true", help="a wider sweep (block_k 16-128, 1-4 warps, 1-4 stages)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run: interpret mode, two configs")
    ap.add_argument("--mixed", action="store_true", help="only mixed decode + prefill steps (kernel choices, split)")
    ap.add_argument("--configs", default=None,
                    help="only these block_k/warps/stages configs, e.g. 32/2/2,64/4/3 (short runs under ncu)")
    ap.add_argument("--dtypes", default=None, help="comma list of bf16,fp8 (default: bf16, and fp8 with --fp8)")
    a = ap.parse_args()
    ba.INTERPRET = a.smoke
    if a.mixed:
        res = {"device": jax.devices()[0].device_kind, "mixed": []}
        for dtype in a.dtypes.split(",") if a.dtypes else ["bf16"] + (["fp8"] if a.fp8 else []):
            res["mixed"] += mixed(dtype)
            with open(os.path.join(OUT, "decode_mixed.json"), "w") as f:
                json.dump(res, f, indent=1)
        return
    bw = ba.ceilings()["copy_GBps"] * 1e9
    res = {"device": jax.devices()[0].device_kind, "copy_GBps": bw / 1e9, "cases": []}
    print(f"device {res['device']}, copy {bw / 1e9:.0f} GB/s", flush=True)
    sweep = list(itertools.product((32, 64, 128), (2, 4), (2, 3, 4)))
    if a.smoke:
        sweep = [(32, 4, 2), (64, 4, 3)]
    elif a.wide:
        sweep = list(itertools.product((16, 32, 64, 128), (1, 2, 4), (1, 2, 3, 4)))
    if a.configs:
        sweep = [tuple(int(x) for x in c.split("/")) for c in a.configs.split(",")]
    dtypes = a.dtypes.split(",") if a.dtypes else ["bf16"] + (["fp8"] if a.fp8 else [])
    for dtype in dtypes:
        for seqs, ctx in itertools.product([int(x) for x in a.seqs.split(",")], [int(x) for x in a.ctx.split(",")]):
            q, k, v, seq_ids, bt, lens, qsl, kv_bytes = inputs(seqs, ctx, dtype)
            scales = dict(k_scale=jnp.float32(0.5), v_scale=jnp.float32(0.5)) if dtype == "fp8" else {}
            default = choose_config(seqs, seqs, KVH, H // KVH, D, PAGE, bt.shape[1] * PAGE, itemsize=2,
                                    kv_itemsize=2 if dtype == "bf16" else 1)
            case = {"dtype": dtype, "seqs": seqs, "ctx_max": ctx, "kv_MB": kv_bytes / 1e6, "default": str(default)}
            print(f"== {dtype} seqs {seqs} ctx<={ctx}", flush=True)  # the lines below belong to this case

            def whole(cfg):
                return jax.jit(lambda q, k, v: ragged_paged_attention(q, k, v, seq_ids, bt, lens, qsl, scale=D ** -0.5,
                                                                      config=cfg, interpret=ba.INTERPRET, **scales))

            f_default = whole(default)
            ref_out = f_default(q, k, v)
            t = bench(f_default, q, k, v)
            case["default_whole_us"], case["default_whole_GBps"] = t * 1e6, kv_bytes / t / 1e9
            # the other data path: one split through q relayout + tile outputs + gather (the old path);
            # split-K with its partials in token layout (`in_place_split_k`, not the default yet)
            alt = (dataclasses.replace(default, in_place=False) if default.splits == 1
                   else dataclasses.replace(default, in_place_split_k=True))
            f_alt = whole(alt)
            case["other_layout_whole_us"] = bench(f_alt, q, k, v) * 1e6
            case["other_layout_max_abs_diff"] = float(jnp.abs((ref_out - f_alt(q, k, v)).astype(jnp.float32)).max())
            pre = dataclasses.replace(default, prefetch_pages=True)  # block-table entries a step ahead
            case["prefetch_pages_whole_us"] = bench(whole(pre), q, k, v) * 1e6
            print(f"   whole op with the next step's pages prefetched {case['prefetch_pages_whole_us']:.1f} us", flush=True)
            print(f"   whole op {'in place' if default.splits == 1 else 'tile layout'} {t * 1e6:.1f} us, "
                  f"{'tile layout' if default.splits == 1 else 'split-K in place'} {case['other_layout_whole_us']:.1f} us, "
                  f"max |diff| {case['other_layout_max_abs_diff']:.1e}", flush=True)
            rows = []
            for bk, warps, stages in sweep:
                cfg = KernelConfig(block_q=default.block_q, block_k=bk, splits=default.splits, num_warps=warps,
                                   num_stages=stages)
                try:
                    c, args, _ = kernel_inputs(q, k, bt, lens, qsl, config=cfg, **scales)
                    f = jax.jit(lambda *xs: kernel_call(c, *xs, group=H // KVH, scale=D ** -0.5,
                                                           interpret=ba.INTERPRET))
                    t = bench(f, *args, k, v)
                except Exception as e:  # noqa: BLE001  (a config Triton cannot fit)
                    rows.append({"block_k": bk, "warps": warps, "stages": stages, "error": str(e)[:120]})
                    continue
                rows.append({"block_k": bk, "warps": warps, "stages": stages, "kernel_us": t * 1e6,
                             "GBps": kv_bytes / t / 1e9})
            ok = [r for r in rows if "kernel_us" in r]
            best = min(ok, key=lambda r: r["kernel_us"])
            cur = next((r for r in ok if (r["block_k"], r["warps"], r["stages"]) ==
                        (default.block_k, default.num_warps, default.num_stages)), None)
            bcfg = KernelConfig(block_q=default.block_q, block_k=best["block_k"], splits=default.splits, num_warps=best["warps"],
                                num_stages=best["stages"])
            f_best = whole(bcfg)
            out = f_best(q, k, v)
            err = float(jnp.linalg.norm((out - ref_out).astype(jnp.float32)) /
                        jnp.linalg.norm(ref_out.astype(jnp.float32)))
            t = bench(f_best, q, k, v)
            case.update(sweep=rows, best=best, default_kernel=cur, best_whole_us=t * 1e6,
                        best_whole_GBps=kv_bytes / t / 1e9, best_vs_default_rel_err=err)
            res["cases"].append(case)
            print(f"{dtype} seqs {seqs} ctx<={ctx} ({kv_bytes / 1e6:.0f} MB): default {default.block_k}/"
                  f"{default.num_warps}w/{default.num_stages}s splits {default.splits}: kernel "
                  f"{cur['kernel_us'] if cur else float('nan'):.1f} us, whole {case['default_whole_us']:.1f} us "
                  f"({case['default_whole_GBps']:.0f} GB/s) | best {best['block_k']}/{best['warps']}w/"
                  f"{best['stages']}s kernel {best['kernel_us']:.1f} us ({best['GBps']:.0f} GB/s), whole "
                  f"{t * 1e6:.1f} us ({kv_bytes / t / 1e9:.0f} GB/s), err {err:.1e}", flush=True)
            top = sorted(ok, key=lambda r: r["kernel_us"])[:6]
            print("   top:", [(r["block_k"], r["warps"], r["stages"], round(r["kernel_us"], 1)) for r in top], flush=True)
            with open(os.path.join(OUT, "decode_batch.json"), "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
