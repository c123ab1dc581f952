"""Nsight Compute over probe_qmatmul.py, one report per kernel variant, summarised to text:
duration, DRAM and issue-slot use, occupancy, the top warp stalls, and the SASS instructions
that hold the most stall samples.

    python3 benchmarks/ncu_qmatmul.py --out DIR 'int4_wo 1 gate_up {}' 'int4_wo 1 gate_up {"defer_sum": true}'

Each spec: MODE M SHAPE CONFIG-JSON. Writes DIR/ncu_summary.txt and DIR/ncu_raw.tar.gz (the
details pages and SASS CSVs).
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import os
import re
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
# Under ncu's kernel replay every pass saves and restores the device memory the kernel could write;
# with jax's default preallocation that is ~60 GB per pass (the likely reason three earlier runs of
# this script ran past 420 s on one 54 us kernel), so the probe allocates only what it uses, and
# without XLA's command buffers (CUDA graphs) each kernel is a launch of its own
ENV = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
       "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()}
DETAIL = re.compile(r"^\s*(Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Registers Per Thread|"
                    r"Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|Executed Ipc Active|L1/TEX Hit Rate|"
                    r"L2 Hit Rate|Block Limit Registers|Grid Size|Block Size|Waves Per SM)\s+(\S+)\s+(\S+)")


def sass_top(text: str, n: int = 14) -> list[str]:
    """The SASS lines holding the most warp-stall samples, and samples per opcode."""
    rows = list(csv.reader(io.StringIO(text)))
    hi = next((i for i, r in enumerate(rows) if "Source" in r), None)
    if hi is None:
        return ["(no SASS table)"]
    head = rows[hi]
    src = head.index("Source")
    samp = next((i for i, h in enumerate(head) if h.startswith("Warp Stall Sampling (All")), None)
    if samp is None:
        return ["(no stall samples) columns: " + ", ".join(head[:12])]
    body = [r for r in rows[hi + 1:] if len(r) > samp and r[samp].replace(".", "").isdigit()]
    total = sum(float(r[samp]) for r in body) or 1.0
    ops = collections.Counter()
    for r in body:
        ops[r[src].split()[0] if r[src].split() else "?"] += float(r[samp])
    out = ["  samples by opcode: " + ", ".join(f"{o} {100 * v / total:.0f}%" for o, v in ops.most_common(10))]
    for r in sorted(body, key=lambda r: -float(r[samp]))[:n]:
        out.append(f"  {100 * float(r[samp]) / total:5.1f}%  {r[src][:90]}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per ncu run (the report's import not counted)")
    ap.add_argument("specs", nargs="+")
    a = ap.parse_args()
    summary, raw = [], []
    for i, spec in enumerate(a.specs):
        mode, m, shape, cfg = spec.split(" ", 3)
        first = len(summary)
        rep = os.path.join(a.out, f"r{i}")
        cmd = ["ncu", "--clock-control", "none", "-k", "regex:kiln_qmatmul", "--launch-skip", "2", "--launch-count", "1",
               "--set", "full", "--import-source", "yes", "-f", "-o", rep, sys.executable,
               os.path.join(HERE, "probe_qmatmul.py"), "--mode", mode, "--m", m, "--shape", shape, "--config", cfg,
               "--copies", "2", "--rounds", "2"]
        try:
            log = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=ENV)
        except subprocess.TimeoutExpired:
            summary.append(f"== {spec}\n  ncu ran past {a.timeout} s")
            continue
        details = subprocess.run(["ncu", "--import", rep + ".ncu-rep", "--page", "details"], capture_output=True,
                                 text=True).stdout
        sass = subprocess.run(["ncu", "--import", rep + ".ncu-rep", "--page", "source", "--csv", "--print-source",
                               "sass"], capture_output=True, text=True).stdout
        cfg_line = next((ln for ln in log.stdout.splitlines() if ln.startswith("config")), "config ?")
        summary.append(f"== {spec}\n{cfg_line}")
        if not details:
            summary.append("  ncu failed: " + (log.stdout + log.stderr)[-600:])
        summary += [f"  {m_.group(1)}: {m_.group(3)} {m_.group(2)}" for ln in details.splitlines()
                    if (m_ := DETAIL.match(ln))]
        summary += [f"  {ln.strip()[:200]}" for ln in details.splitlines() if "stall" in ln.lower() and "%" in ln][:6]
        summary += sass_top(sass)
        raw += [(f"r{i}_details.txt", details), (f"r{i}_sass.csv", sass)]
        if os.path.exists(rep + ".ncu-rep"):
            os.remove(rep + ".ncu-rep")
        print("\n".join(summary[first:]), flush=True)
        _write(a.out, summary, raw)  # after every spec: a call cut by its limit still returns what ran


def _write(out: str, summary: list[str], raw: list[tuple[str, str]]) -> None:
    with open(os.path.join(out, "ncu_summary.txt"), "w") as f:
        f.write("\n".join(summary) + "\n")
    with tarfile.open(os.path.join(out, "ncu_raw.tar.gz"), "w:gz") as t:
        for name, text in raw:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    main()
