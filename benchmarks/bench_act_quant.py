"""The fused fp8 activation quantization (runtime/kernels/act_quant.py) against XLA's lowering
of the same op, on the Llama-3-8B activations of an fp8 step, on one GPU.

    python3 benchmarks/bench_act_quant.py [--ms 512,2048,4096] [--sweep]

For each token count M and each kind (the two norms and the attention output over 4096
channels, SwiGLU over 14336): the kernel's codes and scales against XLA's on the GPU (share of
codes that differ, largest code step, scale error), then the time per op of 32 ops in one jit
(as a 32-layer step runs them: different inputs, one dispatch), as us and GB/s of bytes read +
written, beside the copy rate measured in the same run. `--sweep` times every config of
CONFIGS. Writes act_quant.json under $OUT (or .)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention  # noqa: E402
from bench_attention import bench, ceilings  # noqa: E402

from kiln.runtime.kernels import act_quant as aq  # noqa: E402

E, F, LAYERS = 4096, 14336, 32
KINDS = [("rms_norm", E), ("add_rms_norm", E), ("rows", E), ("swiglu", F), ("swiglu_scaled", F),
         ("add_rms_norm_scaled+sum", E)]  # +sum: the residual sum written as well (with_sum)
CONFIGS = [aq.ActQuantConfig(br, w) for br, w in ((1, 2), (1, 4), (1, 8), (2, 4), (2, 8), (4, 8))]


def inputs(kind, m, k, i):
    key = jax.random.PRNGKey(i)
    if kind.startswith("add_rms_norm_scaled"):  # o_proj's / down's unscaled W8A8 output, r, its scales, w
        return [jax.random.normal(key, (m, k), jnp.bfloat16) * 100,
                jax.random.normal(jax.random.fold_in(key, 3), (m, k), jnp.bfloat16) * 3,
                jax.random.uniform(jax.random.fold_in(key, 1), (m, 1)) * 0.05,
                jax.random.uniform(jax.random.fold_in(key, 2), (k,)) * 0.01,
                jax.random.normal(jax.random.fold_in(key, 9), (k,), jnp.bfloat16) * 0.2 + 1]
    if kind == "swiglu":
        return [jax.random.normal(key, (m, 2, k), jnp.bfloat16)]
    if kind == "swiglu_scaled":  # a W8A8 GEMM's unscaled output and its token / channel scales
        return [jax.random.normal(key, (m, 2, k), jnp.bfloat16) * 100,
                jax.random.uniform(jax.random.fold_in(key, 1), (m, 1)) * 0.05,
                jax.random.uniform(jax.random.fold_in(key, 2), (2, k)) * 0.01]
    xs = [jax.random.normal(jax.random.fold_in(key, j), (m, k), jnp.bfloat16) * 3
          for j in range(2 if kind == "add_rms_norm" else 1)]
    return xs + ([jax.random.normal(jax.random.fold_in(key, 9), (k,), jnp.bfloat16) * 0.2 + 1] if kind != "rows" else [])


def stack_fn(kind, impl, cfg=None):
    if impl == "pallas" and bench_attention.INTERPRET:
        impl = "interpret"
    kind, with_sum = kind.removesuffix("+sum"), kind.endswith("+sum")
    kw = dict(eps=1e-5) if "norm" in kind else {}
    kw.update(with_sum=True) if with_sum else None

    @jax.jit
    def f(sets):
        return [aq.act_quant(kind, *xs, impl=impl, config=cfg, **kw)[:2] for xs in sets]
    return f


def nbytes(kind, m, k) -> int:
    read = m * k * 2 * (1 if kind in ("rms_norm", "rows") else 2)
    return read + m * k + m * 4 + m * k * 2 * kind.endswith("+sum")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="256,512,2048,4096")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--kinds", default=",".join(k for k, _ in KINDS))
    a = ap.parse_args()
    if jax.default_backend() != "gpu":  # a dry run of the script: the kernel in interpret mode, tiny sizes
        bench_attention.INTERPRET = True
        global LAYERS
        LAYERS = 2
    out = os.environ.get("OUT", ".")
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, **ceilings(), "rows": []}
    print(f"{res['device']}: copy {res['copy_GBps']:.0f} GB/s", flush=True)
    for m in [int(x) for x in a.ms.split(",")]:
        for kind, k in [(kd, k) for kd, k in KINDS if kd in a.kinds.split(",")]:
            sets = [inputs(kind, m, k, i) for i in range(LAYERS)]
            row = {"M": m, "kind": kind, "K": k, "MB": nbytes(kind, m, k) / 1e6}
            q0, s0 = stack_fn(kind, "xla")([sets[0]])[0]
            q1, s1 = stack_fn(kind, "pallas")([sets[0]])[0]
            c0, c1 = np.asarray(q0).view(np.uint8).astype(int), np.asarray(q1).view(np.uint8).astype(int)
            row["codes_differ"] = float((c0 != c1).mean())
            row["max_code_step"] = int(np.abs(c0 - c1).max())
            row["scale_rel_err"] = float(np.abs(np.asarray(s1) / np.asarray(s0) - 1).max())
            t = bench(stack_fn(kind, "xla"), sets) / LAYERS
            row["xla_us"], row["xla_GBps"] = t * 1e6, nbytes(kind, m, k) / t / 1e9
            for cfg in (CONFIGS if a.sweep else [None]):
                name = "default" if cfg is None else f"r{cfg.block_rows}w{cfg.num_warps}"
                try:
                    t = bench(stack_fn(kind, "pallas", cfg), sets) / LAYERS
                    row[f"kernel_{name}_us"] = t * 1e6
                except Exception as e:  # a config that does not compile is reported, not fatal
                    row[f"kernel_{name}_us"] = None
                    row[f"kernel_{name}_error"] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            best = min((v, n) for n, v in row.items() if n.startswith("kernel_") and n.endswith("_us") and v)
            row["best"] = best[1][7:-3]
            row["best_us"], row["best_GBps"] = best[0], nbytes(kind, m, k) / best[0] / 1e3
            res["rows"].append(row)
            print(json.dumps({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in row.items()}), flush=True)
            with open(os.path.join(out, "act_quant.json"), "w") as f:
                json.dump(res, f, indent=1)
    print("\n| M | kind | MB moved | XLA us (GB/s) | kernel us (GB/s), best config | codes differing |")
    print("|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['M']} | {r['kind']} | {r['MB']:.1f} | {r['xla_us']:.1f} ({r['xla_GBps']:.0f}) | "
              f"{r['best_us']:.1f} ({r['best_GBps']:.0f}), {r['best']} | {r['codes_differ']:.2e} (max step {r['max_code_step']}) |")


if __name__ == "__main__":
    main()
