"""A/B of engine-step variants in one process, on realistic step shapes: device time per step.

    python3 benchmarks/ab_step.py --quant fp8 --kv-cache-dtype fp8 \
        --variant base: --variant norms+rows:KILN_ACT_QUANT_KINDS=swiglu_scaled,add_rms_norm_scaled,rows

An end-to-end A/B of two trees costs an engine each (load, then ~5 minutes of compiling and
autotuning nine token buckets for the fp8 8B shape) and compares across processes. Here one
engine is loaded once; each variant sets its environment variables (read when a step is
traced: KILN_ACT_QUANT_KINDS, KILN_ATTENTION, KILN_KV_WRITE, KILN_FP8_SKINNY, ...), gets a fresh
lowering and fresh jitted steps (`fresh_steps`), and times the same batches:

  mixed    a 4096-token step as the throughput workload's ramp takes it: 256 sequences
           decoding (contexts 129-256) beside 30 prompts of 128 tokens being prefilled
  decode   512 sequences decoding, contexts 129-256 (the workload's steady state)
  (--shapes picks; --seqs / --isl / --tokens change them)

Each shape runs `--iters` back-to-back steps after 2 warm-ups (dispatch overlapped as in the
engine, one read at the end): milliseconds per step. Variants alternate for `--rounds` rounds
(A B A B), so drift between them shows. XLA's autotuning results stay in the process, so a
variant after the first compiles quickly where its GEMMs are the same. Writes ab_step.json under $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

OUT = os.environ.get("OUT", ".")


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:K=V,K2=V2' -> (name, env); commas inside a value are kept (K=a,b,c)."""
    name, _, rest = text.partition(":")
    env, key = {}, None
    for part in rest.split(",") if rest else []:
        if "=" in part and part.split("=", 1)[0].isupper():
            key, val = part.split("=", 1)
            env[key] = val
        elif key is not None:
            env[key] += "," + part
    return name, env


