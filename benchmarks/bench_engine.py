"""Engine throughput on the GPU, and whether the host stalls the device.

A random-weight Llama-shaped model (bf16) serves 64 requests (128-token prompts, 128 new
tokens, greedy) through the full engine: scheduler, block manager, host batching, device
sampling, read-back. Reported beside it, from the same run: the device-only rate of the
same 64-sequence decode step, dispatched back to back with no host work in between. With
overlap on, engine decode steps/s should approach that rate; with overlap off, the device
idles while the host plans each step.

    python3 benchmarks/bench_engine.py      # results in $OUT/bench_engine.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1].parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from kiln.models.config import ModelConfig  # noqa: E402
from kiln.models.loader import random_params  # noqa: E402
from kiln.models.registry import build_graph  # noqa: E402
from kiln.runtime.batch import StepBatch  # noqa: E402
from kiln.runtime.engine import Engine  # noqa: E402
from kiln.runtime.runner import Runner  # noqa: E402
from kiln.runtime.sampling_params import SamplingParams  # noqa: E402

N_REQ, PROMPT, GEN, SEQS = 64, 128, 128, 64


def run_engine(runner, cfg, overlap):
    eng = Engine(runner, tokenizer=None, eos_token_ids=[], vocab_size=cfg.vocab_size, max_model_len=512,
                 max_num_seqs=SEQS, max_num_tokens=2048, overlap=overlap, enable_prefix_caching=True)
    rng = np.random.default_rng(0)
    for _ in range(N_REQ):
        eng.add_request([int(t) for t in rng.integers(0, cfg.vocab_size, PROMPT)],
                        SamplingParams(max_tokens=GEN, temperature=0.0, ignore_eos=True))
    steps, t0, t_first_decode, decode_steps = 0, time.perf_counter(), None, 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
        if t_first_decode is None and eng.scheduler.scheduled_tokens >= N_REQ * PROMPT + N_REQ:
            t_first_decode, s_first = time.perf_counter(), eng.scheduler.step_count
    total = time.perf_counter() - t0
    decode_steps = eng.scheduler.step_count - s_first
    return dict(overlap=overlap, seconds=total, steps=steps, tokens_per_s=N_REQ * GEN / total,
                decode_steps_per_s=decode_steps / (time.perf_counter() - t_first_decode), stats=eng.stats().__dict__)


def device_only(runner, batch: StepBatch, n=200):
    b = StepBatch(batch.step, batch.inputs, np.full_like(batch.from_prev, -1), batch.sampling, batch.all_greedy,
                  batch.num_logprobs, batch.num_seqs)
    for i in range(10):
        b.step = runner._prev_step + 1
        runner.execute(b)
    runner._prev_tokens.block_until_ready()
    t0 = time.perf_counter()
    for i in range(n):
        runner.execute(b)
    runner._prev_tokens.block_until_ready()
    return n / (time.perf_counter() - t0)


def main():
    out_dir = Path(os.environ.get("OUT", "."))
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=8,
                      num_heads=16, num_kv_heads=8, head_dim=64, max_position_embeddings=4096, dtype="bfloat16")
    graph = build_graph(cfg, "bfloat16")
    params = random_params(graph, 0)
    attention = os.environ.get("KILN_BENCH_ATTENTION", "auto")
    try:
        runner = Runner(graph, params, dtype="bfloat16", block_size=16, max_num_seqs=SEQS, max_num_tokens=2048,
                        max_model_len=512, gpu_memory_utilization=0.5, attention=attention)
        t0 = time.perf_counter()
        runner.warmup()
    except Exception as e:  # an attention choice this tree does not have
        print("falling back to reference attention:", e)
        attention = "reference"
        runner = Runner(graph, params, dtype="bfloat16", block_size=16, max_num_seqs=SEQS, max_num_tokens=2048,
                        max_model_len=512, gpu_memory_utilization=0.5, attention=attention)
        t0 = time.perf_counter()
        runner.warmup()
    warm = time.perf_counter() - t0
    captured = []
    orig = runner.execute

    def spy(batch):
        if batch.num_seqs == SEQS and (batch.inputs["slot_mapping"] >= 0).sum() == SEQS:  # a full decode step
            captured.append(batch)
        return orig(batch)

    runner.execute = spy
    run_engine(runner, cfg, True)  # compiles the remaining buckets
    runner.execute = orig
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "attention": attention,
           "kv_blocks": runner.num_blocks, "warmup_compile_s": warm,
           "runs": [run_engine(runner, cfg, ov) for ov in (True, False, True, False)]}
    res["device_only_decode_steps_per_s"] = device_only(runner, captured[len(captured) // 2])
    (out_dir / "bench_engine.json").write_text(json.dumps(res, indent=1))
    print(f"device {res['device']}  jax {res['jax']}  attention {attention}  KV blocks {runner.num_blocks}")
    print(f"device-only decode step (64 seqs, no host work): {res['device_only_decode_steps_per_s']:.1f} steps/s")
    for r in res["runs"]:
        print(f"overlap={r['overlap']!s:5}  total {r['seconds']:.2f} s  {r['tokens_per_s']:.0f} tok/s  "
              f"decode {r['decode_steps_per_s']:.1f} steps/s  steps {r['steps']}")


if __name__ == "__main__":
    main()
