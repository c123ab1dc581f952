"""How fast do an engine's weights restore, by number of parallel partial restores?

    python3 benchmarks/probe_restore.py ENGINE_DIR [--threads 1,2,4,8,16]

One process; each count restored twice (the first pass also warms the page cache), the
arrays' bytes over the time of the second, and a raw read of the weight files (`cat` into
/dev/null, 8 files at once) as the page cache's own rate. Writes $OUT/probe_restore.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time

OUT = os.environ.get("OUT", ".")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("engine")
    ap.add_argument("--threads", default="1,2,4,8,16")
    a = ap.parse_args()
    import jax

    from kiln.runtime.engine_dir import read_manifest, restore_weights

    manifest = read_manifest(a.engine)
    t = time.perf_counter()
    subprocess.run(f"find {a.engine}/weights -type f -print0 | xargs -0 -P 8 -n 4 cat > /dev/null", shell=True)
    res = {"raw_read_s": time.perf_counter() - t}
    for n in [int(x) for x in a.threads.split(",")]:
        times = []
        for _ in range(2):
            t = time.perf_counter()
            params = restore_weights(a.engine, manifest, threads=n)
            jax.block_until_ready(params)
            times.append(time.perf_counter() - t)
        nbytes = sum(x.nbytes for x in params.values())
        del params
        res[f"threads{n}"] = {"s": times, "GB_per_s": nbytes / times[-1] / 1e9, "GB": nbytes / 1e9}
        print(n, res[f"threads{n}"], file=sys.stderr, flush=True)
    with open(os.path.join(OUT, "probe_restore.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
