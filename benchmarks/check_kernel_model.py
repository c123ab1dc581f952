"""Full-model check of the attention kernel: greedy decoding of a random-weight Llama with the
Pallas kernel against the same model on the plain-JAX reference attention, both on the GPU.

    python3 benchmarks/check_kernel_model.py [--preset llama-tiny] [--steps 16] [--impl pallas]

Four prompts of different lengths are prefilled in one ragged step (16-token pages shuffled
across the pool), then decoded together, greedily. Passes when every generated token is
identical and each step's logits agree within bf16 tolerance: relative L2 error under 2e-2, or
under twice the reference's own bf16-vs-fp32 error where that is larger.
Writes model_check.json under $OUT (or --out). `--impl interpret` runs it on the CPU."""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from kiln.graph import lower
from kiln.models.loader import random_params
from kiln.models.presets import preset_config
from kiln.models.registry import build_graph
from kiln.runtime.batch import SeqChunk, prepare_inputs
from kiln.runtime.kv_cache import allocate_kv_cache


def run(graph, params, impl: str, prompts: list[list[int]], steps: int, block_size: int, seed: int,
        dtype: str = "bfloat16"):
    """Greedy tokens [S, steps] and the logits of every step [steps, S, V] (f32)."""
    width = -(-(max(map(len, prompts)) + steps) // block_size)
    num_blocks = width * len(prompts) + 1
    kv = allocate_kv_cache(graph, num_blocks, block_size, dtype)
    perm = list(np.random.default_rng(seed).permutation(num_blocks))
    tables = [[int(perm.pop()) for _ in range(width)] for _ in prompts]
    step = jax.jit(lower(graph, attention=impl), donate_argnums=(1,))
    chunks = [SeqChunk(list(p), 0, t) for p, t in zip(prompts, tables)]
    toks, logits_all = [], []
    for i in range(steps):
        n = sum(len(c.token_ids) for c in chunks)
        inputs, _ = prepare_inputs(chunks, block_size, pad_tokens=max(8, -(-n // 8) * 8), pad_blocks=width)
        logits, kv = step(params, kv, inputs)
        logits = np.asarray(logits[:len(prompts)], np.float32)
        nxt = logits.argmax(-1)
        toks.append(nxt)
        logits_all.append(logits)
        chunks = [SeqChunk([int(t)], c.start_pos + len(c.token_ids), c.block_table) for c, t in zip(chunks, nxt)]
    return np.stack(toks, 1), np.stack(logits_all)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-tiny")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--impl", default="pallas")
    ap.add_argument("--std", type=float, default=0.05, help="random weight scale (peakier logits than 0.02)")
    ap.add_argument("--prompt-lens", default="37,200,5,513")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    cfg = preset_config(args.preset)
    graph = build_graph(cfg, "bfloat16")
    params = random_params(graph, 0, std=args.std)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, cfg.vocab_size, int(n))) for n in args.prompt_lens.split(",")]
    ref_t, ref_l = run(graph, params, "reference", prompts, args.steps, 16, 0)
    ker_t, ker_l = run(graph, params, args.impl, prompts, args.steps, 16, 0)
    # bf16's own noise: the reference in bf16 against the same weights in fp32, first step
    g32 = build_graph(cfg, "float32")
    p32 = {k: v.astype("float32") for k, v in params.items()}
    _, f32_l = run(g32, p32, "reference", prompts, 1, 16, 0, "float32")
    noise = float(np.linalg.norm(ref_l[0] - f32_l[0]) / np.linalg.norm(f32_l[0]))
    same = ref_t == ker_t
    first_diff = [int(np.argmin(r)) if not r.all() else None for r in same]
    # logits compared only while both runs fed the same tokens
    upto = min([d for d in first_diff if d is not None] + [args.steps - 1]) + 1
    rel = [float(np.linalg.norm(ker_l[i] - ref_l[i]) / np.linalg.norm(ref_l[i])) for i in range(upto)]
    top2 = np.sort(ref_l, -1)[..., -2:]
    res = {"device": str(jax.devices()[0].device_kind), "preset": args.preset, "impl": args.impl,
           "prompt_lens": [len(p) for p in prompts], "steps": args.steps, "tokens_identical": bool(same.all()),
           "first_difference_per_seq": first_diff, "logits_rel_err_max": max(rel), "logits_rel_err": rel,
           "min_top1_top2_margin": float((top2[..., 1] - top2[..., 0]).min()),
           "max_abs_logit": float(np.abs(ref_l).max()), "bf16_noise_rel_err_step0": noise, "ref_tokens": ref_t.tolist(), "kernel_tokens": ker_t.tolist()}
    # within bf16 tolerance: no further from the bf16 reference than bf16 itself is from fp32
    res["pass"] = res["tokens_identical"] and res["logits_rel_err_max"] <= max(2e-2, 2 * noise)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "model_check.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k not in ("ref_tokens", "kernel_tokens", "logits_rel_err")}))
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
