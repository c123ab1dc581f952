"""Host cost of dispatching a step: a jit call whose device work is nil, fed 15 small numpy
arrays (as a Kiln step's inputs, sampling arrays and tokens-from-previous are) against the same
bytes packed into one array, on one device and with its weight split over N.

    python3 benchmarks/probe_dispatch.py [--devices 2]     # on the CPU: JAX_PLATFORMS=cpu

(`jax_num_cpu_devices` gives the CPU N devices.) Prints microseconds per call.
"""

import argparse
import time

import jax


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=2)
    a = ap.parse_args()
    if jax.config.jax_platforms in (None, "", "cpu"):
        try:
            jax.config.update("jax_num_cpu_devices", a.devices)
        except AttributeError:  # an older jax: XLA_FLAGS=--xla_force_host_platform_device_count=N
            pass
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    inputs = {f"a{i}": np.zeros(512 if i % 2 else 16, np.int32) for i in range(15)}
    packed = np.zeros(sum(v.size for v in inputs.values()), np.int32)
    f = jax.jit(lambda w, inp: (w[0, :8] + sum(jnp.sum(v) for v in inp.values())).astype(jnp.int32))
    g = jax.jit(lambda w, p: (w[0, :8] + jnp.sum(p)).astype(jnp.int32))
    for n in sorted({1, a.devices}):
        mesh = Mesh(np.array(jax.devices()[:n]), ("tp",))
        w = jax.device_put(jnp.ones((256, 256)), NamedSharding(mesh, P(None, "tp")))
        for fn, arg, name in ((f, inputs, "15 numpy inputs"), (g, packed, "1 packed input")):
            for _ in range(3):
                fn(w, arg).block_until_ready()
            t = time.perf_counter()
            for _ in range(200):
                out = fn(w, arg)
            out.block_until_ready()
            print(f"{n} device(s), {name}: {(time.perf_counter() - t) / 200 * 1e6:.0f} us per call", flush=True)


if __name__ == "__main__":
    main()
