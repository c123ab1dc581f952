"""Build-time autotune of the weight-only quantized matmuls: for each distinct qlinear shape of
the graph and each token count the engine compiles, time XLA's convert-in-dot against the
dequantizing kernel (runtime/kernels/quant_matmul.py) under a few tile configs, and keep the
fastest. The table is saved in the engine directory as `autotune.json` and set process-wide
(`quant_matmul.set_tuned_table`) before any step is traced.

    graph ─► qlinear shapes (mode, K, N, group, layout) × token counts M (<= MAX_M)
          ─► per key: time "xla", then the kernel with TUNED's config and its neighbours
          ─► {key: (impl, config)}  ─► autotune.json   (keys not timed keep the static rule)

On a CPU the kernel is never a candidate (only XLA), so the table says "xla" everywhere and
nothing is timed; tests force the candidates (`kernel_impl="interpret"`, an injected `timer`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

from kiln.runtime.engine_dir import EngineError

FILE = "autotune.json"
VERSION = 1
MAX_M = 256  # the small-M range the kernel serves (AUTO_MAX_M's largest); larger M stays XLA


@dataclasses.dataclass(frozen=True)
class MatmulShape:
    mode: str                # "int8_wo" | "int4_wo" | "fp8" (weight-only below the W8A8 token count)
    k: int
    n: int
    group: int | None
    layout: str              # "kn" | "nk"
    max_m: int = MAX_M       # fp8: below its W8A8 token count only (at and above, one FP8 GEMM)


def qlinear_shapes(graph) -> list[MatmulShape]:
    """The distinct weight-only shapes of the graph's qlinear nodes that reach `quant_matmul`
    (fp8 [K, N] or out-major [N, K], below its W8A8 token count)."""
    out = []
    for node in graph.nodes:
        a = node.attrs
        if node.op != "qlinear":
            continue
        w = graph.type_of(node.inputs[1])
        max_m = MAX_M
        if a["mode"] == "fp8":
            from kiln.passes.ops import FP8_W8A8_MIN_TOKENS

            t = a.get("w8a8_min_tokens")
            max_m = min(MAX_M, (FP8_W8A8_MIN_TOKENS if t is None else t) - 1)
        nk = a.get("w_layout", "kn") == "nk"
        s = MatmulShape(a["mode"], int(a["in_features"]), math.prod(int(d) for d in (w.shape[:-1] if nk else w.shape[1:])),
                        a.get("group_size") if a["mode"] == "int4_wo" else None, a.get("w_layout", "kn"), max_m)
        if s not in out:
            out.append(s)
    return out


def _fp8_w8a8(s: MatmulShape, m: int) -> bool:
    """fp8 matmuls of m tokens that run W8A8 on the skinny kernel (no weight-only path to tune)."""
    from kiln.runtime.kernels import fp8_skinny_mgpu

    return s.mode == "fp8" and fp8_skinny_mgpu.resolve("auto", m) != "xla"


def _key(s: MatmulShape, m: int, dtype: str) -> tuple:
    return (s.mode, s.k, s.n, s.group, s.layout, m, dtype)


def candidates(s: MatmulShape, m: int, dtype: str = "bfloat16"):
    """TUNED's config for (shape, M) first, then neighbours (block_n, block_k halved / doubled,
    the other warp count, no split-K), deduplicated; configs that do not tile are dropped."""
    from kiln.runtime.kernels.quant_matmul import choose_config

    def cfg(**o):
        try:
            return choose_config(m, s.k, s.n, s.mode, s.group, w_layout=s.layout, **o)
        except (KeyError, ValueError, ZeroDivisionError):
            return None

    base = cfg()
    if base is None:
        return []
    found = [base]
    for o in (dict(block_n=base.block_n * 2), dict(block_n=base.block_n // 2), dict(block_k=base.block_k * 2),
              dict(block_k=base.block_k // 2), dict(num_warps=12 - base.num_warps), dict(splits=1)):
        c = cfg(**{**{k: v for k, v in dataclasses.asdict(base).items() if k not in ("block_m", "splits")}, **o})
        if c is not None and c not in found:
            found.append(c)
    return found


def _inputs(s: MatmulShape, m: int, dtype: str, seed: int = 0):
    """Random x [M, K] and quantized weights of the real shapes."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, s.k)), dtype)
    scale = jnp.asarray(rng.uniform(0.001, 0.01, s.n if s.mode != "int4_wo" else (s.k // s.group, s.n)), jnp.float32)
    if s.mode == "int4_wo":
        w = jnp.asarray(rng.integers(0, 256, (s.k // 2, s.n)), jnp.uint8)
        return x, w, scale.astype(jnp.float16), (-8 * scale).astype(jnp.float16)
    shape = (s.n, s.k) if s.layout == "nk" else (s.k, s.n)
    if s.mode == "fp8":
        return x, jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(jnp.float8_e4m3fn), scale, None
    return x, jnp.asarray(rng.integers(-127, 128, shape), jnp.int8), scale, None


def time_call(fn, args, *, repeats: int = 3, calls: int = 10, **candidate) -> float:
    """Seconds per call of jit(fn)(*args): compiled and run once first, then the best of
    `repeats` rounds of `calls` back-to-back calls (queued asynchronously, so the dispatch
    overlaps the previous call and a short kernel is not timed as its launch)."""
    import jax

    f = jax.jit(fn)
    jax.block_until_ready(f(*args))
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def default_kernel_impl(dtype: str) -> str | None:
    """The kernel is a candidate on a GPU for 16-bit activations only (as the static rule)."""
    import jax

    return "pallas" if jax.default_backend() == "gpu" and dtype in ("bfloat16", "float16") else None


def autotune(graph, dtype: str, token_counts, *, budget_s: float = 20.0, kernel_impl: str | None = ...,
             timer: Callable | None = None, log=lambda msg: None) -> dict:
    """{(mode, K, N, group, layout, M, dtype): {"impl", "config", "us"}} for every qlinear shape
    and M in `token_counts` (those above MAX_M skipped). `kernel_impl`: "pallas" / "interpret" to
    time the kernel, None for XLA only (default: `default_kernel_impl`). `timer(fn, args, impl=,
    config=) -> seconds` (default `time_call`). Once `budget_s` is spent, the keys left are not in the table."""
    from kiln.runtime.kernels.quant_matmul import quant_matmul

    import jax.numpy as jnp

    dtype = jnp.dtype(dtype).name
    if kernel_impl is ...:
        kernel_impl = default_kernel_impl(dtype)
    timer = timer or time_call
    t0 = time.perf_counter()
    ms = sorted({int(m) for m in token_counts if 0 < int(m) <= MAX_M})
    table = {}
    for m in ms:                       # the smallest (decode) buckets first: they matter most
        for s in (s for s in qlinear_shapes(graph) if m <= s.max_m and not _fp8_w8a8(s, m)):
            cands = [("xla", None)] + [(kernel_impl, c) for c in (candidates(s, m, dtype) if kernel_impl else [])]
            if len(cands) == 1:  # nothing to choose: no timing
                table[_key(s, m, dtype)] = {"impl": "xla", "config": None, "us": {}}
                continue
            if time.perf_counter() - t0 > budget_s:
                log(f"[autotune] budget of {budget_s:.0f} s spent; the shapes left keep the static rule")
                return table
            x, w, scale, mn = _inputs(s, m, dtype)
            times = {}
            for impl, c in cands:
                if c is not None and time.perf_counter() - t0 > budget_s:
                    break  # out of time inside a key: the best of what was timed
                fn = (lambda x, w, scale, mn, impl=impl, c=c: quant_matmul(
                    x, w, scale, mn, mode=s.mode, group_size=s.group, impl=impl, config=c, w_layout=s.layout))
                try:
                    times[(impl, c)] = timer(fn, (x, w, scale, mn), impl=impl, config=c)
                except Exception as e:  # a config the compiler refuses (shared memory, registers)
                    if c is None:
                        raise
                    why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                    log(f"[autotune] {_label(impl, c)} failed: {why}")
                    times[(impl, c)] = math.inf
            (impl, c), best = min(times.items(), key=lambda kv: kv[1])
            table[_key(s, m, dtype)] = {"impl": impl, "config": dataclasses.asdict(c) if c else None,
                                        "us": {_label(i, cc): round(t * 1e6, 2) if t < math.inf else None
                                               for (i, cc), t in times.items()}}
            log(f"[autotune] {s.mode} [{m}, {s.k}] x [{s.k}, {s.n}]: {_label(impl, c)} "
                f"{best * 1e6:.1f} us (xla {times[('xla', None)] * 1e6:.1f} us)")
    return table


def _label(impl: str, c) -> str:
    if c is None:
        return impl
    return (f"{impl}:m{c.block_m}n{c.block_n}k{c.block_k}s{c.splits}w{c.num_warps}st{c.num_stages}"
            f"{'g' * c.gemv}{'p' * c.post_scale}{'x' * c.magic}")


# --------------------------------------------------------------------------- the file


def save(table: dict, engine_dir: str | Path, *, device_kind: str, budget_s: float) -> Path:
    """Write `table` (from `autotune`) to ENGINE_DIR/autotune.json."""
    entries = [dict(zip(("mode", "k", "n", "group", "layout", "m", "dtype"), key), **v) for key, v in table.items()]
    path = Path(engine_dir) / FILE
    path.write_text(json.dumps({"version": VERSION, "device_kind": device_kind, "budget_s": budget_s,
                                "entries": entries}, indent=1))
    return path


def load(engine_dir: str | Path, manifest: dict) -> dict:
    """ENGINE_DIR/autotune.json, checked against engine.json's sha256, as `set_tuned_table`
    takes it; EngineError naming the rebuild command when it is missing, changed or unreadable."""
    from kiln.runtime.engine_dir import check_file
    from kiln.runtime.kernels.quant_matmul import IMPLS, QMatmulConfig

    path = check_file(engine_dir, manifest, FILE)
    rebuild = manifest.get("build_command") or "kiln build CHECKPOINT -o " + str(engine_dir)
    try:
        d = json.loads(path.read_text())
        if d.get("version") != VERSION:
            raise ValueError(f"version {d.get('version')!r}, not {VERSION}")
        table = {}
        for e in d["entries"]:
            if e["impl"] not in IMPLS or e["impl"] == "auto":
                raise ValueError(f"impl {e['impl']!r}")
            key = (e["mode"], int(e["k"]), int(e["n"]), e["group"], e["layout"], int(e["m"]), e["dtype"])
            table[key] = (e["impl"], QMatmulConfig(**e["config"]) if e["config"] else None)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise EngineError(f"{path}: unreadable autotune table ({msg}); rebuild with: {rebuild}") from None
    return table


def as_table(table: dict) -> dict:
    """`autotune`'s result in `set_tuned_table`'s form."""
    from kiln.runtime.kernels.quant_matmul import QMatmulConfig

    return {k: (v["impl"], QMatmulConfig(**v["config"]) if v["config"] else None) for k, v in table.items()}
