"""Two local processes joined with jax.distributed run one sharded model together and
agree with the single-process result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from kiln.models.loader import load_params, open_checkpoint
from kiln.models.registry import build_graph
from tests.helpers import Stepper, make_hf_checkpoint
from tests.passes.sharding_cases import MP_LAYOUTS, WIDE_HEADS, greedy

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    make_hf_checkpoint("llama", tmp_path / "ckpt", **WIDE_HEADS)
    ck = open_checkpoint(tmp_path / "ckpt")
    graph = build_graph(ck.config, "float32")
    expected, _ = greedy(Stepper(graph, load_params(graph, ck.config, ck.source)), n=3)

    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.passes.mp_worker", str(i), str(port),
                               str(tmp_path / "ckpt"), str(tmp_path / f"out{i}.json")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=420)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        assert r["tokens"] == {f"tp{tp}_pp{pp}": expected for tp, pp in MP_LAYOUTS}
