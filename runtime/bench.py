"""`kiln bench`: throughput, latency and serving benchmarks on one engine.

    throughput  every request submitted at once; the engine batches them in flight
    latency     one request at a time
    serving     Poisson arrivals at --request-rate (several rates: one run each, a curve)

Requests come from synthetic random tokens (`--isl/--osl`, optionally spread by
`--isl-spread/--osl-spread`) or a JSONL file of prompts. Every token's arrival time is
recorded, so the report has TTFT, TPOT and inter-token latency percentiles, beside the HBM
roofline of a decode step at the batch the run reached.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from kiln.errors import ConfigError


@dataclass
class BenchRequest:
    prompt: list[int] | str
    max_tokens: int


@dataclass
class _Timeline:
    arrival: float
    prompt_len: int
    token_times: list[float] = field(default_factory=list)


def synthetic_requests(n: int, isl: int, osl: int, vocab: int, *, isl_spread: float = 0.0, osl_spread: float = 0.0,
                       seed: int = 0) -> list[BenchRequest]:
    """Random-token prompts; lengths uniform in [len * (1 - spread), len * (1 + spread)]."""
    rng = np.random.default_rng(seed)

    def length(mean, spread):
        lo, hi = max(1, int(mean * (1 - spread))), max(1, int(mean * (1 + spread)))
        return int(rng.integers(lo, hi + 1))

    return [BenchRequest(_random_prompt(rng, length(isl, isl_spread), vocab), length(osl, osl_spread))
            for _ in range(n)]


def _random_prompt(rng, n: int, vocab: int) -> list[int]:
    return rng.integers(100, min(vocab, 32000), n).tolist()


def jsonl_requests(path: str, osl: int, limit: int | None = None) -> list[BenchRequest]:
    """One JSON object per line with "prompt" (text or token ids) and optional "max_tokens"."""
    out = []
    try:
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    out.append(BenchRequest(d["prompt"], int(d.get("max_tokens", osl))))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ConfigError(f"{path}:{i}: each line must be a JSON object with a \"prompt\" ({e})") from None
                if limit and len(out) >= limit:
                    break
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such dataset file") from None
    return out


def _pct(xs, q) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


def summarize(lines: list[_Timeline], wall: float) -> dict:
    ttft = [t.token_times[0] - t.arrival for t in lines if t.token_times]
    tpot = [(t.token_times[-1] - t.token_times[0]) / (len(t.token_times) - 1) for t in lines if len(t.token_times) > 1]
    itl = [b - a for t in lines for a, b in zip(t.token_times, t.token_times[1:])]
    out_tokens = sum(len(t.token_times) for t in lines)
    in_tokens = sum(t.prompt_len for t in lines)
    res = {"requests": len(lines), "duration_s": wall, "requests_per_s": len(lines) / wall,
           "output_tokens": out_tokens, "input_tokens": in_tokens,
           "output_tokens_per_s": out_tokens / wall, "total_tokens_per_s": (in_tokens + out_tokens) / wall}
    for name, xs in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl)):
        for q in (50, 90, 99):
            v = _pct(xs, q)
            res[f"{name}_p{q}"] = None if v is None else v * 1e3
    return res


def _prompt_len(llm, r: BenchRequest) -> int:
    return len(llm.encode(r.prompt)) if isinstance(r.prompt, str) else len(r.prompt)


def _record(out, line: _Timeline, now: float):
    for c in out.outputs:
        line.token_times.extend([now] * len(c.token_ids))


def run_throughput(llm, reqs: list[BenchRequest]) -> dict:
    """All requests at once through the engine's step loop."""
    from kiln.runtime.sampling_params import SamplingParams

    eng = llm.engine
    t0 = time.perf_counter()
    lines = {}
    for r in reqs:
        sp = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
        rid = eng.add_request(r.prompt, sp, output_kind="delta")
        lines[rid] = _Timeline(t0, _prompt_len(llm, r))
    done = 0
    max_running = 0
    while done < len(reqs):
        outs = eng.step()
        now = time.perf_counter()
        max_running = max(max_running, eng.stats().running)
        for o in outs:
            _record(o, lines[o.request_id], now)
            done += o.finished
    res = summarize(list(lines.values()), time.perf_counter() - t0)
    res["max_running"] = max_running
    return res


