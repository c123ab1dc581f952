"""SmolLM2-135M-Instruct (the default model) perplexity on the fixed excerpt, Kiln fp32 and
bf16 beside transformers fp32 on the same GGUF file and the same windows (the reference).

    python benchmarks/perplexity_smollm2.py [--text tests/data/alice_chapter1_excerpt.txt] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.helpers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=str(Path(__file__).parent.parent / "tests/data/alice_chapter1_excerpt.txt"))
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import transformers

    from kiln.models.default import default_model_path
    from kiln.runtime.evaluate import evaluate_text
    from tests.helpers import hf_perplexity

    text = Path(args.text).read_text(encoding="utf-8")
    rows = {}
    for dtype in ("float32", "bfloat16"):
        t = time.time()
        r = evaluate_text(None, text, dtype=dtype, window=args.window, stride=args.stride)
        rows[f"kiln {dtype}"] = dict(perplexity=r.perplexity, tokens=r.tokens, windows=r.windows,
                                     seconds=time.time() - t)
    path = default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32").eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    t = time.time()
    ppl, n = hf_perplexity(hf, tok.encode(text), args.window, args.stride)
    rows["transformers float32 (reference)"] = dict(perplexity=ppl, tokens=n, seconds=time.time() - t)
    for k, v in rows.items():
        print(f"{k:36s} perplexity {v['perplexity']:.4f}  ({v['tokens']} tokens, {v['seconds']:.1f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
