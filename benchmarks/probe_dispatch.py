"""Host cost of dispatching a step: a jit call whose device work is nil, fed 15 small numpy
arrays (as a Kiln step's inputs, sampling arrays and tokens-from-previous are) against the same
bytes packed into one array, on one device and with its weight split over N.

    python3 benchmarks/probe_dispatch.py [--devices 2]     # on the CPU: JAX_PLATFORMS=cpu
    python3 benchmarks/probe_dispatch.py --step-args       # the runner's argument list, one device

(`jax_num_cpu_devices` gives the CPU N devices.) Prints microseconds per call.
`--step-args`: a compiled call shaped like an 8B step's (291 weight arrays, 32 layers of K/V
pools donated, the previous tokens, 2 packed input arrays) against the same with the pools not
donated, with 1 weight array and 2 pools, and with the outputs copied to the host as the
runner does: which part of the ~2.5 ms the H100 host spends per step dispatch is the argument list.
"""

import argparse
import time

import jax


def step_args(calls: int = 200):
    import jax.numpy as jnp
    import numpy as np

    def make(n_params, n_layers):
        params = {f"w{i}": jnp.ones((64,), jnp.bfloat16) for i in range(n_params)}
        kv = [{"k": jnp.zeros((256,), jnp.bfloat16), "v": jnp.zeros((256,), jnp.bfloat16)} for _ in range(n_layers)]
        return params, kv

    def body(params, kv, prev, packs):
        kv = [{"k": e["k"].at[0].set(packs[1][0].astype(jnp.bfloat16)), "v": e["v"]} for e in kv]
        return kv, {"tokens": prev + packs[0][:prev.shape[0]]}

    packs = (np.zeros(6000, np.int32), np.ones(2000, np.float32))
    for name, n_params, n_layers, donate, fetch in (("runner's list: 291 weights, 64 pools donated", 291, 32, True, False),
                                                    ("the same, outputs copied to the host", 291, 32, True, True),
                                                    ("pools not donated", 291, 32, False, False),
                                                    ("1 weight array, 64 pools donated", 1, 32, True, False),
                                                    ("291 weights, 2 pools donated", 291, 1, True, False)):
        params, kv = make(n_params, n_layers)
        prev = jnp.zeros(512, jnp.int32)
        fn = jax.jit(body, donate_argnums=(1,) if donate else ()).lower(params, kv, prev, packs).compile()
        for _ in range(3):
            kv, out = fn(params, kv, prev, packs)
        jax.block_until_ready(out)
        t = time.perf_counter()
        for _ in range(calls):
            kv, out = fn(params, kv, prev, packs)
            if fetch:
                for v in out.values():
                    v.copy_to_host_async()
        jax.block_until_ready(out)
        print(f"{name}: {(time.perf_counter() - t) / calls * 1e6:.0f} us per call", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--step-args", action="store_true")
    a = ap.parse_args()
    if a.step_args:
        return step_args()
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
