"""Two processes joined through jax.distributed (the multi-host code path) against one
process, on the GPUs of one host (issue #15; the CPU version is tests/passes/test_multiprocess.py).

    python3 benchmarks/check_multiprocess.py [--layouts 2x1,1x2] [--tokens 16] [--attention auto]

A small random-weight Llama checkpoint (fp32, head dim 64) decodes two ragged prompts
greedily: (a) one process, one GPU, no sharding; (b) one process over both GPUs for each
tp x pp layout; (c) two processes, one GPU each (CUDA_VISIBLE_DEVICES), joined with
`kiln.passes.sharding.initialize_distributed`, the same layouts spanning both. fp32 with
full-precision matmuls, so the tokens must be identical everywhere. Writes
check_multiprocess.json under $OUT; exits 1 on a mismatch. On a machine without GPUs it runs
the same with one CPU device per process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = os.environ.get("OUT", ".")
sys.path.insert(0, str(ROOT))  # tests.helpers and tests.passes (the repository's tests package)

SINGLE = r"""
import json, sys
import jax
from kiln.models.loader import open_checkpoint
from kiln.models.registry import build_graph
from tests.passes.mp_worker import layout_tokens, parse_layouts
ckpt, layouts, attention, n, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
ck = open_checkpoint(ckpt)
graph = build_graph(ck.config, "float32")
json.dump({"devices": [str(d) for d in jax.devices()],
           "tokens": {f"tp{tp}_pp{pp}": layout_tokens(graph, ck, tp, pp, attention, n)
                      for tp, pp in parse_layouts(layouts)}}, open(out, "w"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: str | None, gpu: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT.parent}{os.pathsep}{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    if gpu:
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
    else:
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices or 2}")
    return env


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default="2x1,1x2")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--cpu", action="store_true", help="one CPU device per process (no GPU)")
    a = ap.parse_args()
    gpu = not a.cpu
    from tests.helpers import make_hf_checkpoint

    tmp = Path(tempfile.mkdtemp())
    make_hf_checkpoint("llama", tmp / "ckpt", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=4, vocab_size=512)
    res, t0 = {"layouts": a.layouts, "attention": a.attention}, time.time()

    def single(devices, layouts, name):
        p = subprocess.run([sys.executable, "-c", SINGLE, str(tmp / "ckpt"), layouts, a.attention, str(a.tokens),
                            str(tmp / f"{name}.json")], cwd=ROOT, env=_env(devices, gpu),
                           capture_output=True, text=True, timeout=600)
        if p.returncode:
            raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
        return json.loads((tmp / f"{name}.json").read_text())

    res["one_device"] = single("0" if gpu else "1", "1x1", "one_device")
    res["one_process"] = single(None if gpu else "2", a.layouts, "one_process")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.passes.mp_worker", str(i), str(port), str(tmp / "ckpt"),
                               str(tmp / f"proc{i}.json"), a.layouts, a.attention, str(a.tokens)],
                              cwd=ROOT, env=_env(str(i) if gpu else "1", gpu), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, log) in enumerate(zip(procs, logs)):
        if p.returncode:
            raise SystemExit(f"process {i} failed:\n{log[-3000:]}")
    res["two_processes"] = [json.loads((tmp / f"proc{i}.json").read_text()) for i in range(2)]
    ref = res["one_device"]["tokens"]["tp1_pp1"]
    checks = {f"one process {k}": v == ref for k, v in res["one_process"]["tokens"].items()}
    for r in res["two_processes"]:
        checks.update({f"two processes {k} (process {r['process']})": v == ref for k, v in r["tokens"].items()})
    res["checks"], res["wall_s"] = checks, time.time() - t0
    print(json.dumps({"reference_tokens": ref, "checks": checks,
                      "devices": [res["one_process"]["devices"], res["two_processes"][0]["devices"]]}, indent=1))
    with open(os.path.join(OUT, "check_multiprocess.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