def latency_warmup(llm, reqs: list[BenchRequest], *, seed: int, most: int = 8) -> list[BenchRequest] | None:
    """Warm-up requests for latency mode: per distinct prompt length one fresh random prompt of
    that length (the timed prompts must not hit the prefix cache) with the longest output asked
    for: run alone they take every step shape the timed run will (each prefill bucket, every
    block-table width up to the longest context). None above `most` lengths (warm up as for
    throughput instead)."""
    longest: dict[int, int] = {}
    for r in reqs:
        n = _prompt_len(llm, r)
        longest[n] = max(longest.get(n, 0), r.max_tokens)
    if len(longest) > most:
        return None
    rng = np.random.default_rng(seed)
    return [BenchRequest(_random_prompt(rng, n, llm.config.vocab_size), out) for n, out in
            sorted(longest.items(), key=lambda kv: -(kv[0] + kv[1]))]


def run_latency(llm, reqs: list[BenchRequest]) -> dict:
    """One request at a time."""
    from kiln.runtime.sampling_params import SamplingParams

    eng = llm.engine
    lines, t_all = [], time.perf_counter()
    for r in reqs:
        sp = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        eng.add_request(r.prompt, sp, output_kind="delta")
        line = _Timeline(t0, _prompt_len(llm, r))
        finished = False
        while not finished:
            for o in eng.step():
                _record(o, line, time.perf_counter())
                finished |= o.finished
        lines.append(line)
    res = summarize(lines, time.perf_counter() - t_all)
    res["max_running"] = 1
    return res


def run_serving(llm, reqs: list[BenchRequest], rate: float, seed: int = 0) -> dict:
    """Poisson arrivals at `rate` requests/s (inf: all at once) through the asyncio engine."""
    from kiln.runtime.engine import AsyncEngine
    from kiln.runtime.sampling_params import SamplingParams

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, len(reqs)) if math.isfinite(rate) and rate > 0 else np.zeros(len(reqs))
    engine = AsyncEngine(llm.engine)

    async def one(r: BenchRequest, delay: float, t_start: float) -> _Timeline:
        await asyncio.sleep(max(0.0, t_start + delay - time.perf_counter()))
        line = _Timeline(time.perf_counter(), _prompt_len(llm, r))
        sp = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
        async for o in engine.generate(r.prompt, sp):
            _record(o, line, time.perf_counter())
        return line

    async def main():
        t_start = time.perf_counter()
        lines = await asyncio.gather(*[one(r, d, t_start) for r, d in zip(reqs, np.cumsum(gaps))])
        return list(lines), time.perf_counter() - t_start

    lines, wall = asyncio.run(main())
    res = summarize(lines, wall)
    res["request_rate"] = rate
    return res


def decode_roofline(llm, batch: int, context: int, bandwidth: float) -> dict:
    """Tokens/s a decode step at `batch` sequences of `context` tokens could reach if it only
    streamed its bytes (all weights once + each sequence's K/V) at `bandwidth` bytes/s per
    device, over the devices the model is split across (tensor / pipeline parallel)."""
    import jax

    sharded = getattr(llm, "sharded", None)
    devices = sharded.mesh.size if sharded is not None else 1

    weight_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(llm.params))
    kv_item = np.dtype(llm.runner.kv[0]["k"].dtype).itemsize
    kv_bytes = batch * context * sum(2 * kv.num_kv_heads * kv.head_dim * kv_item for kv in llm.graph.kv_layers)
    step_s = (weight_bytes + kv_bytes) / (bandwidth * devices)
    return {"roofline_batch": batch, "roofline_context": context, "weight_bytes": weight_bytes,
            "kv_bytes_per_step": kv_bytes, "hbm_bandwidth_GBps": bandwidth / 1e9, "devices": devices,
            "roofline_step_ms": step_s * 1e3, "roofline_output_tokens_per_s": batch / step_s}