def make_batches(runner, shapes, seqs: int, isl: int, tokens: int):
    """Greedy StepBatches with real slot mappings over distinct blocks (the pool gets written)."""
    from kiln.runtime.batch import SeqChunk, StepBatch, bucket, prepare_inputs, token_bucket
    from kiln.runtime.runner import _dummy_sampling

    bs = runner.block_size
    rng = np.random.default_rng(0)
    next_block = [0]

    def table(n_tokens):
        n = -(-n_tokens // bs)
        t = list(range(next_block[0], next_block[0] + n))
        next_block[0] += n
        if next_block[0] > runner.num_blocks:
            raise SystemExit(f"the batches need {next_block[0]} KV blocks; raise --num-kv-blocks")
        return t

    out = {}
    for shape in shapes:
        next_block[0] = 0
        if shape == "decode":
            ctx = rng.integers(isl + 1, 2 * isl + 1, seqs)
            chunks = [SeqChunk([int(rng.integers(100, 30000))], int(c) - 1, table(int(c))) for c in ctx]
        elif shape == "mixed":
            n_dec = seqs // 2                          # half the sequences decoding, prompts fill the rest
            n_pre = max(1, (tokens - n_dec) // isl)
            ctx = rng.integers(isl + 1, 2 * isl + 1, n_dec)
            chunks = [SeqChunk(rng.integers(100, 30000, isl).tolist(), 0, table(isl)) for _ in range(n_pre)]
            chunks += [SeqChunk([int(rng.integers(100, 30000))], int(c) - 1, table(int(c))) for c in ctx]
        else:
            raise SystemExit(f"unknown shape {shape!r}: mixed or decode")
        n_tok = sum(len(c.token_ids) for c in chunks)
        T, S = token_bucket(n_tok), min(token_bucket(len(chunks)), runner.max_num_seqs)
        B = min(runner.max_blocks, bucket(max(len(c.block_table) for c in chunks), 16))
        inputs, _ = prepare_inputs(chunks, bs, pad_tokens=T, pad_seqs=S, pad_blocks=B, pad_logits=S)
        out[shape] = (StepBatch(-10, inputs, np.full(T, -1, np.int32), _dummy_sampling(S), True, 0, len(chunks)),
                      dict(tokens=n_tok, padded=T, seqs=len(chunks), blocks_per_seq=B))
    return out


def time_batch(runner, batch, iters: int) -> float:
    for _ in range(2):
        runner.read(runner.execute(batch))
    t = time.perf_counter()
    for _ in range(iters):
        h = runner.execute(batch)
    runner.read(h)
    return (time.perf_counter() - t) / iters * 1e3


def set_env(env: dict, base_env: dict) -> None:
    """Each variant from the same starting environment, then its own variables."""
    for k, v in base_env.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    os.environ.update(env)


def fresh_steps(runner) -> None:
    """New jitted steps over a new lowering of the graph: the attention nodes' nested jits (shared
    by the layers, graph/lower.py) keep their traces, so a variable read inside attention
    (KILN_ATTENTION, KILN_KV_WRITE) takes effect only in a new lowering."""
    from kiln.graph.lower import lower

    runner._step = lower(runner.graph, attention="auto")
    runner.set_compiler_options(runner.compiler_options, runner.small_step_options)
    runner._compiled.clear()


def profile_variant(runner, batches, env: dict, base_env: dict) -> dict:
    """A profiler trace of 3 steps of each shape, summarised per kernel kind (probe_step_profile's reader)."""
    import tempfile

    import jax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from probe_step_profile import hlo_categories, hlo_sources, trace_summary

    set_env(env, base_env)
    fresh_steps(runner)
    out = {}
    for shape, (b, _) in batches.items():
        for _ in range(2):
            runner.read(runner.execute(b))
        text = runner._executables[b.shape_key].as_text()
        d = tempfile.mkdtemp()
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(3):
            h = runner.execute(b)
        runner.read(h)
        jax.profiler.stop_trace()
        tr = trace_summary(d, hlo_sources(text), 3, cats=hlo_categories(text))
        out[shape] = tr
        print(f"  {shape}: kernels {tr.get('kernel_us_per_step', 0):.0f} us/step, "
              f"span {tr.get('span_us_per_step', 0):.0f}", flush=True)
        for k, v in tr.get("by_kind_us_per_step", [])[:30]:
            print(f"    {v:9.1f} us  {k}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--quant", default=None)
    ap.add_argument("--kv-cache-dtype", default=None)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:ENV=VALUE,...",
                    help="a variant: its name, then environment variables (repeatable; at least two)")
    ap.add_argument("--shapes", default="mixed,decode")
    ap.add_argument("--seqs", type=int, default=512)
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-kv-blocks", type=int, default=12000)
    ap.add_argument("--profile", nargs="?", const="all", default="", metavar="NAMES",
                    help="after the rounds, a profiler trace of the named variants' steps (comma list; "
                         "all without names) summarised per kernel kind "
                         "(run with XLA_FLAGS=--xla_gpu_enable_command_buffer= for a per-kernel split)")
    a = ap.parse_args()
    variants = [parse_variant(v) for v in a.variant] or [("base", {})]

    from kiln import LLM

    t0 = time.time()
    llm = LLM(f"random:{a.preset}", dtype="bfloat16", quantization=a.quant, kv_cache_dtype=a.kv_cache_dtype,
              max_num_seqs=a.seqs, max_num_tokens=a.tokens, max_model_len=2304, num_kv_blocks=a.num_kv_blocks)
    runner = llm.runner
    batches = make_batches(runner, a.shapes.split(","), a.seqs, a.isl, a.tokens)
    res = {"load_s": time.time() - t0, "shapes": {k: v[1] for k, v in batches.items()},
           "variants": {n: e for n, e in variants}, "ms_per_step": {n: {s: [] for s in batches} for n, _ in variants},
           "compile_s": {n: [] for n, _ in variants}}
    base_env = {k: os.environ.get(k) for _, e in variants for k in e}
    for r in range(a.rounds):
        for name, env in variants:
            set_env(env, base_env)
            fresh_steps(runner)
            t = time.time()
            for shape, (b, _) in batches.items():
                runner.read(runner.execute(b))  # compile
            res["compile_s"][name].append(round(time.time() - t, 1))
            for shape, (b, _) in batches.items():
                ms = time_batch(runner, b, a.iters)
                res["ms_per_step"][name][shape].append(round(ms, 3))
            print(f"round {r} {name}: " + ", ".join(f"{s} {res['ms_per_step'][name][s][-1]:.2f} ms"
                                                   for s in batches) + f" (compiled in {res['compile_s'][name][-1]} s)",
                  flush=True)
    if a.profile:
        names = [n for n, _ in variants] if a.profile == "all" else a.profile.split(",")
        res["profile"] = {}
        for name, env in variants:
            if name in names:
                print(f"profile {name}:", flush=True)
                res["profile"][name] = profile_variant(runner, batches, env, base_env)
    first = variants[0][0]
    res["median_ms"] = {n: {s: statistics.median(v) for s, v in d.items()} for n, d in res["ms_per_step"].items()}
    res["vs_first"] = {n: {s: round(res["median_ms"][n][s] / res["median_ms"][first][s], 4) for s in batches}
                       for n, _ in variants}
    print(json.dumps({"shapes": res["shapes"], "median_ms": res["median_ms"], "vs_first": res["vs_first"]}, indent=1))
    with open(os.path.join(OUT, "ab_step.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
