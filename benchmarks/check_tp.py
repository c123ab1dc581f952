"""Tensor parallel on the GPUs of one host against one device (issue #5).

    python3 benchmarks/check_tp.py [--tp 2] [--pp 1] [--preset llama-tiny] [--tokens 32]

Greedy decoding of the same random-weight model, once on one device and once with `tp=N`
(attention heads, KV heads, the MLP and the vocabulary split over N devices; with `--pp`, the
layers split into pipeline stages as well), each in its own process: fp32 with full-precision matmuls (the all-reduce only changes the summation
order, ~1e-7) and bf16. Passes when the fp32 tokens are identical. Reported per dtype: tokens
identical per prompt, the largest difference of the sampled tokens' logprobs, and each
device's share of the weights (bytes held per device / bytes of the model). Writes
check_tp.json under $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

OUT = os.environ.get("OUT", ".")

RUN = r"""
import json, sys
import jax
a = json.loads(sys.argv[1])
if a["dtype"] == "float32":
    jax.config.update("jax_default_matmul_precision", "highest")
from kiln import LLM, SamplingParams
llm = LLM("random:" + a["preset"], dtype=a["dtype"], tp=a["tp"], pp=a.get("pp", 1), max_num_seqs=8, max_num_tokens=512,
          max_model_len=1024, num_kv_blocks=512)
prompts = [[100 + (7 * i + 13 * j) % 5000 for j in range(n)] for i, n in enumerate(a["lens"])]
outs = llm.generate(prompts, SamplingParams(max_tokens=a["tokens"], temperature=0.0, ignore_eos=True, logprobs=1),
                    use_tqdm=False)
leaves = jax.tree_util.tree_leaves(llm.params)
total = sum(x.nbytes for x in leaves)
per_dev = {}
for x in leaves:
    for s in x.addressable_shards:
        per_dev[str(s.device)] = per_dev.get(str(s.device), 0) + s.data.nbytes
print("RESULT", json.dumps({"tokens": [o.outputs[0].token_ids for o in outs],
                            "logprobs": [[lp[t] for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                                         for o in outs],
                            "weight_bytes": total, "per_device_bytes": per_dev,
                            "devices": [str(d) for d in jax.devices()]}))
"""


def run(args: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", RUN, json.dumps(args)], capture_output=True, text=True)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        return {"error": (r.stderr or r.stdout)[-2000:]}
    return json.loads(line[0][7:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--preset", default="llama-tiny")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--lens", default="5,37,130,301")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    a = ap.parse_args()
    lens = [int(x) for x in a.lens.split(",")]
    res, ok = {"preset": a.preset, "tp": a.tp, "pp": a.pp, "lens": lens}, True
    for dtype in a.dtypes.split(","):
        base = dict(preset=a.preset, dtype=dtype, tokens=a.tokens, lens=lens)
        one, many = run({**base, "tp": 1}), run({**base, "tp": a.tp, "pp": a.pp})
        if "error" in one or "error" in many:
            res[dtype] = {"tp1": one.get("error"), f"tp{a.tp}": many.get("error")}
            print(dtype, "FAILED TO RUN", json.dumps(res[dtype])[:3000], flush=True)
            ok = False
            continue
        same = [x == y for x, y in zip(one["tokens"], many["tokens"])]
        first_diff = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
                      for x, y in zip(one["tokens"], many["tokens"])]
        # logprobs of the tokens both sampled, up to the first difference
        dlp = max((abs(p - q) for x, y, f in zip(one["logprobs"], many["logprobs"], first_diff)
                   for p, q in list(zip(x, y))[:f]), default=0.0)
        share = {d: b / many["weight_bytes"] for d, b in many["per_device_bytes"].items()}
        res[dtype] = {"identical": same, "first_difference": first_diff, "max_logprob_diff": dlp,
                      "weight_share_per_device": share, "devices": many["devices"]}
        print(dtype, json.dumps(res[dtype]), flush=True)
        if dtype == "float32":
            ok &= all(same)
    res["pass"] = ok
    print("PASS" if ok else "FAIL", flush=True)
    with open(os.path.join(OUT, f"check_tp{a.tp}_pp{a.pp}.json"), "w") as f:
        json.dump(res, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
