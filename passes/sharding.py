"""Sharding: logical axes -> mesh axes through one `ShardingRules` table.

Model code names its axes (`("embed", "heads")`); this table alone decides where they go.
The default is Megatron-style tensor parallelism over the mesh axis `tp`:

    q/k/v_proj.w  [embed, heads|kv_heads]  column-parallel: each device owns whole heads
    gate/up.w     [embed, mlp]             column-parallel
    o_proj.w      [heads, embed]           row-parallel: partial sums, one all-reduce
    down_proj.w   [mlp, embed]             row-parallel: partial sums, one all-reduce
    embed         [vocab, embed]           vocab-parallel: masked lookup + all-reduce
    lm_head.w     [embed, vocab]           vocab-parallel logits, gathered at the end
    KV pools      [kv_heads, blocks, block_size, head_dim]   split by kv heads

The fused layouts (QKV [embed, kv_heads, group + 2, head_dim], gate_up [embed, 2, mlp],
quantization scales with their weight's output axes) follow from the same table.

The mesh is `("pp", "tp")`. XLA's partitioner (GSPMD) splits the matmuls from the weights'
placement; attention runs inside `shard_map` over `tp`, each device on its own kv heads
(query head h reads kv head h // group, so contiguous splits stay aligned when tp divides
the kv heads). Pipeline parallelism (`pp > 1`) is in `passes/pipeline_parallel.py`.

    model = shard_model(graph, params, tp=2)
    kv = model.allocate_kv_cache(num_blocks, block_size, "float32")
    logits, kv = model.step(model.params, kv, inputs)      # kv is donated
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kiln.errors import ConfigError
from kiln.graph import Graph
from kiln.graph.ir import TensorType


@dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (None = replicated). One line per logical axis."""
    axes: dict[str, str | None] = field(default_factory=lambda: {
        "vocab": "tp",
        "embed": None,
        "heads": "tp",
        "kv_heads": "tp",
        "mlp": "tp",
        "experts": None,  # MoE expert weights [experts, in, out]: EP_RULES splits them
    })

    def spec(self, t: TensorType, mesh) -> P:
        """The PartitionSpec of a tensor from its logical axes on `mesh` (a Mesh or a dict of
        axis sizes). A dim whose size the mesh axis does not divide (or that is symbolic)
        stays replicated; a mesh axis is used once."""
        if not t.axes:
            return P()
        sizes = getattr(mesh, "shape", mesh)
        out, used = [], set()
        for dim, logical in zip(t.shape, t.axes):
            m = self.axes.get(logical) if logical else None
            if m is None or m in used or sizes.get(m, 1) == 1 or not isinstance(dim, int) or dim % sizes[m]:
                out.append(None)
            else:
                out.append(m)
                used.add(m)
        while out and out[-1] is None:
            out.pop()
        return P(*out)


TP_RULES = ShardingRules()
# expert parallelism over the tp devices: each device holds whole experts (a mesh axis is
# used once per tensor, so an expert's own mlp dim then stays whole); attention stays tp
EP_RULES = ShardingRules({**TP_RULES.axes, "experts": "tp"})


# --------------------------------------------------------------------------- layout checks


def attention_heads(graph: Graph) -> list[tuple[int, int]]:
    """(query heads, kv heads) of every attention node, fused forms included (their output
    is [T, heads, head_dim]; `layer` names their KV slot)."""
    return [(n.type.shape[1], graph.kv_layers[n.attrs["layer"]].num_kv_heads)
            for n in graph.nodes if "attention" in n.op and "layer" in n.attrs]


def num_layers(graph: Graph) -> int:
    return graph.meta.get("num_layers") or len(graph.kv_layers)


def validate_layout(graph: Graph, tp: int, pp: int, num_devices: int) -> None:
    """Raise `ConfigError` naming the numbers when (tp, pp) cannot run `graph`."""
    if tp < 1 or pp < 1:
        raise ConfigError(f"tp={tp} and pp={pp} must both be at least 1")
    if tp * pp > num_devices:
        raise ConfigError(f"tp={tp} x pp={pp} needs {tp * pp} devices but only {num_devices} are available; "
                          f"lower tp or pp")
    for h, kvh in sorted(set(attention_heads(graph)) | {(kv.num_kv_heads, kv.num_kv_heads) for kv in graph.kv_layers}):
        if kvh % tp:
            raise ConfigError(f"tp={tp} does not divide the {kvh} kv heads of {graph.name}; "
                              f"choose tp among {_divisors(kvh)}")
        if h % tp:
            raise ConfigError(f"tp={tp} does not divide the {h} attention heads of {graph.name}; "
                              f"choose tp among {_divisors(h)}")
    layers = num_layers(graph)
    if pp > layers:
        raise ConfigError(f"pp={pp} pipeline stages but {graph.name} has only {layers} layers; "
                          f"use pp <= {layers}")


