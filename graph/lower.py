"""Lowering: a `Graph` becomes a pure JAX function

    step(params, kv_cache, inputs) -> (logits, kv_cache)

`params` maps parameter names to arrays, `kv_cache` is a list with one entry per KV layer
(`{"k": pool, "v": pool}`, pools `[kv_heads, blocks, block_size, head_dim]`), `inputs` maps
step-input names (`ir.STEP_INPUTS`) to int32 arrays. The layers are unrolled: every layer's
parameters stay separate arrays (a scan over stacked weights is 3x slower at decode on the
H100, GPU-NOTES.md). Jit the result at the top level with the cache donated.

Each attention node's lowering (the KV write, the kernel or the reference, RoPE) runs inside
a nested `jax.jit` shared by every attention node with the same attributes: it gets its own
layer's cache entry as an argument, so its `layer` attribute does not split them. A 32-layer
model then traces and lowers its attention to StableHLO once, not once per layer: tracing is
what a warm start pays per shape bucket even when the compiled step comes from the cache. XLA
inlines the calls, so the compiled step is the same; the cheap nodes stay inline (a call
boundary around `add_rms_norm` left its stacked output materialised).
"""

from __future__ import annotations

import json
from typing import Callable

from kiln.graph.ir import Graph
from kiln.graph.ops import LowerCtx, REGISTRY


def _outlined(fn, attrs: dict, impl: str, shard):
    """`fn(ctx, *args, **attrs)` as a jitted `(cache_entry, *args) -> (out, cache_entry)`."""
    import jax

    layered = "layer" in attrs
    attrs = dict(attrs, layer=0) if layered else attrs

    def body(entry, *args):
        ctx = LowerCtx([entry] if layered else [], impl, shard)
        out = fn(ctx, *args, **attrs)
        return out, (ctx.kv_cache[0] if layered else None)

    return jax.jit(body)


def lower(graph: Graph, *, attention: str = "auto", shard=None, outline: bool = True) -> Callable:
    """`shard` (passes/sharding.py) places node outputs and runs attention per kv-head shard;
    `outline=False` traces every node inline (the same function, slower to trace)."""
    nodes = [(n.name, n.op, REGISTRY[n.op].lower, n.inputs, n.attrs, n.type) for n in graph.nodes]
    outputs = list(graph.outputs)
    jitted: dict = {}  # (op, attributes but the layer) -> the node's nested jit, shared by the layers

    def call(ctx, op, fn, args, attrs):
        if not outline or "layer" not in attrs:  # only the attention nodes: the rest trace cheaply, and
            return fn(ctx, *args, **attrs)       # a call boundary can cost a fusion (a stack before a slice)
        key = (op, json.dumps({k: v for k, v in attrs.items() if k != "layer"}, sort_keys=True, default=repr))
        f = jitted.get(key)
        if f is None:
            f = jitted[key] = _outlined(fn, attrs, ctx.attention_impl, shard)
        layer = attrs.get("layer")
        out, entry = f(ctx.kv_cache[layer] if layer is not None else None, *args)
        if layer is not None:
            ctx.kv_cache[layer] = entry
        return out

    def step(params, kv_cache, inputs):
        env = {**inputs, **params}
        ctx = LowerCtx(kv_cache, attention, shard)
        for name, op, fn, ins, attrs, typ in nodes:
            env[name] = call(ctx, op, fn, [env[i] for i in ins], attrs)
            if shard is not None:
                env[name] = shard.constrain(env[name], typ)
        result = env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs)
        return result, ctx.kv_cache

    return step
