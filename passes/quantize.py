"""Quantization: rewrite the weights, swap the op (`linear` -> `qlinear`).

    mode      weight stored as                     scale                       activations
    fp8       f8e4m3 [in, *out]                    f32 [*out]   per channel    f8e4m3, dynamic per token
    int8_wo   i8     [in, *out]                    f32 [*out]   per channel    as they are
    int4_wo   u8     [in / 2, *out] (2 per byte)   f16 scale and min [in / g, *out],  as they are
                                                   g: int4_group_size, default the 4-bit grid the
                                                   weight already lies on, else 128 (int4_groups)

Scales carry the logical axes of their weight's output dims (int4's group dim carries the
weight's input axis), so the sharding rules split them with their weights. Weights under
`quantize_exclude` (default: the lm_head and MoE routers, whose top-k choice a rounded
logit can flip, as vLLM and TensorRT-LLM keep them) stay in float.

AWQ (int8_wo / int4_wo with `calibration` prompts): per input channel, the weight is scaled
up by s = mean|x|^alpha before rounding and the input is scaled down by 1/s (a `smooth`
vector multiplied into x, which XLA fuses into the producer); alpha is searched per matmul
on the calibration activations to minimise the output error.

FP8 KV cache (`kv_cache_dtype="fp8"`): the pools are f8e4m3 and each layer's cache entry
carries scalar `k_scale` / `v_scale` (stored = value / scale); the `kv_cache_*` pass only
marks `graph.meta["kv_cache_dtype"]`, which runtime/kv_cache.py's allocator honours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kiln.errors import ConfigError
from kiln.graph.ir import Graph
from kiln.passes.ops import FP8_MAX, QUANT_MODES
from kiln.passes.rewrite import Any_, Match, Param_, Pat, RewriteResult, Rewriter, Rule, apply_rules, array_module

INT4_GROUP = 128
AWQ_ALPHAS = tuple(i / 10 for i in range(11))


def _dtype(xp, name: str):
    if xp is np:
        import ml_dtypes

        return getattr(ml_dtypes, name) if name.startswith("float8") else np.dtype(name)
    return xp.dtype(name)


# --------------------------------------------------------------------------- weight codecs (numpy or jax)


def quantize_fp8(w):
    """w [in, *out] -> (f8e4m3 [in, *out], f32 scale [*out]); w ~= q * scale."""
    xp = array_module(w)
    wf = w.astype(xp.float32)
    scale = xp.maximum(xp.max(xp.abs(wf), axis=0), 1e-12) / FP8_MAX
    q = xp.clip(wf / scale, -FP8_MAX, FP8_MAX).astype(_dtype(xp, "float8_e4m3fn"))
    return q, scale.astype(xp.float32)


def quantize_int8(w):
    """w [in, *out] -> (i8 [in, *out], f32 scale [*out]); symmetric, per output channel."""
    xp = array_module(w)
    wf = w.astype(xp.float32)
    scale = xp.maximum(xp.max(xp.abs(wf), axis=0), 1e-12) / 127.0
    q = xp.clip(xp.round(wf / scale), -127, 127).astype(xp.int8)
    return q, scale.astype(xp.float32)


def int4_group(n_in: int, group: int | None = None) -> int | None:
    """`group` (default INT4_GROUP), or the largest power of two below it that divides `n_in`
    (None if `n_in` is odd)."""
    g = group or INT4_GROUP
    while g >= 2 and n_in % g:
        g //= 2
    return g if g >= 2 else None


SOURCE_GROUPS = (128, 64, 32)   # 4-bit block sizes of GGUF (Q4_0, Q4_1, Q4_K: 32), GPTQ / AWQ exports
_GRID_COLUMNS = 64              # output channels sampled by the check


def source_int4_group(w) -> int | None:
    """The group size g of the 4-bit grid a weight [in, *out] already lies on, if it does: the
    largest g of SOURCE_GROUPS dividing `in` for which every g-run of input rows holds at most
    16 distinct values per output channel (a checkpoint stored 4-bit, e.g. GGUF Q4_1, comes out
    of the loader dequantized, on such a grid). Checked on a sample of output channels; None
    for a float weight, or one whose values are not at hand (shapes only, under tracing)."""
    try:
        w2 = np.asarray(w.reshape(w.shape[0], -1)[:, :_GRID_COLUMNS], np.float32)
    except Exception:   # an abstract array (jax.eval_shape): no values to look at
        return None
    if not np.isfinite(w2).all() or np.ptp(w2) == 0:
        return None
    for g in SOURCE_GROUPS:
        if w2.shape[0] % g == 0:
            runs = np.sort(w2.reshape(-1, g, w2.shape[1]), axis=1)                 # [in / g, g, cols]
            distinct = 1 + (np.diff(runs, axis=1) != 0).sum(axis=1)
            if distinct.max() <= 16:
                return g
    return None


def int4_groups(graph: Graph, params: dict | None, group: int | None = None, exclude=("lm_head", "router")) -> dict:
    """The int4 group of every quantizable weight: `group` when given (halved until it divides
    the input dim); by default the group of the 4-bit grid the weight already lies on
    (re-rounding a 4-bit checkpoint onto another grid loses what no calibration recovers:
    SmolLM2's Q4_1 g32 weights at g64 cost +16% to +32% perplexity whatever the method, at g32
    nothing; BENCHMARKS.md), else INT4_GROUP halved until it divides the input dim (576: 64)."""
    out = {}
    for _, w in _targets(graph, exclude):
        src = source_int4_group(params[w]) if group is None and params is not None and w in params else None
        out[w] = src or int4_group(graph.params[w].type.shape[0], group)
    return out


def quantize_int4(w, group: int):
    """w [in, *out] -> (u8 [in / 2, *out], f16 scale [in / group, *out], f16 min [in / group, *out]);
    asymmetric per group: w ~= q * scale + min with q in [0, 15] (the group's min and max both
    representable), rows 2i / 2i + 1 in the low / high nibble."""
    xp = array_module(w)
    n_in, out = w.shape[0], w.shape[1:]
    wf = w.astype(xp.float32).reshape((n_in // group, group) + out)
    lo, hi = xp.min(wf, axis=1), xp.max(wf, axis=1)                              # [in / g, *out]
    # the stored (f16) scale and min are the ones the codes are computed against
    scale = (xp.maximum(hi - lo, 1e-8) / 15.0).astype(xp.float16).astype(xp.float32)
    return encode_int4(w, scale, lo.astype(xp.float16).astype(xp.float32), group)


def encode_int4(w, scale, lo, group: int):
    """The packed codes of w [in, *out] against given per-group `scale` and `lo` (min)
    [in / group, *out]: (u8 [in / 2, *out], f16 scale, f16 min)."""
    xp = array_module(w)
    n_in, out = w.shape[0], w.shape[1:]
    wf = w.astype(xp.float32).reshape((n_in // group, group) + out)
    q = xp.clip(xp.round((wf - lo[:, None]) / scale[:, None]), 0, 15).astype(xp.int32)
    q = q.reshape((n_in // 2, 2) + out)
    packed = (q[:, 0] | (q[:, 1] << 4)).astype(xp.uint8)
    return packed, scale.astype(xp.float16), lo.astype(xp.float16)


def dequantize(mode: str, q, scale, minimum=None, group: int | None = None) -> np.ndarray:
    """The float weight [in, *out] a quantized one stands for (host numpy; for tests and AWQ):
    `dequantize(mode, *quantize_weight(mode, w, group), group=group)`."""
    q, scale = np.asarray(q), np.asarray(scale, np.float32)
    if mode in ("fp8", "int8_wo"):
        return q.astype(np.float32) * scale
    lo = (q & 0xF).astype(np.float32)
    hi = (q >> 4).astype(np.float32)
    w = np.stack([lo, hi], axis=1).reshape((2 * q.shape[0],) + q.shape[1:])
    w = w.reshape((w.shape[0] // group, group) + w.shape[1:]) * scale[:, None] + np.asarray(minimum, np.float32)[:, None]
    return w.reshape((2 * q.shape[0],) + q.shape[1:])


def quantize_weight(mode: str, w, group: int | None = None):
    """(q, scale) for fp8 / int8_wo, (q, scale, min) for int4_wo."""
    if mode == "fp8":
        return quantize_fp8(w)
    if mode == "int8_wo":
        return quantize_int8(w)
    return quantize_int4(w, group)


# --------------------------------------------------------------------------- AWQ


def awq_search(mode: str, w: np.ndarray, x: np.ndarray, group: int | None = None):
    """The per-input-channel scale s (or None for alpha = 0) minimising |x W - x Q(W s)/s|^2
    over the calibration rows x [n, in]; w is [in, *out]."""
    w2 = np.asarray(w, np.float32).reshape(w.shape[0], -1)
    x = np.asarray(x, np.float32)
    ref = x @ w2
    mean_abs = np.maximum(np.abs(x).mean(axis=0), 1e-6)
    best, best_err = None, None
    for alpha in AWQ_ALPHAS:
        s = mean_abs ** alpha
        s = s / np.sqrt(s.max() * s.min())
        parts = quantize_weight(mode, w2 * s[:, None], group)
        err = float(np.square((x / s) @ dequantize(mode, *parts, group=group) - ref).sum())
        if best_err is None or err < best_err:
            best, best_err = (None if alpha == 0 else s), err
    return best


def collect_activations(graph: Graph, params: dict, prompts, names: list[str], *, block_size: int = 16,
                        max_rows: int = 512) -> dict[str, np.ndarray]:
    """Run the prompts through `graph` in one ragged step and return the values `names`
    take on the real tokens (host fp32, at most `max_rows` rows each)."""
    import jax
    import jax.numpy as jnp

    from kiln.graph.lower import lower
    from kiln.runtime.batch import SeqChunk, prepare_inputs

    g = graph.copy()
    g.outputs = list(names)
    chunks, nb = [], 0
    for p in prompts:
        n = -(-len(p) // block_size)
        chunks.append(SeqChunk(list(p), 0, list(range(nb, nb + n))))
        nb += n
    inputs, _ = prepare_inputs(chunks, block_size, pad_blocks=max(len(c.block_table) for c in chunks))
    kv = [{"k": jnp.zeros((l.num_kv_heads, nb, block_size, l.head_dim), jnp.float32),
           "v": jnp.zeros((l.num_kv_heads, nb, block_size, l.head_dim), jnp.float32)} for l in graph.kv_layers]
    vals, _ = jax.jit(lower(g))(params, kv, inputs)
    vals = vals if isinstance(vals, tuple) else (vals,)
    n_tok = sum(len(p) for p in prompts)
    rows = np.random.default_rng(0).permutation(n_tok)[:max_rows]
    return {n: np.asarray(v, np.float32).reshape(v.shape[0], -1)[:n_tok][rows] for n, v in zip(names, vals)}


# --------------------------------------------------------------------------- the pass


def _quantizable(exclude):
    return lambda p: p.type.rank >= 2 and p.type.dtype in ("float32", "bfloat16", "float16") and \
        not any(p.name.startswith(e) or f".{e}." in f".{p.name}" for e in exclude)


def _base(w: str) -> str:
    return w[:-2] if w.endswith(".w") else w


def weight_mode(mode: str, name: str, keep_int8=()) -> str:
    """The mode one weight gets: int4_wo weights named by a `keep_int8` substring are int8_wo
    (mixed precision, as llama.cpp's Q4_K_M keeps its most sensitive projections wider)."""
    return "int8_wo" if mode == "int4_wo" and any(k in name for k in keep_int8) else mode


def _rewrite(mode: str, smooth: dict, group_size: int | None, keep_int8, codes: dict, groups: dict):
    def rewrite(rw: Rewriter, m: Match):
        wt = rw.type_of(m.w)
        n_in, out = wt.shape[0], wt.shape[1:]
        wmode = weight_mode(mode, m.w, keep_int8)
        group = (groups.get(m.w) or int4_group(n_in, group_size)) if wmode == "int4_wo" else None
        if wmode == "int4_wo" and group is None:
            return False
        s = smooth.get(m.w)
        in_axis, out_axes = wt.axes[0], wt.axes[1:]
        if wmode == "int4_wo":
            scale_shape, scale_axes, scale_dtype = (n_in // group,) + out, (in_axis,) + out_axes, "float16"
            rw.retype_param(m.w, (n_in // 2,) + out, "uint8", init="zeros")
        else:
            scale_shape, scale_axes, scale_dtype = out, out_axes, "float32"
            rw.retype_param(m.w, wt.shape, "float8_e4m3fn" if wmode == "fp8" else "int8", init="zeros")
        codec = [rw.param(_base(m.w) + ".scale", scale_shape, scale_dtype, scale_axes, init="ones")]
        if wmode == "int4_wo":
            codec.append(rw.param(_base(m.w) + ".min", scale_shape, scale_dtype, scale_axes, init="zeros"))
        extra = [m.get("b")] if m.get("b") is not None else []
        if s is not None:
            extra.append(rw.param(_base(m.w) + ".smooth", (n_in,), wt.dtype, (in_axis,), init="ones"))

            def fn(w, s=s, parts=codes.get(m.w)):
                xp = array_module(w)
                if parts is None:
                    parts = quantize_weight(wmode, w * xp.asarray(s, w.dtype).reshape((-1,) + (1,) * (w.ndim - 1)), group)
                return (*parts, xp.asarray(1.0 / s, w.dtype))
            rw.weights([m.w, *codec, extra[-1]], [m.w], fn)
        else:
            parts = codes.get(m.w)
            rw.weights([m.w, *codec], [m.w], (lambda w: parts) if parts is not None else
                       (lambda w: quantize_weight(wmode, w, group)))
        attrs = dict(mode=wmode, in_features=n_in, bias=m.get("b") is not None, smooth=s is not None)
        if group:
            attrs["group_size"] = group
        lin = m.node("lin")
        rw.replace(lin.name, rw.node("qlinear", m.x, m.w, *codec, *extra, name=lin.name + ".q", **attrs))
    return rewrite


def quantize_rules(mode: str, exclude=("lm_head", "router"), smooth: dict | None = None, group_size: int | None = None,
                   keep_int8=(), codes: dict | None = None, groups: dict | None = None) -> list[Rule]:
    return [
        # linear(x, w[in, *out]) -> qlinear(x, w_q, scale[, min]){mode}   (w_q f8e4m3 | i8 | u8-packed int4)
        Rule(f"quantize_{mode}", Pat("linear", Any_("x"), Param_("w", where=_quantizable(exclude)),
                                     Param_("b", optional=True), name="lin"),
             _rewrite(mode, smooth or {}, group_size, tuple(keep_int8), codes or {}, groups or {})),
    ]


QUANT_METHODS = ("rtn", "awq", "gptq", "awq+gptq")
CALIBRATION_TEXT = Path(__file__).parent / "calibration.txt"   # benchmarks/make_calibration_text.py


def calibration_prompts(tokenizer, text: str | None = None, *, length: int = 512, max_prompts: int = 8) -> list[list[int]]:
    """Token-id calibration prompts: `text` (default: the shipped CALIBRATION_TEXT, samples
    of the default model, no evaluation text) cut into `length`-token pieces."""
    text = CALIBRATION_TEXT.read_text(encoding="utf-8") if text is None else text
    ids = list(tokenizer.encode(text))
    return [ids[i:i + length] for i in range(0, len(ids), length)][:max_prompts]



def default_method(mode: str, calibration) -> str:
    """Round to nearest without calibration prompts; with them, GPTQ (every mode)."""
    return "gptq" if calibration else "rtn"


def _targets(graph: Graph, exclude):
    ok = _quantizable(exclude)
    return [(n.inputs[0], n.inputs[1]) for n in graph.nodes
            if n.op == "linear" and n.inputs[1] in graph.params and ok(graph.params[n.inputs[1]])]


def calibrate(graph: Graph, params: dict, mode: str, calibration, method: str, *, exclude=("lm_head", "router"),
              group_size: int | None = None, keep_int8=(), groups: dict | None = None) -> tuple[dict, dict]:
    """(smooth, codes): AWQ's per-input-channel scales and GPTQ's codec parts per weight name,
    from the calibration prompts (token-id lists). `groups`: int4 group per weight (default
    `int4_groups`)."""
    from kiln.passes import gptq

    targets = _targets(graph, exclude)
    groups = int4_groups(graph, params, group_size, exclude) if groups is None else groups
    smooth, codes = {}, {}
    if "awq" in method and mode != "fp8":
        acts = collect_activations(graph, params, calibration, sorted({x for x, _ in targets}))
        for x, w in targets:
            wmode = weight_mode(mode, w, keep_int8)
            group = groups[w] if wmode == "int4_wo" else None
            if wmode == "int8_wo" or group:
                s = awq_search(wmode, np.asarray(params[w], np.float32), acts[x], group)
                if s is not None:
                    smooth[w] = s
    if "gptq" in method:
        moments = gptq.input_moments(graph, params, calibration, sorted({x for x, _ in targets}))
        for x, w in targets:
            wmode = weight_mode(mode, w, keep_int8)
            group = groups[w] if wmode == "int4_wo" else None
            if wmode == "int4_wo" and group is None:
                continue
            wf, h = np.asarray(params[w], np.float32), moments[x]
            if w in smooth:   # AWQ first: the weight scaled up by s, its input down by s
                s = smooth[w]
                wf = wf * s.reshape((-1,) + (1,) * (wf.ndim - 1))
                h = h / np.outer(s, s)
            codes[w] = gptq.gptq_quantize(wmode, wf, h, group, clip=wmode == "int4_wo")
    return smooth, codes


def quantize_graph(graph: Graph, params: dict | None, mode: str, *, exclude=("lm_head", "router"), calibration=None,
                   group_size: int | None = None, keep_int8=(), method: str | None = None) -> RewriteResult:
    """The quantization rewrite. `method`: rtn (round to nearest), awq (per-input-channel
    scaling searched on the calibration activations; weight-only modes), gptq (error-feedback
    rounding against the calibration inputs' second moments), awq+gptq; default: gptq with
    `calibration` prompts, rtn without. int4_wo: `group_size` (default INT4_GROUP, halved until
    it divides the input dim); weights named by a `keep_int8` substring are int8_wo instead."""
    if mode not in QUANT_MODES:
        raise ValueError(mode)
    method = method or default_method(mode, calibration)
    if method not in QUANT_METHODS:
        raise ConfigError(f"quantization method {method!r} is not supported; choose one of {', '.join(QUANT_METHODS)}")
    if method != "rtn" and not calibration:
        raise ConfigError(f"quantization method {method} needs calibration prompts; pass calibration= (token-id lists)")
    smooth, codes = {}, {}
    groups = int4_groups(graph, params, group_size, exclude) if mode == "int4_wo" else {}
    if method != "rtn" and params is not None:
        smooth, codes = calibrate(graph, params, mode, calibration, method, exclude=exclude, group_size=group_size,
                                  keep_int8=keep_int8, groups=groups)
    return apply_rules(graph, quantize_rules(mode, exclude, smooth, group_size, keep_int8, codes, groups), max_sweeps=1)


def quantize_pass(mode: str):
    from kiln.passes.pipeline import Pass

    return Pass(f"quantize_{mode}", lambda g, ctx: quantize_graph(
        g, ctx.params, mode, exclude=ctx.options.quantize_exclude, calibration=ctx.options.calibration,
        group_size=ctx.options.int4_group_size, keep_int8=ctx.options.int4_keep_int8,
        method=ctx.options.quant_method))