def measure_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), 1 GiB buffer on an accelerator."""
    import jax
    import jax.numpy as jnp

    n = (1 << 28) if jax.devices()[0].platform != "cpu" else (1 << 22)
    x = jnp.ones(n, jnp.float32)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(10):
        y = f(x)
    y.block_until_ready()
    return 2 * x.nbytes * 10 / (time.perf_counter() - t)


def peak_memory() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def format_table(results: dict) -> str:
    rows = []
    for k, v in results.items():
        if isinstance(v, float):
            v = f"{v:,.2f}"
        elif isinstance(v, int):
            v = f"{v:,}"
        rows.append((k, str(v)))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


def plot_curve(runs: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["output_tokens_per_s"] for r in runs]
    for key, label in (("tpot_ms_p50", "TPOT p50 (ms)"), ("ttft_ms_p50", "TTFT p50 (ms)")):
        ax.plot(xs, [r[key] or 0 for r in runs], marker="o", label=label)
    for r in runs:
        ax.annotate(f"{r.get('request_rate', '')}", (r["output_tokens_per_s"], r["tpot_ms_p50"] or 0), fontsize=7)
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Kiln: latency vs throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@dataclass
class BenchArgs:
    mode: str = "throughput"
    isl: int = 128
    osl: int = 128
    num_requests: int = 256
    isl_spread: float = 0.0
    osl_spread: float = 0.0
    dataset: str | None = None
    request_rate: str = "inf"
    seed: int = 0
    warmup: int = 1


def run(llm, a: BenchArgs, *, log=print) -> dict:
    """Run the benchmark `a` describes on `llm`; returns a JSON-able report."""
    if a.mode not in ("throughput", "latency", "serving"):
        raise ConfigError(f"--mode must be throughput, latency or serving, got {a.mode!r}")
    if a.dataset:
        reqs = jsonl_requests(a.dataset, a.osl, a.num_requests)
    else:
        reqs = synthetic_requests(a.num_requests, a.isl, a.osl, llm.config.vocab_size, isl_spread=a.isl_spread,
                                  osl_spread=a.osl_spread, seed=a.seed)
    too_long = [len(r.prompt) + r.max_tokens for r in reqs if not isinstance(r.prompt, str)
                and len(r.prompt) + r.max_tokens > llm.max_model_len]
    if too_long:
        raise ConfigError(f"{len(too_long)} requests need {max(too_long)} tokens > max_model_len {llm.max_model_len}; "
                          f"pass --max-model-len {max(too_long)}")
    if a.warmup:  # compile the buckets this workload touches before the clock starts
        log("kiln bench: warming up")
        alone = latency_warmup(llm, reqs, seed=a.seed + 2) if a.mode == "latency" else None
        if alone is not None:
            # one request at a time meets only these steps: no batch buckets to compile (each of those
            # autotunes XLA's Triton GEMMs for W8A16 weights: minutes for an fp8 engine)
            run_latency(llm, alone)
        else:
            # other random prompts of the same lengths: the timed prompts must not hit the prefix cache
            warm = reqs if a.dataset else synthetic_requests(len(reqs), a.isl, a.osl, llm.config.vocab_size,
                                                             isl_spread=a.isl_spread, osl_spread=a.osl_spread,
                                                             seed=a.seed + 1)
            run_throughput(llm, warm[: min(len(warm), llm.runner.max_num_seqs)])
            run_latency(llm, warm[:1])
            n = llm.runner.precompile_seen()  # the token buckets the warm-up missed (ramp-up/down of the timed run)
            if n:
                log(f"kiln bench: compiled {n} more token buckets")
    log(f"kiln bench: {a.mode}, {len(reqs)} requests")
    report = {"mode": a.mode, "config": asdict(a)}
    before = llm.engine.time_split()
    if a.mode == "throughput":
        report["results"] = run_throughput(llm, reqs)
    elif a.mode == "latency":
        report["results"] = run_latency(llm, reqs)
    else:
        rates = [float(x) for x in str(a.request_rate).split(",")]
        report["curve"] = [run_serving(llm, reqs, r, a.seed) for r in rates]
        report["results"] = report["curve"][-1]
    after = llm.engine.time_split()  # the timed run only: host work vs waiting on the device
    t = report["engine_time"] = {k: after[k] - before[k] for k in ("steps", "step_s", "device_wait_s", "host_s")}
    t["host_ms_per_step"] = t["host_s"] / max(t["steps"], 1) * 1e3
    t["device_wait_ms_per_step"] = t["device_wait_s"] / max(t["steps"], 1) * 1e3
    res = report["results"]
    bw = measure_bandwidth()
    batch = max(1, res.get("max_running", 1) if a.mode != "latency" else 1)
    report["roofline"] = decode_roofline(llm, batch, a.isl + a.osl // 2, bw)
    report["kv_blocks"] = llm.runner.num_blocks
    report["peak_device_memory_bytes"] = peak_memory()
    import jax

    report["device"] = jax.devices()[0].device_kind
    return report
