"""Host time per engine step, on the CPU, with a null runner (no device work at all).

Times are this process's CPU time (`time.process_time`), so other load on the machine
inflates them less than wall time (also reported). The engine's step is: intake, `Scheduler.schedule`, `build_step` (the step's host arrays),
`runner.execute` (a null call here), then read back the previous step's tokens, resolve
them, check stops and build outputs. With the device step of an 8B model at ~6-8 ms for 256
sequences, all of that must stay well below it or the device waits on the host.

Steady decode: N sequences (128-token prompts, long max_tokens) are admitted and prefilled
first; then K decode steps are timed, per phase and in total.

    python3 benchmarks/bench_host.py                 # 64 and 256 sequences, both output kinds
    python3 benchmarks/bench_host.py --seqs 256 --profile    # plus the cProfile top entries
    python3 benchmarks/bench_host.py --workload 1024 128 128 # plus a whole throughput run
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1].parent))

import numpy as np  # noqa: E402

from kiln.runtime.engine import Engine  # noqa: E402
from kiln.runtime.sampling_params import SamplingParams  # noqa: E402

VOCAB = 32000


class NullRunner:
    """Takes a step's host arrays and returns made-up tokens at once: only host work remains."""

    def __init__(self, *, num_blocks: int, block_size: int, max_num_seqs: int, max_model_len: int):
        self.num_blocks, self.block_size, self.max_num_seqs = num_blocks, block_size, max_num_seqs
        self.max_blocks = -(-max_model_len // block_size)
        self._rng = np.random.default_rng(0)
        self.num_steps = 0
        self.padded_tokens = self.real_tokens = 0

    def execute(self, batch):
        self.num_steps += 1
        self.padded_tokens += len(batch.inputs["token_ids"])
        self.real_tokens += int((batch.inputs["slot_mapping"] >= 0).sum())
        return {"tokens": self._rng.integers(100, VOCAB, self.max_num_seqs).astype(np.int32)}

    @staticmethod
    def read(handle):
        return handle


class PhaseTimer:
    """Wraps named callables to sum the time spent in each."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, name, fn):
        def timed(*a, **k):
            t = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.process_time() - t
        return timed


def make_engine(seqs: int, prompt: int, max_tokens: int):
    runner = NullRunner(num_blocks=seqs * (-(-(prompt + max_tokens) // 16)) + 16, block_size=16, max_num_seqs=seqs,
                        max_model_len=prompt + max_tokens)
    eng = Engine(runner, tokenizer=None, eos_token_ids=[2], vocab_size=VOCAB, max_model_len=prompt + max_tokens,
                 max_num_seqs=seqs, max_num_tokens=max(2048, seqs), overlap=True)
    return eng, runner


def measure(seqs: int, steps: int, kind: str, prompt: int = 128, profile: bool = False) -> dict:
    eng, runner = make_engine(seqs, prompt, steps + 64)
    rng = np.random.default_rng(1)
    for _ in range(seqs):
        eng.add_request([int(t) for t in rng.integers(100, VOCAB, prompt)],
                        SamplingParams(max_tokens=steps + 64, temperature=0.0, ignore_eos=True), output_kind=kind)
    while eng.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running):
        eng.step()
    for _ in range(4):
        eng.step()
    timer = PhaseTimer()
    sch = eng.scheduler
    sch.schedule = timer.wrap("schedule", sch.schedule)
    eng.builder.build = timer.wrap("build_step", eng.builder.build)
    eng._process = timer.wrap("process", eng._process)
    runner.padded_tokens = runner.real_tokens = 0
    prof = cProfile.Profile() if profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    for _ in range(steps):
        eng.step()
    if prof:
        prof.disable()
    wall, total = time.perf_counter() - t0, time.process_time() - c0
    assert len(sch.running) == seqs, "every sequence should still be decoding"
    res = {"seqs": seqs, "output_kind": kind, "steps": steps, "ms_per_step": total / steps * 1e3,
           "wall_ms_per_step": wall / steps * 1e3,
           "us_per_seq_step": total / steps / seqs * 1e6,
           "phases_ms_per_step": {k: v / steps * 1e3 for k, v in timer.seconds.items()},
           "padded_over_real_tokens": runner.padded_tokens / max(runner.real_tokens, 1)}
    res["phases_ms_per_step"]["outputs+rest"] = res["ms_per_step"] - sum(res["phases_ms_per_step"].values())
    if prof:
        st = pstats.Stats(prof)
        st.sort_stats("cumulative").print_stats(25)
        st.sort_stats("tottime").print_stats(15)
    return res


def workload(num_requests: int, isl: int, osl: int, seqs: int = 256, max_num_tokens: int = 2048) -> dict:
    """A whole `kiln bench` throughput run (all requests at once, delta outputs) with the null
    runner: host seconds per output token, and how much padding the token buckets add."""
    eng, runner = make_engine(seqs, isl, osl)
    eng.scheduler.max_num_tokens = max_num_tokens
    rng = np.random.default_rng(2)
    for _ in range(num_requests):
        eng.add_request([int(t) for t in rng.integers(100, VOCAB, isl)],
                        SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True), output_kind="delta")
    t0 = time.process_time()
    while eng.has_unfinished():
        eng.step()
    cpu = time.process_time() - t0
    return {"workload": f"{num_requests} x {isl}/{osl}", "steps": runner.num_steps, "host_s": cpu,
            "host_ms_per_step": cpu / runner.num_steps * 1e3, "host_output_tok_per_s": num_requests * osl / cpu,
            "padded_over_real_tokens": runner.padded_tokens / runner.real_tokens}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="*", default=[64, 256])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--kinds", nargs="*", default=["final", "delta"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workload", type=int, nargs=3, metavar=("REQUESTS", "ISL", "OSL"), default=None,
                    help="also run a whole throughput workload, e.g. 1024 128 128")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    for s in a.seqs:
        for kind in a.kinds:  # the best of a few runs: other load on the machine only adds time
            r = min((measure(s, a.steps, kind, profile=a.profile) for _ in range(a.repeat)),
                    key=lambda r: r["ms_per_step"])
            rows.append(r)
            ph = "  ".join(f"{k} {v:.3f}" for k, v in r["phases_ms_per_step"].items())
            print(f"seqs {s:4d}  output_kind {kind:6s}  {r['ms_per_step']:.3f} ms/step  "
                  f"({r['us_per_seq_step']:.2f} us/seq)  [{ph}]  padded/real tokens {r['padded_over_real_tokens']:.2f}",
                  flush=True)
    if a.workload:
        r = workload(*a.workload)
        rows.append(r)
        print(f"workload {r['workload']}: {r['steps']} steps, host {r['host_s']:.2f} s CPU "
              f"({r['host_ms_per_step']:.3f} ms/step, host alone could serve {r['host_output_tok_per_s']:,.0f} "
              f"output tok/s), padded/real tokens {r['padded_over_real_tokens']:.3f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