def placement_plan(graph: Graph, tp: int, pp: int, rules: ShardingRules = TP_RULES) -> str:
    """Where each parameter goes on a (pp, tp) mesh, as text (`kiln graph MODEL --tp N --pp M`).
    Validates the layout against the graph (not against the devices of this machine)."""
    from kiln.passes.pipeline_parallel import split_layers

    validate_layout(graph, tp, pp, tp * pp)
    sizes = {"pp": pp, "tp": tp}
    stage = {i: s for s, r in enumerate(split_layers(num_layers(graph), pp)) for i in r}
    lines = [f"# {graph.name}: tp={tp} x pp={pp} = {tp * pp} devices; kv pools split by kv heads over tp"]
    lines += [f"# stage {s}: layers {r.start}..{r.stop - 1}"
              for s, r in enumerate(split_layers(num_layers(graph), pp))]
    for name, p in graph.params.items():
        spec = rules.spec(p.type, sizes)
        layer = name.split(".")[1] if name.startswith("layers.") else None
        where = f"stage {stage[int(layer)]}" if layer is not None and pp > 1 else "all stages"
        per_dev = [d // sizes[m] if m else d for d, m in zip(p.type.shape, tuple(spec) + (None,) * 8)]
        lines.append(f"{name:32s} {str(p.type):34s} {str(spec):22s} {where:10s} per device {tuple(per_dev)}")
    return "\n".join(lines)


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Join a multi-process (multi-host) run: the same program on every process, each with its
    own devices; `jax.devices()` then lists all of them and `shard_model` spans them. On the
    CPU the collectives go through gloo."""
    if "jax_cpu_collectives_implementation" in jax.config.values:  # only the CPU client reads it
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def make_mesh(tp: int = 1, pp: int = 1, devices=None) -> Mesh:
    """A `("pp", "tp")` mesh over the first tp * pp devices (all processes' devices, in
    jax.devices() order: tp neighbours share a host first)."""
    devices = list(jax.devices() if devices is None else devices)
    if tp * pp > len(devices):
        raise ConfigError(f"tp={tp} x pp={pp} needs {tp * pp} devices but only {len(devices)} are available; "
                          f"lower tp or pp")
    return Mesh(np.array(devices[:tp * pp], dtype=object).reshape(pp, tp), ("pp", "tp"))


# --------------------------------------------------------------------------- placement


def param_shardings(graph: Graph, mesh: Mesh, rules: ShardingRules = TP_RULES) -> dict[str, NamedSharding]:
    return {name: NamedSharding(mesh, rules.spec(p.type, mesh)) for name, p in graph.params.items()}


def put_global(x, sharding: NamedSharding):
    """Place a host (numpy) or device array with `sharding`. Works across processes: each
    process supplies the same host value and fills only its own devices."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and x.is_fully_addressable and sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_host(x) -> np.ndarray:
    """A replicated (or fully addressable) array as numpy, on any process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(x.addressable_shards[0].data)


def kv_pool_spec(mesh: Mesh, rules: ShardingRules = TP_RULES, lead: tuple = ()) -> P:
    """Pools [kv_heads, blocks, block_size, head_dim] split by kv heads (after `lead` dims)."""
    return P(*lead, rules.axes.get("kv_heads"))


class TensorParallel:
    """The `shard` hook `graph.lower` takes: constrains each node's output to its logical axes
    and runs attention bodies inside `shard_map` over the kv heads."""

    def __init__(self, mesh: Mesh, rules: ShardingRules = TP_RULES, *, manual: frozenset = frozenset()):
        self.mesh, self.rules = mesh, rules
        self.axis = rules.axes.get("kv_heads")
        self.manual = manual  # mesh axes already manual around the step (pipeline stages)

    def constrain(self, x, t: TensorType):
        if self.manual or x.ndim != len(t.shape):
            return x  # inside a pipeline stage GSPMD propagates from the weights alone
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.rules.spec(t, self.mesh)))

    def attention(self, fn: Callable) -> Callable:
        """fn(impl, entry, q, k, v, *meta, **attrs) -> (out, entry), run per kv-head shard."""
        axis = self.axis

        def run(impl, entry, q, k, v, *meta, **attrs):
            kvh = k.shape[1]
            heads = P(None, axis)
            entry_spec = jax.tree.map(lambda a: P(axis) if a.ndim and a.shape[0] == kvh else P(), entry)
            body = lambda e, q, k, v, *m: fn(impl, e, q, k, v, *m, **attrs)  # noqa: E731
            kw = dict(axis_names={axis}) if self.manual else dict(mesh=self.mesh)
            return jax.shard_map(body, in_specs=(entry_spec, heads, heads, heads) + (P(),) * len(meta),
                                 out_specs=(heads, entry_spec), check_vma=False, **kw)(entry, q, k, v, *meta)

        return run


# --------------------------------------------------------------------------- the sharded model


@dataclass
class ShardedModel:
    """A graph placed on a (pp, tp) mesh.

    `step(params, kv_cache, inputs) -> (logits, kv_cache)` has the signature of
    `graph.lower`'s step, jitted, with the cache donated and the logits replicated; inputs
    are host numpy arrays (the same on every process). `params` are placed; host weights
    stream in through `put(name, array)` (a `load_params` put callback) and `place`."""
    graph: Graph
    mesh: Mesh
    rules: ShardingRules
    tp: int
    pp: int
    params: dict[str, Any]
    param_shardings: dict[str, NamedSharding]
    kv_pool_sharding: NamedSharding
    _step: Callable
    _layout: Any = None   # pipeline layout (pp > 1): how layers map onto stages
    raw_step: Callable | None = None  # the un-jitted step, for callers that jit it with more around it

    def put(self, name: str, array):
        """A `load_params` put callback: places each weight as it is read. With pp > 1 a layer
        weight stays on the host until `place` stacks it with the other stages' (host memory
        then holds the layers once)."""
        if self._layout is not None and name in self._layout.slot_of:
            return np.asarray(array)
        return put_global(array, self.param_shardings[name])

    def place(self, params: dict) -> dict:
        if self._layout is not None:
            return self._layout.place(params)
        return {name: self.put(name, a) for name, a in params.items()}

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: str) -> list[dict]:
        """Zeroed pools made directly in their sharded place (never whole on one device)."""
        if self._layout is not None:
            return self._layout.allocate_kv_cache(num_blocks, block_size, dtype)
        shapes = [(kv.num_kv_heads, num_blocks, block_size, kv.head_dim) for kv in self.graph.kv_layers]
        make = jax.jit(lambda: [{"k": jnp.zeros(s, dtype), "v": jnp.zeros(s, dtype)} for s in shapes],
                       out_shardings=[{"k": self.kv_pool_sharding, "v": self.kv_pool_sharding} for _ in shapes])
        return make()

    def step(self, params, kv_cache, inputs):
        rep = NamedSharding(self.mesh, P())
        inputs = {k: put_global(np.asarray(v, np.int32), rep) for k, v in inputs.items()}
        return self._step(params, kv_cache, inputs)

    def lower_text(self, params, kv_cache, inputs) -> str:
        """The compiled (partitioned) HLO of the step for these shapes."""
        rep = NamedSharding(self.mesh, P())
        inputs = {k: put_global(np.asarray(v, np.int32), rep) for k, v in inputs.items()}
        return self._step.lower(params, kv_cache, inputs).compile().as_text()


def shard_model(graph: Graph, params: dict | None = None, *, tp: int = 1, pp: int = 1, devices=None,
                rules: ShardingRules = TP_RULES, attention: str = "reference",
                microbatches: int | None = None) -> ShardedModel:
    """Place `graph` (and `params`, host or device arrays, if given) on a (pp, tp) mesh and
    build its sharded step. Raises `ConfigError` naming the numbers for impossible layouts."""
    devices = list(jax.devices() if devices is None else devices)
    validate_layout(graph, tp, pp, len(devices))
    mesh = make_mesh(tp, pp, devices)
    kv_sharding = NamedSharding(mesh, kv_pool_spec(mesh, rules))
    if pp > 1:
        from kiln.passes.pipeline_parallel import build_pipeline

        return build_pipeline(graph, params, mesh, rules, attention=attention, microbatches=microbatches)

    from kiln.graph import lower

    shardings = param_shardings(graph, mesh, rules)
    rep = NamedSharding(mesh, P())
    kv_shardings = [{"k": kv_sharding, "v": kv_sharding} for _ in graph.kv_layers]
    raw = lower(graph, attention=attention, shard=TensorParallel(mesh, rules))
    step = jax.jit(raw, in_shardings=(shardings, kv_shardings, rep), out_shardings=(rep, kv_shardings),
                   donate_argnums=(1,))
    model = ShardedModel(graph, mesh, rules, tp, pp, {}, shardings, kv_sharding, step, raw_step=raw)
    if params is not None:
        model.params = model.place(params)
    return model
