"""Does the step update the KV pools in place? For each attention implementation: the
compiled step's memory analysis (temp bytes vs one pool) and the HLO copies of pool-shaped
buffers. A pool copy per layer per step costs 2 x pool bytes of HBM traffic per layer.

    python3 benchmarks/probe_kv_inplace.py
"""

import re
import sys

import numpy as np

from kiln import LLM


def probe(attention: str, preset: str = "llama-tiny"):
    llm = LLM(f"random:{preset}", dtype="bfloat16", attention=attention, num_kv_blocks=4096, max_num_seqs=64,
              max_num_tokens=256, max_model_len=1024, log=None)
    r = llm.runner
    b = r._warmup_batches()[-1]
    from kiln.runtime.runner import pack_step

    layout, packs = pack_step(b)
    c = r._fn.lower(r.params, r.kv, r._prev_tokens, packs, layout=layout, all_greedy=True, num_logprobs=0).compile()
    text = c.as_text()
    pool = r.kv[0]["k"]
    dims = ",".join(str(d) for d in pool.shape)
    pool_bytes = pool.size * pool.dtype.itemsize
    copies = [ln.strip()[:160] for ln in text.splitlines() if re.search(r"\b(copy|copy-start)\(", ln) and dims in ln]
    ma = c.memory_analysis()
    print(f"attention={attention}: pool {tuple(pool.shape)} {pool_bytes / 2**20:.0f} MiB x {2 * len(r.kv)} pools; "
          f"temp {ma.temp_size_in_bytes / 2**20:.0f} MiB, alias {ma.alias_size_in_bytes / 2**20:.0f} MiB, "
          f"pool-shaped copies in HLO: {len(copies)}")
    for ln in copies[:4]:
        print("   ", ln)
    fusions = [ln.strip()[:200] for ln in text.splitlines() if dims in ln and ("dynamic-update-slice" in ln or "scatter" in ln)]
    print("    pool-shaped scatter/DUS:", len(fusions))
    sys.stdout.flush()


if __name__ == "__main__":
    for impl in sys.argv[1:] or ["reference", "pallas"]:
        probe(impl)
