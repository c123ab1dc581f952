"""SmolLM2-135M-Instruct (the default model) perplexity on a held-out text under each
quantization: Kiln fp32 and bf16 (the baselines) beside transformers fp32 on the same GGUF
file and the same windows (the reference), then every quantization row on the fused fp32
graph, same windows. Prints the whole BENCHMARKS.md table.

    python benchmarks/perplexity_smollm2.py [--text tests/data/alice_chapter1_excerpt.txt] [--out FILE.json]
                                            [--rows fp8:rtn,fp8:gptq,...] [--no-reference]

A row is MODE:METHOD[:GROUP] (int4 without GROUP: the default group, the checkpoint's own
4-bit grid when its weights lie on one, as the shipped Q4_1 GGUF's do); fp8 rows are scored
twice: W8A8 (as it runs at >= 256 tokens; the windows are 512) and W8A16
(FP8_W8A8_MIN_TOKENS raised above the window, so the same weights run weight-only, as below
256 tokens). gptq / awq rows calibrate on
passes/calibration.txt (model samples, not the evaluated text); the calibration inputs'
moments are collected once and shared by every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.helpers

ROWS = ("fp8:rtn", "fp8:gptq", "int8_wo:rtn", "int8_wo:gptq", "int4_wo:rtn", "int4_wo:gptq", "int4_wo:awq+gptq",
        "int4_wo:rtn:64", "int4_wo:awq:64", "int4_wo:gptq:64", "int4_wo:awq+gptq:64")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=str(Path(__file__).parent.parent / "tests/data/alice_chapter1_excerpt.txt"))
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--no-reference", action="store_true", help="skip the transformers row")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import numpy as np

    from kiln.models.default import default_model_path
    from kiln.models.loader import load_params, open_checkpoint
    from kiln.models.registry import build_graph
    from kiln.passes import compile_model, gptq
    from kiln.passes import ops as qops
    from kiln.passes.quantize import calibration_prompts
    from kiln.runtime.evaluate import perplexity_of_ids

    text = Path(args.text).read_text(encoding="utf-8")
    ckpt = open_checkpoint(None)
    tok = ckpt.load_tokenizer()
    ids = tok.encode(text)
    rows = {}

    def record(name, fn, **extra):
        t = time.time()
        r = fn()
        rows[name] = dict(perplexity=r.perplexity, tokens=r.tokens, windows=r.windows, seconds=time.time() - t, **extra)
        base = rows.get("kiln float32", {}).get("perplexity")
        rel = f"{r.perplexity / base - 1:+.2%}" if base else ""
        print(f"{name:34s} perplexity {r.perplexity:8.4f} {rel:>8s}  ({r.tokens} tokens, {r.windows} windows, "
              f"{rows[name]['seconds']:.0f} s{''.join(f', {k} {v}' for k, v in extra.items())})", flush=True)

    graphs = {}
    for dtype in ("float32", "bfloat16"):
        graph = build_graph(ckpt.config, dtype)
        params = {k: np.asarray(v) for k, v in load_params(graph, ckpt.config, ckpt.source).items()}
        graphs[dtype] = compile_model(graph, params)
        record(f"kiln {dtype}", lambda: perplexity_of_ids(*graphs[dtype], ids, window=args.window, stride=args.stride,
                                                          dtype=dtype))
    g, p = graphs.pop("float32")
    graphs.clear()

    if not args.no_reference:
        import transformers

        from tests.helpers import hf_perplexity

        path = default_model_path()
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype="float32").eval()
        t = time.time()
        ppl, n = hf_perplexity(hf, ids, args.window, args.stride)
        rows["transformers float32 (reference)"] = dict(perplexity=ppl, tokens=n, seconds=time.time() - t)
        print(f"{'transformers float32 (reference)':34s} perplexity {ppl:8.4f}           ({n} tokens)", flush=True)
        del hf

    calib = calibration_prompts(tok)
    moments_of = gptq.input_moments
    cache = {}

    def shared_moments(graph, params, prompts, names, **kw):   # one collection for every row
        missing = [n for n in names if n not in cache]
        if missing:
            cache.update(moments_of(graph, params, prompts, missing, **kw))
        return {n: cache[n] for n in names}
    gptq.input_moments = shared_moments

    for spec in args.rows.split(","):
        mode, method, *group = spec.split(":")
        group = int(group[0]) if group else None
        t = time.time()
        gq, pq = compile_model(g, p, quantization=mode, quant_method=method, int4_group_size=group,
                               calibration=calib if method != "rtn" else None)
        layer_bytes = sum(np.asarray(v).nbytes for k, v in pq.items() if k.startswith("layers."))
        extra = dict(build_s=round(time.time() - t), layer_MB=round(layer_bytes / 1e6, 1))
        if mode == "int4_wo":   # the groups the default (or the explicit size) came to
            extra["groups"] = "/".join(map(str, sorted({n.attrs["group_size"] for n in gq.nodes if n.op == "qlinear"})))
        name = f"{mode} {method}" + (f" g{group}" if group else "")
        if mode == "fp8":
            record(name + " W8A8", lambda: perplexity_of_ids(gq, pq, ids, window=args.window, stride=args.stride), **extra)
            saved, qops.FP8_W8A8_MIN_TOKENS = qops.FP8_W8A8_MIN_TOKENS, 10 ** 9
            try:
                record(name + " W8A16", lambda: perplexity_of_ids(gq, pq, ids, window=args.window, stride=args.stride))
            finally:
                qops.FP8_W8A8_MIN_TOKENS = saved
        else:
            record(name, lambda: perplexity_of_ids(gq, pq, ids, window=args.window, stride=args.stride), **extra)
    gptq.input_moments = moments_of
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
