"""Lowering: a `Graph` becomes a pure JAX function

    step(params, kv_cache, inputs) -> (logits, kv_cache)

`params` maps parameter names to arrays, `kv_cache` is a list with one entry per KV layer
(`{"k": pool, "v": pool}`, pools `[kv_heads, blocks, block_size, head_dim]`), `inputs` maps
step-input names (`ir.STEP_INPUTS`) to int32 arrays. The layers are unrolled: every layer's
parameters stay separate arrays (a scan over stacked weights is 3x slower at decode on the
H100, GPU-NOTES.md). Jit the result at the top level with the cache donated.
"""

from __future__ import annotations

from typing import Callable

from kiln.graph.ir import Graph
from kiln.graph.ops import LowerCtx, REGISTRY


def lower(graph: Graph, *, attention: str = "auto", shard=None) -> Callable:
    """`shard` (passes/sharding.py) places node outputs and runs attention per kv-head shard."""
    nodes = [(n.name, REGISTRY[n.op].lower, n.inputs, n.attrs, n.type) for n in graph.nodes]
    outputs = list(graph.outputs)

    def step(params, kv_cache, inputs):
        env = {**inputs, **params}
        ctx = LowerCtx(kv_cache, attention, shard)
        for name, fn, ins, attrs, typ in nodes:
            env[name] = fn(ctx, *[env[i] for i in ins], **attrs)
            if shard is not None:
                env[name] = shard.constrain(env[name], typ)
        result = env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs)
        return result, ctx.kv_cache

    return step
