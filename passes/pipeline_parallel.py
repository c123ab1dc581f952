"""Pipeline parallelism over the mesh axis `pp`: layers split into stages, activations
passed stage to stage with collective permutes, micro-batches so that stages overlap.

The graph splits in three at its layer boundaries (a node belongs to layer i when its name
or a parameter it reads starts with `layers.{i}.`):

    prologue (embedding)  ->  stage 0 | stage 1 | ... | stage pp-1  ->  epilogue (norm, logits)
    GSPMD, tp only            one shard_map, manual over pp              GSPMD, tp only

Stage s holds layers [first_s, first_s + n_s). Each parameter `layers.{i}.NAME` becomes
row s of a stacked `stage.{j}.NAME` [pp, ...] (j = i - first_s), sharded over pp (and over
tp by its logical axes), so every device holds only its stage's weights; KV pools stack the
same way: [pp, kv_heads, blocks, block_size, head_dim].

The flat batch of T tokens splits into M micro-batches of T/M tokens. At tick t stage s
runs micro-batch t - s, then hands its output to stage s + 1 (`ppermute`):

    tick        0    1    2    3    4
    stage 0    mb0  mb1  mb2  mb3   -
    stage 1     -   mb0  mb1  mb2  mb3

Ticks outside a stage's range compute on junk with their KV writes dropped (slot -1).
A sequence split across micro-batches is still exact: micro-batch m + 1 reads the keys
micro-batch m wrote earlier on the same stage, and each micro-batch's attention sees the
per-sequence metadata (query_start_loc, context_lens) of its own window of tokens
(`graph.ops.window_metadata`), which is what the kernels read positions from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kiln.errors import ConfigError
from kiln.graph import Graph
from kiln.graph.ir import Node
from kiln.graph.ops import REGISTRY, LowerCtx
from kiln.passes.sharding import (ShardedModel, ShardingRules, TensorParallel, kv_pool_spec, num_layers,
                                  put_global)

_LAYER = re.compile(r"^layers\.(\d+)\.")


_OUTER = "outer"  # reads a parameter outside the layers (embedding, final norm, logits)


def layer_tags(graph: Graph) -> list[int | str | None]:
    """Each node's layer: the layer of the `layers.{i}.` parameters it reads, `_OUTER` when it
    reads another parameter, else that of its latest-defined node input (so a fused node's
    helpers follow it whatever their names), else None."""
    tags: dict[str, int | str | None] = {}
    order = {n.name: k for k, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        ps = [i for i in n.inputs if i in graph.params]
        layers = {int(m.group(1)) for m in map(_LAYER.match, ps) if m}
        if layers:
            tags[n.name] = max(layers)
        elif ps:
            tags[n.name] = _OUTER
        else:
            srcs = [i for i in n.inputs if i in tags]
            tags[n.name] = tags[max(srcs, key=order.get)] if srcs else None
    return [tags[n.name] for n in graph.nodes]


def split_layers(num: int, pp: int) -> list[range]:
    """Contiguous, as even as possible; earlier stages take the remainder."""
    base, extra = divmod(num, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (s < extra)
        out.append(range(start, start + n))
        start += n
    return out


def _run(nodes, env, ctx, shard):
    for n in nodes:
        env[n.name] = REGISTRY[n.op].lower(ctx, *[env[i] for i in n.inputs], **n.attrs)
        if shard is not None:
            env[n.name] = shard.constrain(env[n.name], n.type)
    return env


@dataclass
class StageLayout:
    """How a graph's nodes, parameters and KV layers map onto pipeline stages."""
    graph: Graph
    mesh: Mesh
    rules: ShardingRules
    pp: int
    layers: list[range]                     # per stage
    prologue: list[Node]
    stages: list[list[Node]]
    epilogue: list[Node]
    carry: list[list[str]]                  # values crossing boundary k (k = 0..pp)
    bcast: list[str]                        # prologue values used past stage 0
    slot_of: dict[str, str]                 # layers.{i}.NAME -> stage.{j}.NAME
    kv_slot: dict[int, int]                 # global kv layer -> slot within its stage
    stacked: dict[str, list[str | None]]    # stage.{j}.NAME -> per-stage source param (None: padding)
    kv_stacked: list[list[int | None]]      # kv slot -> per-stage global kv layer

    @classmethod
    def build(cls, graph: Graph, mesh: Mesh, rules: ShardingRules) -> "StageLayout":
        pp = mesh.shape["pp"]
        layers = split_layers(num_layers(graph), pp)
        stage_of_layer = {i: s for s, r in enumerate(layers) for i in r}
        tags = layer_tags(graph)
        tagged = [k for k, t in enumerate(tags) if isinstance(t, int)]
        if not tagged:
            raise ConfigError(f"pp={pp}: graph {graph.name} has no `layers.N.` parameters to assign to stages")
        first, last = tagged[0], tagged[-1]
        prologue, epilogue = graph.nodes[:first], graph.nodes[last + 1:]
        stages: list[list[Node]] = [[] for _ in range(pp)]
        cur = tags[first]
        for n, t in zip(graph.nodes[first:last + 1], tags[first:last + 1]):
            if t == _OUTER:
                raise ConfigError(f"pp={pp}: node {n.name} between the layers reads a parameter shared by all "
                                  f"layers; pipeline stages need each layer's parameters to be its own")
            if t is not None:
                if t < cur:
                    raise ConfigError(f"pp={pp}: node {n.name} of layer {t} comes after layer {cur}'s nodes; "
                                      f"pipeline stages need layers in order")
                cur = t
            stages[stage_of_layer[cur]].append(n)

        # values crossing each stage boundary (step inputs and params are everywhere)
        seg_of: dict[str, int] = {n.name: -1 for n in prologue}  # -1 prologue, s stage, pp epilogue
        for s, nodes in enumerate(stages):
            seg_of.update({n.name: s for n in nodes})
        seg_of.update({n.name: pp for n in epilogue})
        last_use: dict[str, int] = {}
        for n in graph.nodes:
            for i in n.inputs:
                if i in seg_of:
                    last_use[i] = max(last_use.get(i, -1), seg_of[n.name])
        for o in graph.outputs:
            last_use[o] = pp + 1
        bcast = [n.name for n in prologue if last_use.get(n.name, -1) >= 1]
        order = {n.name: k for k, n in enumerate(graph.nodes)}
        carry = []
        for k in range(pp + 1):  # boundary k sits before stage k
            live = [v for v, s in seg_of.items() if s < k and last_use.get(v, -1) >= k and v not in bcast]
            carry.append(sorted(live, key=order.get))
        # boundary k passes carry[k] in the first len(carry[k]) of `width` per-token slots
        # (fused add + norm: the embedding alone enters stage 0, residual and delta after)
        shapes = [[graph.type_of(v) for v in c] for c in carry]
        widest = max(shapes, key=len)
        if any((t.shape, t.dtype) != (u.shape, u.dtype) for c in shapes for t, u in zip(c, widest)):
            raise ConfigError(f"pp={pp}: the values between stages differ from boundary to boundary "
                              f"({[[str(t) for t in c] for c in shapes]}); the layers must pass the same state")
        for v in (v for c in carry for v in c):
            if graph.type_of(v).shape[:1] != ("T",):
                raise ConfigError(f"pp={pp}: value {v} passed between stages is {graph.type_of(v)}, not per token")

        slot_of, stacked = {}, {}
        for s, r in enumerate(layers):
            for i in r:
                for name in graph.params:
                    if name.startswith(f"layers.{i}."):
                        slot = f"stage.{i - r.start}.{name[len(f'layers.{i}.'):]}"
                        slot_of[name] = slot
                        stacked.setdefault(slot, [None] * pp)[s] = name
        kv_slot, kv_stacked = {}, []
        for s, nodes in enumerate(stages):
            j = 0
            for n in nodes:
                if "layer" in n.attrs and "attention" in n.op:
                    g = n.attrs["layer"]
                    kv_slot[g] = j
                    if j == len(kv_stacked):
                        kv_stacked.append([None] * pp)
                    kv_stacked[j][s] = g
                    j += 1
        for slot, srcs in stacked.items():
            shapes_ = {graph.params[p].type.shape for p in srcs if p}
            if len(shapes_) > 1:
                raise ConfigError(f"pp={pp}: parameter slot {slot} has different shapes across stages {shapes_}")
        return cls(graph, mesh, rules, pp, layers, prologue, stages, epilogue, carry, bcast, slot_of, kv_slot,
                   stacked, kv_stacked)

    # -- placement
    def _stack_spec(self, slot: str) -> P:
        src = next(p for p in self.stacked[slot] if p)
        return P("pp", *self.rules.spec(self.graph.params[src].type, self.mesh))

    def shardings(self) -> dict[str, NamedSharding]:
        out = {}
        for name, p in self.graph.params.items():
            if name not in self.slot_of:
                out[name] = NamedSharding(self.mesh, self.rules.spec(p.type, self.mesh))
        for slot in self.stacked:
            out[slot] = NamedSharding(self.mesh, self._stack_spec(slot))
        return out

    def place(self, params: dict) -> dict:
        """Graph params (host or device) -> the staged dict: shared params as they are,
        layer params stacked per slot [pp, ...] (zeros where a stage has fewer layers)."""
        sh = self.shardings()
        out = {name: put_global(a, sh[name]) for name, a in params.items() if name not in self.slot_of}
        for slot, srcs in self.stacked.items():
            ref = np.asarray(params[next(p for p in srcs if p)])
            host = np.stack([np.asarray(params[p]) if p else np.zeros_like(ref) for p in srcs])
            out[slot] = put_global(host, sh[slot])
        return out

    def kv_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, kv_pool_spec(self.mesh, self.rules, lead=("pp",)))

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: str) -> list[dict]:
        """One stacked pool pair per KV slot: [pp, kv_heads, blocks, block_size, head_dim]."""
        shapes = []
        for per_stage in self.kv_stacked:
            kv = self.graph.kv_layers[next(g for g in per_stage if g is not None)]
            shapes.append((self.pp, kv.num_kv_heads, num_blocks, block_size, kv.head_dim))
        sh = self.kv_sharding()
        make = jax.jit(lambda: [{"k": jnp.zeros(s, dtype), "v": jnp.zeros(s, dtype)} for s in shapes],
                       out_shardings=[{"k": sh, "v": sh} for _ in shapes])
        return make()

    # -- the step
    def _stage_fn(self, s: int, shard):
        """Stage s's program over local (unstacked) slot params and KV slots."""
        nodes = self.stages[s]
        slot_of, kv_slot = self.slot_of, self.kv_slot
        names = [p for p in self.slot_of if _LAYER.match(p) and int(_LAYER.match(p).group(1)) in self.layers[s]]
        kv_globals = [g for g in kv_slot if any(g == st[s] for st in self.kv_stacked)]
        carry_in, carry_out = self.carry[s], self.carry[s + 1]

        def fn(slot_params, kv_local, env0, carry, window=None):
            env = dict(env0)
            env.update({p: slot_params[slot_of[p]] for p in names})
            env.update(zip(carry_in, carry))
            ctx = LowerCtx([], "reference", shard)
            ctx.attention_impl = self.attention
            ctx.token_window = window
            ctx.kv_cache = {g: kv_local[kv_slot[g]] for g in kv_globals}
            env = _run(nodes, env, ctx, shard)
            kv_out = list(kv_local)
            for g in kv_globals:
                kv_out[kv_slot[g]] = ctx.kv_cache[g]
            out = tuple(env[v] for v in carry_out)
            return out + tuple(jnp.zeros_like(c) for c in carry[len(out):]), kv_out

        return fn

    def _signature(self, s: int):
        """Stage s's program up to renaming (to share one program when all stages agree)."""
        rename = {**self.slot_of, **dict(zip(self.carry[s], map(str, range(len(self.carry[s])))))}
        local = {n.name: f"n{k}" for k, n in enumerate(self.stages[s])}
        rename.update(local)
        return [(n.op, tuple(rename.get(i, i) for i in n.inputs),
                 {k: (self.kv_slot[v] if k == "layer" else v) for k, v in n.attrs.items()})
                for n in self.stages[s]] + [tuple(rename.get(v) for v in self.carry[s + 1])]

    def shares_one_program(self) -> bool:
        """True when every stage runs the same program (else the step switches on the stage)."""
        return all(self._signature(s) == self._signature(0) for s in range(1, self.pp))

    def step_fn(self, attention: str, microbatches: int):
        self.attention = attention
        pp, mesh, graph = self.pp, self.mesh, self.graph
        tp = mesh.shape["tp"]
        outer = TensorParallel(mesh, self.rules)
        inner = TensorParallel(mesh, self.rules, manual=frozenset({"pp"})) if tp > 1 else None
        fns = [self._stage_fn(s, inner) for s in range(pp)]
        uniform = self.shares_one_program()
        M = microbatches
        widest = [graph.type_of(v) for v in max(self.carry, key=len)]
        tok_inputs = [k for k, t in graph.inputs.items() if t.shape[:1] == ("T",)]
        other_inputs = [k for k in graph.inputs if k not in tok_inputs]

        def stages(slot_params, kv, mb_tok, whole, bcast, x0):
            # per device: slot_params/kv [1, ...] (its stage), mb_tok/bcast/x0 [M, T/M, ...]
            stage = jax.lax.axis_index("pp")
            slot_params = {k: v[0] for k, v in slot_params.items()}
            kv = [{k: v[0] for k, v in e.items()} for e in kv]
            size = mb_tok["token_ids"].shape[1]  # tokens per micro-batch

            def tick(state, t):
                act, kv, out = state
                m = t - stage
                valid = (m >= 0) & (m < M)
                mc = jnp.clip(m, 0, M - 1)
                env = {k: v[mc] for k, v in mb_tok.items()}
                env["slot_mapping"] = jnp.where(valid, env["slot_mapping"], -1)
                env.update({k: v[mc] for k, v in bcast.items()})
                env.update(whole)
                first = tuple(x[mc] for x in x0)
                cin = tuple(jnp.where(stage == 0, f, a) for f, a in zip(first, act))
                window = (mc * size, size)  # block_tables & co. describe the whole batch
                if uniform:
                    cout, kv = fns[0](slot_params, kv, env, cin, window)
                else:
                    cout, kv = jax.lax.switch(stage, fns, slot_params, kv, env, cin, window)
                out = tuple(jax.lax.dynamic_update_index_in_dim(
                    o, jnp.where(valid, c, o[mc]), mc, 0) for o, c in zip(out, cout))
                act = tuple(jax.lax.ppermute(c, "pp", [(i, i + 1) for i in range(pp - 1)]) for c in cout)
                return (act, kv, out), None

            act0 = tuple(jnp.zeros_like(x[0]) for x in x0)
            out0 = tuple(jnp.zeros_like(x) for x in x0)
            (_, kv, out), _ = jax.lax.scan(tick, (act0, kv, out0), jnp.arange(M + pp - 1))
            kv = [{k: v[None] for k, v in e.items()} for e in kv]
            return kv, tuple(o[None] for o in out)

        staged = jax.shard_map(stages, mesh=mesh, axis_names={"pp"}, check_vma=False,
                               in_specs=(P("pp"), P("pp"), P(), P(), P(), P()),
                               out_specs=(P("pp"), P("pp")))

        def step(params, kv_cache, inputs):
            T = inputs["token_ids"].shape[0]
            Tp = -(-T // M) * M
            pad = {k: jnp.pad(inputs[k], (0, Tp - T), constant_values=-1 if k == "slot_mapping" else 0)
                   for k in tok_inputs}
            env = {**inputs, **pad, **{k: v for k, v in params.items() if k in graph.params}}
            ctx = LowerCtx([], attention, outer)
            env = _run(self.prologue, env, ctx, outer)
            mb = lambda x: x.reshape((M, Tp // M) + x.shape[1:])  # noqa: E731
            slot_params = {k: v for k, v in params.items() if k in self.stacked}
            kv_cache, out = staged(slot_params, kv_cache, {k: mb(pad[k]) for k in tok_inputs},
                                   {k: inputs[k] for k in other_inputs}, {k: mb(env[k]) for k in self.bcast},
                                   tuple(mb(env[v]) for v in self.carry[0]) + tuple(
                                       jnp.zeros((M, Tp // M) + t.shape[1:], t.dtype)
                                       for t in widest[len(self.carry[0]):]))
            # the last stage's outputs: [pp, M, T/M, ...] -> [Tp, ...]
            for v, o in zip(self.carry[pp], out):
                env[v] = o[pp - 1].reshape((Tp,) + o.shape[3:])
            env = _run(self.epilogue, env, ctx, outer)
            res = env[graph.outputs[0]] if len(graph.outputs) == 1 else tuple(env[o] for o in graph.outputs)
            return res, kv_cache

        return step


def build_pipeline(graph: Graph, params: dict | None, mesh: Mesh, rules: ShardingRules, *,
                   attention: str = "reference", microbatches: int | None = None) -> ShardedModel:
    """The `ShardedModel` of `graph` on a mesh with pp > 1 (see `sharding.shard_model`)."""
    layout = StageLayout.build(graph, mesh, rules)
    pp = mesh.shape["pp"]
    M = microbatches or pp
    if M < 1:
        raise ConfigError(f"microbatches={M} must be at least 1")
    shardings = layout.shardings()
    rep = NamedSharding(mesh, P())
    kv_sh = layout.kv_sharding()
    kv_shardings = [{"k": kv_sh, "v": kv_sh} for _ in layout.kv_stacked]
    raw = layout.step_fn(attention, M)
    step = jax.jit(raw, in_shardings=(shardings, kv_shardings, rep), out_shardings=(rep, kv_shardings),
                   donate_argnums=(1,))
    model = ShardedModel(graph, mesh, rules, mesh.shape["tp"], pp, {}, shardings, kv_sh, step, layout, raw_step=raw)
    if params is not None:
        model.params = model.place(params)
    return model

