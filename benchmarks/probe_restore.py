"""How fast do an engine's weights restore, by number of parallel partial restores?

    python3 benchmarks/probe_restore.py ENGINE_DIR [--threads 1,2,4,8,16]

One process; each count restored twice (the first pass also warms the page cache), the
arrays' bytes over the time of the second, and a raw read of the weight files (`cat` into
/dev/null, 8 files at once) as the page cache's own rate. The GPU backend starts before
any of it (timed apart); `--host` also times orbax's read into host arrays and the
host-to-device copy separately. Writes $OUT/probe_restore.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

OUT = os.environ.get("OUT", ".")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("engine")
    ap.add_argument("--threads", default="1,2,4,8,16")
    ap.add_argument("--host", action="store_true", help="first: orbax into host numpy, then device_put, timed apart")
    a = ap.parse_args()
    import jax

    from kiln.runtime.engine_dir import read_manifest, restore_weights

    manifest = read_manifest(a.engine)
    import numpy as np

    t = time.perf_counter()
    jax.device_put(np.zeros(4, np.float32)).block_until_ready()
    backend_s = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run(f"find {a.engine}/weights -type f -print0 | xargs -0 -P 8 -n 4 cat > /dev/null", shell=True)
    res = {"raw_read_s": time.perf_counter() - t, "backend_init_s": backend_s}
    if a.host:  # the read alone (orbax into host numpy), then the host-to-device copy alone, twice each
        import orbax.checkpoint as ocp

        from kiln.runtime.engine_dir import _checkpointer

        names = list(manifest["params"])
        dev0 = jax.devices()[0]
        pinned = jax.sharding.SingleDeviceSharding(dev0, memory_kind="pinned_host")
        for rep in range(2):
            t = time.perf_counter()
            host = _checkpointer().restore(Path(a.engine) / "weights", args=ocp.args.PyTreeRestore(
                restore_args={n: ocp.RestoreArgs(restore_type=np.ndarray) for n in names}))
            t_read = time.perf_counter() - t
            t = time.perf_counter()
            dev = jax.block_until_ready(jax.device_put([host[n] for n in names]))
            t_h2d = time.perf_counter() - t
            res[f"host_read_{rep}_s"], res[f"h2d_{rep}_s"] = t_read, t_h2d
            print("host", rep, t_read, t_h2d, file=sys.stderr, flush=True)
            # the same arrays through pinned host memory: numpy -> pinned_host (a host copy), then one DMA
            try:
                t = time.perf_counter()
                hp = jax.block_until_ready(jax.device_put([host[n] for n in names], pinned))
                t_pin = time.perf_counter() - t
                t = time.perf_counter()
                dev = jax.block_until_ready(jax.device_put(hp, jax.sharding.SingleDeviceSharding(dev0)))
                res[f"to_pinned_{rep}_s"], res[f"pinned_h2d_{rep}_s"] = t_pin, time.perf_counter() - t
                del hp
            except Exception as e:
                res["pinned_error"] = str(e)[:300]
            # threads: one device_put per array, 8 at once
            from concurrent.futures import ThreadPoolExecutor

            t = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                dev = list(pool.map(lambda n: jax.device_put(host[n], dev0).block_until_ready(), names))
            res[f"h2d_8threads_{rep}_s"] = time.perf_counter() - t
            print(res, file=sys.stderr, flush=True)
            del host, dev
        # orbax restoring straight into pinned host arrays, then one device_put of the tree
        try:
            for rep in range(2):
                t = time.perf_counter()
                hp = restore_weights(a.engine, manifest, {n: pinned for n in names}, threads=4)
                jax.block_until_ready(hp)
                t_r = time.perf_counter() - t
                t = time.perf_counter()
                dev = jax.block_until_ready(jax.device_put(hp, jax.sharding.SingleDeviceSharding(dev0)))
                res[f"orbax_pinned_{rep}_s"], res[f"orbax_pinned_h2d_{rep}_s"] = t_r, time.perf_counter() - t
                del hp, dev
        except Exception as e:
            res["orbax_pinned_error"] = str(e)[:300]
        print(res, file=sys.stderr, flush=True)
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
