"""One quantized-matmul kernel on one Llama-3-8B projection shape, called repeatedly: the target
for Nsight Compute (or a quick per-config timing without the whole stack).

    python3 benchmarks/probe_qmatmul.py --mode int4_wo --m 1 --shape gate_up [--config '{"block_n": 64}']
    ncu --clock-control none -k regex:kiln_qmatmul --launch-skip 3 --launch-count 1 --set full \\
        --import-source yes -o q python3 benchmarks/probe_qmatmul.py --mode int4_wo --m 1

Each call uses its own weight copy (`--copies`, more bytes than the L2 holds), so the timing
(median of queued rounds over all copies) streams weights from HBM as the decode step does.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from kiln.runtime.kernels import quant_matmul as qm
from bench_quant_matmul import MODES, NK, SHAPES, make_w, matmul, nbytes  # benchmarks/ is on sys.path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="int4_wo", help="bf16 | int8_wo | int8_nk | fp8 | int4_wo")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--shape", default="gate_up", choices=sorted(SHAPES))
    ap.add_argument("--impl", default="pallas", help="pallas | xla")
    ap.add_argument("--config", default="{}", help="JSON overrides of choose_config's default")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    k, n = SHAPES[a.shape]
    cfg = None
    if a.mode != "bf16" and a.impl == "pallas":
        m_, g = MODES[a.mode]
        cfg = qm.choose_config(a.m, k, n, m_, g, w_layout="nk" if a.mode in NK else "kn", **json.loads(a.config))
        print("config", cfg, flush=True)
    ws = [make_w(jax.random.PRNGKey(i), (k, n), a.mode) for i in range(a.copies)]
    x = jax.random.normal(jax.random.PRNGKey(99), (a.m, k), jnp.float32).astype(jnp.bfloat16)
    f = jax.jit(lambda x, w: matmul(a.mode, x, w, a.impl, cfg))
    for w in ws:
        f(x, w).block_until_ready()
    ts = []
    for _ in range(a.rounds):
        t = time.perf_counter()
        for w in ws:
            y = f(x, w)
        y.block_until_ready()
        ts.append((time.perf_counter() - t) / len(ws))
    t = sorted(ts)[len(ts) // 2]
    # against XLA's path in fp32 (the dequantized weights exact): the kernel's own error
    ref = matmul(a.mode, x.astype(jnp.float32), ws[0], "xla")
    err = float(jnp.linalg.norm(f(x, ws[0]).astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    print(json.dumps({"mode": a.mode, "m": a.m, "shape": a.shape, "impl": a.impl, "config": str(cfg),
                      "us_per_call": t * 1e6, "TBps": nbytes(ws[0]) / t / 1e12, "rel_err_vs_fp32": err}), flush=True)


if __name__ == "__main__":
    main()
