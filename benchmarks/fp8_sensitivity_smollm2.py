"""Which matmul inputs' fp8 (e4m3, per-token) rounding costs SmolLM2-135M the most, and
whether keeping a few of them in 16 bits (W8A16 there, W8A8 elsewhere) brings fp8 within 1%
of float. One compiled step for every configuration: each linear's input goes through a
fake quantization `x + gate * (q(x) - x)` whose gate (0 or 1) is a parameter, and the weights
are swapped between float and the fp8 GPTQ weights dequantized to float (W8A8 in fp32
arithmetic, as the fp32 graph runs it).

    1. ranks every module (layer x projection) by how much the NLL drops when its input alone
       stays unrounded, on the calibration text (passes/calibration.txt: model samples, not
       the evaluated text), with the fp8 GPTQ weights;
    2. scores on the held-out excerpt: all rounded, the top-k of that ranking kept in 16
       bits, each projection kind kept, the first / last layers kept.

    python benchmarks/fp8_sensitivity_smollm2.py [--top 1,2,4,8,16,32,60] [--rank-windows 3] [--out FILE.json]
        [--act-aware] [--no-ranking | --ranking EARLIER.json] [--no-kind-rows] [--also-text FILE]
        [--gptq-cache FILE.npz]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fake_fp8_graph(graph):
    """`graph` with every quantizable linear's input x replaced by act_fq(x, gate) (gate: a
    [1] parameter named after the weight, `<weight base>.fq`)."""
    import jax.numpy as jnp

    from kiln.graph.ops import REGISTRY, register_op
    from kiln.passes import quantize as qz
    from kiln.passes.ops import FP8_MAX
    from kiln.passes.rewrite import Any_, Param_, Pat, Rule, apply_rules

    def lower(ctx, x, gate):
        xf = x.astype(jnp.float32)
        s = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), 1e-12) / FP8_MAX
        q = (xf / s).astype(jnp.float8_e4m3fn).astype(jnp.float32) * s
        return (xf + gate[0] * (q - xf)).astype(x.dtype)

    if "act_fq" not in REGISTRY:
        register_op("act_fq", lambda a, x, g: x, lower, inputs=2)

    def rewrite(rw, m):
        gate = rw.param(qz._base(m.w) + ".fq", (1,), "float32", (None,), init="ones")
        x = rw.node("act_fq", m.x, gate, name=m.x + ".fq")
        lin = m.node("lin")
        rw.replace(lin.name, rw.node("linear", x, *lin.inputs[1:], name=lin.name + ".f", **lin.attrs))

    rule = Rule("fake_fp8_act", Pat("linear", Any_("x"), Param_("w", where=qz._quantizable(("lm_head", "router"))),
                                    rest="rest", name="lin"), rewrite)
    return apply_rules(graph, [rule], max_sweeps=1).graph


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=str(ROOT / "tests/data/alice_chapter1_excerpt.txt"))
    ap.add_argument("--also-text", default=None, help="a second held-out text every row is also scored on")
    ap.add_argument("--gptq-cache", default=None, help=".npz of the fp8 GPTQ weights: read if there, else written")
    ap.add_argument("--top", default="1,2,4,8,16,32,60")
    ap.add_argument("--rank-windows", type=int, default=3, help="512-token windows of calibration text for the ranking")
    ap.add_argument("--act-aware", action="store_true",
                    help="also GPTQ against the moments of the e4m3-rounded inputs the W8A8 matmuls see")
    ap.add_argument("--no-ranking", action="store_true", help="skip the per-module ranking and its rows")
    ap.add_argument("--no-kind-rows", dest="kind_rows", action="store_false",
                    help="skip the rows that keep a whole projection kind or the first and last layers")
    ap.add_argument("--ranking", default=None, help="the ranking of an earlier run's --out file instead of measuring it")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import numpy as np

    from kiln.models.loader import load_params, open_checkpoint
    from kiln.models.registry import build_graph
    from kiln.passes import compile_model
    from kiln.passes import quantize as qz
    from kiln.runtime.evaluate import _WindowScorer, window_spans

    ckpt = open_checkpoint(None)
    tok = ckpt.load_tokenizer()
    graph = build_graph(ckpt.config, "float32")
    params = {k: np.asarray(v) for k, v in load_params(graph, ckpt.config, ckpt.source).items()}
    g, p = compile_model(graph, params)
    fq = fake_fp8_graph(g)
    gates = sorted(k for k in fq.params if k.endswith(".fq"))
    weight_of = {k: k[:-3] + ".w" for k in gates}

    calib = qz.calibration_prompts(tok)
    eval_ids = tok.encode(Path(args.text).read_text(encoding="utf-8"))
    also_ids = tok.encode(Path(args.also_text).read_text(encoding="utf-8")) if args.also_text else None
    calib_ids = [i for c in calib for i in c]
    scorer = _WindowScorer(fq, {**p, **{k: np.ones(1, np.float32) for k in gates}}, 512, "float32")

    def nll(ids, spans, weights, off=()):
        scorer.params = {**p, **weights, **{k: np.full(1, 0.0 if k in off else 1.0, np.float32) for k in gates}}
        total, count = 0.0, 0
        for b, e, f in spans:
            s, n = scorer(ids[b:e], f - b)
            total, count = total + s, count + n
        return total / count

    eval_spans = window_spans(len(eval_ids), 512, 256)
    also_spans = window_spans(len(also_ids), 512, 256) if also_ids else None
    rank_spans = [(i * 512, (i + 1) * 512, i * 512 + 1) for i in range(args.rank_windows)]
    rows = {}

    def row(name, weights, off=()):
        t = time.time()
        ppl = math.exp(nll(eval_ids, eval_spans, weights, off))
        base = rows.get("float (no rounding)", {}).get("perplexity", ppl)
        rows[name] = dict(perplexity=ppl, vs_float=ppl / base - 1, kept=len(off))
        also = ""
        if also_ids:
            ppl2 = math.exp(nll(also_ids, also_spans, weights, off))
            base2 = rows.get("float (no rounding)", {}).get("also_perplexity", ppl2)
            rows[name].update(also_perplexity=ppl2, also_vs_float=ppl2 / base2 - 1)
            also = f"   also-text {ppl2:8.4f} {ppl2 / base2 - 1:+7.2%} ({sum(e - f for _, e, f in also_spans)} tokens)"
        print(f"{name:55s} {ppl:8.4f} {ppl / base - 1:+7.2%}{also}  ({time.time() - t:.0f} s)", flush=True)

    row("float (no rounding)", {}, off=gates)
    row("activations only (float weights)", {})
    t = time.time()
    if args.gptq_cache and Path(args.gptq_cache).exists():
        gptq_w = dict(np.load(args.gptq_cache))
    else:
        _, codes = qz.calibrate(g, p, "fp8", calib, "gptq")
        gptq_w = {w: qz.dequantize("fp8", *codes[w]).reshape(p[w].shape) for w in weight_of.values()}
        if args.gptq_cache:
            np.savez(args.gptq_cache, **gptq_w)
    print(f"fp8 GPTQ weights: {time.time() - t:.0f} s", flush=True)

    row("fp8 gptq W8A16 (all inputs 16-bit)", gptq_w, off=gates)
    row("fp8 gptq W8A8 (all inputs rounded)", gptq_w)
    if args.act_aware:   # H = Xq^T Xq: the rounded inputs' moments (every gate on)
        from kiln.passes import gptq

        t = time.time()
        pairs = qz._targets(fq, ("lm_head", "router"))
        hq = gptq.input_moments(fq, {**p, **{k: np.ones(1, np.float32) for k in gates}}, calib,
                                sorted({x for x, _ in pairs}))
        aware_w = {w: qz.dequantize("fp8", *gptq.gptq_quantize("fp8", p[w], hq[x])).reshape(p[w].shape)
                   for x, w in pairs}
        print(f"fp8 GPTQ weights on rounded-input moments: {time.time() - t:.0f} s", flush=True)
        row("fp8 gptq(rounded-input H) W8A16", aware_w, off=gates)
        row("fp8 gptq(rounded-input H) W8A8", aware_w)
    if args.no_ranking:
        if args.out:
            Path(args.out).write_text(json.dumps(dict(rows=rows), indent=1))
        return

    t = time.time()
    if args.ranking:   # an earlier run's --out
        gain = json.loads(Path(args.ranking).read_text())["gain"]
    else:
        base = nll(calib_ids, rank_spans, gptq_w)
        gain = {k: base - nll(calib_ids, rank_spans, gptq_w, off={k}) for k in gates}
    order = sorted(gates, key=lambda k: -gain[k])
    print(f"ranking ({len(gates)} modules, {args.rank_windows} windows of calibration text): {time.time() - t:.0f} s")
    for k in order[:12]:
        print(f"  {k[:-3]:28s} NLL gain {gain[k]:+.5f}")
    kinds = sorted({k.split(".")[2] for k in gates})
    for kind in kinds:
        print(f"  all {kind:24s} NLL gain {sum(v for k, v in gain.items() if k.split('.')[2] == kind):+.5f}")

    for k in [int(x) for x in args.top.split(",")]:
        row(f"W8A8, top {k} calibration-ranked inputs 16-bit", gptq_w, off=set(order[:k]))
    for kind in kinds if args.kind_rows else ():
        row(f"W8A8, every {kind} input 16-bit", gptq_w, off={k for k in gates if k.split(".")[2] == kind})
    n_layers = 1 + max(int(k.split(".")[1]) for k in gates)
    if args.kind_rows:
        row("W8A8, layers 0 and last 16-bit", gptq_w, off={k for k in gates if int(k.split(".")[1]) in (0, n_layers - 1)})
    if args.out:
        Path(args.out).write_text(json.dumps(dict(rows=rows, gain=gain, order=order), indent=1))


if __name__ == "__main__":
    main()
