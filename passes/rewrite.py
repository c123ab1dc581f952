"""The rewrite machinery: patterns over the graph, rules as data, and the cleanup passes.

A `Pat` describes a tree of values rooted at one node::

    Pat("rms_norm", Pat("add", A, B, name="sum"), W, name="norm")

matches `%norm = rms_norm(%sum, %w)` with `%sum = add(%a, %b)` and binds `a, b, w, sum,
norm` to value names (a name bound twice must be the same value: that is how a pattern
says "the three linears read the same x"). A `Rule` pairs a pattern with a rewrite
`fn(rw: Rewriter, m: Match) -> None | False`; the rewrite adds nodes and parameters through
the `Rewriter`, redirects uses with `rw.replace`, and declares the weight transform that
keeps the parameters in step with the graph. Returning False declines the match.

`apply_rules` sweeps the nodes in order, tries each rule at each node, then drops dead
nodes and parameters and re-sorts the nodes topologically (stable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from kiln.errors import GraphError
from kiln.graph.ir import Graph, Node, Param, TensorType, fresh_name
from kiln.graph.ops import ShapeError, get_op

# ops whose node must run even when nothing reads its output (they write the KV cache)
SIDE_EFFECT_OPS: set[str] = {"attention", "rope_attention", "qkv_attention"}


@dataclass(frozen=True)
class Pat:
    """A pattern over one value. `op` None matches any value; "param" / "input" match a
    declared parameter / step input; any other string (or tuple of strings) matches a node
    of that op whose inputs match `inputs` in order. Trailing `optional` patterns may be
    missing; `rest` binds the remaining inputs (a tuple of names). `where(node_or_param)`
    adds a condition."""
    op: str | tuple[str, ...] | None = None
    inputs: tuple["Pat", ...] = ()
    name: str | None = None
    rest: str | None = None
    where: Callable[[Any], bool] | None = None
    optional: bool = False

    def __init__(self, op=None, *inputs, name=None, rest=None, where=None, optional=False):
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "inputs", tuple(inputs))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "rest", rest)
        object.__setattr__(self, "where", where)
        object.__setattr__(self, "optional", optional)


def Any_(name: str) -> Pat:
    return Pat(None, name=name)


def Param_(name: str, optional: bool = False, where=None) -> Pat:
    return Pat("param", name=name, optional=optional, where=where)


def Input_(input_name: str) -> Pat:
    return Pat("input", where=lambda v: v == input_name)


class Match(dict):
    """Bound names -> value names (or tuples of names for `rest`); `.node(x)` the node."""

    def __init__(self, graph_view: "Rewriter"):
        super().__init__()
        self._rw = graph_view

    def node(self, key: str) -> Node:
        return self._rw.producer[self[key]]

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _bind(m: Match, name: str | None, value) -> bool:
    if name is None:
        return True
    if name in m:
        return m[name] == value
    m[name] = value
    return True


def match(rw: "Rewriter", pat: Pat, value: str, m: Match) -> bool:
    """Match `pat` against the value `value`, extending the bindings `m` (in place)."""
    if pat.op is None:
        return _bind(m, pat.name, value)
    if pat.op == "param":
        if value not in rw.params or (pat.where and not pat.where(rw.params[value])):
            return False
        return _bind(m, pat.name, value)
    if pat.op == "input":
        if value not in rw.graph.inputs or (pat.where and not pat.where(value)):
            return False
        return _bind(m, pat.name, value)
    node = rw.producer.get(value)
    ops = (pat.op,) if isinstance(pat.op, str) else pat.op
    if node is None or node.op not in ops or (pat.where and not pat.where(node)):
        return False
    required = sum(1 for p in pat.inputs if not p.optional)
    if len(node.inputs) < required or (pat.rest is None and len(node.inputs) > len(pat.inputs)):
        return False
    for p, v in zip(pat.inputs, node.inputs):
        if not match(rw, p, v, m):
            return False
    if pat.rest is not None and not _bind(m, pat.rest, tuple(node.inputs[len(pat.inputs):])):
        return False
    return _bind(m, pat.name, value)


def array_module(a):
    """numpy for host arrays, jax.numpy for device arrays: weight transforms take either."""
    import numpy as np

    if isinstance(a, np.ndarray) or np.isscalar(a):
        return np
    import jax.numpy as jnp

    return jnp


@dataclass(frozen=True)
class WeightTransform:
    """`fn(*arrays_of_inputs) -> tuple of arrays for outputs`, run once at build time.
    Arrays may be host numpy or device jax arrays; `fn` must accept both."""
    outputs: tuple[str, ...]
    inputs: tuple[str, ...]
    fn: Callable[..., tuple]


@dataclass(frozen=True)
class Rule:
    """One rewrite: `# before -> after` lives in a comment beside each rule's definition."""
    name: str
    pattern: Pat
    rewrite: Callable[["Rewriter", Match], Any]


@dataclass
class RewriteResult:
    graph: Graph
    transforms: list[WeightTransform] = field(default_factory=list)
    fired: dict[str, int] = field(default_factory=dict)


class Rewriter:
    """The graph under rewrite. New nodes go in front of the node being matched; the final
    order is fixed by a stable topological sort."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.params: dict[str, Param] = dict(graph.params)
        self.nodes: list[Node] = []
        self.producer: dict[str, Node] = {}
        self.renames: dict[str, str] = {}
        self.removed: set[str] = set()
        self.transforms: list[WeightTransform] = []
        self.uses: dict[str, int] = {}
        for n in graph.nodes:
            for i in n.inputs:
                self.uses[i] = self.uses.get(i, 0) + 1
        for o in graph.outputs:
            self.uses[o] = self.uses.get(o, 0) + 1
        self._names = set(graph.inputs) | set(graph.params) | {n.name for n in graph.nodes}

    # -- for rewrites
    def type_of(self, name: str) -> TensorType:
        if name in self.params:
            return self.params[name].type
        if name in self.graph.inputs:
            return self.graph.inputs[name]
        return self.producer[name].type

    def single_use(self, name: str) -> bool:
        """Whether exactly one node (or output) of the graph being rewritten reads `name`."""
        return self.uses.get(name, 0) == 1

    def fresh(self, base: str) -> str:
        return fresh_name(base, self._names)

    def param(self, name: str, shape, dtype: str, axes, init: str = "normal", **init_args) -> str:
        if name in self.params:
            raise GraphError(f"rewrite declares parameter {name!r} twice")
        self._names.add(name)
        self.params[name] = Param(name, TensorType(tuple(shape), dtype, tuple(axes)), init, dict(init_args))
        return name

    def retype_param(self, name: str, shape, dtype: str, axes=None, init: str | None = None) -> str:
        """Change a declared parameter in place (its weight transform must produce this)."""
        p = self.params[name]
        self.params[name] = Param(name, TensorType(tuple(shape), dtype, tuple(axes) if axes else p.type.axes),
                                  init or p.init, p.init_args)
        return name

    def node(self, op: str, *inputs: str, name: str, **attrs) -> str:
        inputs = tuple(self.renames.get(i, i) for i in inputs if i is not None)
        name = self.fresh(name)
        try:
            t = get_op(op).shape(attrs, *[self.type_of(i) for i in inputs])
        except ShapeError as e:
            raise GraphError(f"rewrite made an ill-typed node {name!r} ({op}): {e}") from None
        n = Node(name, op, inputs, dict(attrs), t)
        self.nodes.append(n)
        self.producer[name] = n
        return name

    def replace(self, old: str, new: str):
        """Every later use of `old` (and the graph outputs) reads `new` instead."""
        self.renames[old] = new

    def remove(self, name: str):
        """Drop the node `name` even if it writes the KV cache (its replacement does now)."""
        self.removed.add(name)

    def weights(self, outputs, inputs, fn):
        self.transforms.append(WeightTransform(tuple(outputs), tuple(inputs), fn))

    # -- driver
    def _emit(self, node: Node):
        node = Node(node.name, node.op, tuple(self.renames.get(i, i) for i in node.inputs), node.attrs, node.type)
        self.nodes.append(node)
        self.producer[node.name] = node
        return node

    def resolve(self, name: str, reader: str | None = None) -> str:
        seen = set()
        while name in self.renames and name not in seen and self.renames[name] != reader:
            seen.add(name)
            name = self.renames[name]
        return name

    def finish(self) -> Graph:
        outputs = [self.resolve(o) for o in self.graph.outputs]
        nodes = [Node(n.name, n.op, tuple(self.resolve(i, n.name) for i in n.inputs), n.attrs, n.type)
                 for n in self.nodes if n.name not in self.removed]
        g = Graph(self.graph.name, dict(self.graph.inputs), dict(self.params), nodes, outputs,
                  list(self.graph.kv_layers), dict(self.graph.meta))
        return toposort(dce(g))


def apply_rules(graph: Graph, rules: list[Rule], *, max_sweeps: int = 4) -> RewriteResult:
    """Sweep `rules` over the nodes until none fires (at most `max_sweeps` sweeps)."""
    fired: dict[str, int] = {}
    transforms: list[WeightTransform] = []
    for _ in range(max_sweeps):
        rw = Rewriter(graph)
        changed = False
        for node in graph.nodes:
            node = rw._emit(node)
            for rule in rules:
                m = Match(rw)
                if match(rw, rule.pattern, node.name, m) and rule.rewrite(rw, m) is not False:
                    fired[rule.name] = fired.get(rule.name, 0) + 1
                    changed = True
                    break
        graph = rw.finish()
        transforms += rw.transforms
        if not changed:
            break
    return RewriteResult(graph, transforms, fired)


# --------------------------------------------------------------------------- cleanup passes


def dce(g: Graph) -> Graph:
    """Dead-code elimination: drop nodes nothing live reads (KV-writing nodes stay live) and
    parameters no node reads."""
    live = set(g.outputs)
    keep = []
    for n in reversed(g.nodes):
        if n.name in live or n.op in SIDE_EFFECT_OPS:
            keep.append(n)
            live.update(n.inputs)
    keep.reverse()
    params = {k: p for k, p in g.params.items() if k in live}
    inputs = {k: t for k, t in g.inputs.items() if k in live}
    return Graph(g.name, inputs, params, keep, list(g.outputs), list(g.kv_layers), dict(g.meta))


def _key(n: Node):
    import json

    return (n.op, n.inputs, json.dumps(n.attrs, sort_keys=True))


def cse(g: Graph) -> Graph:
    """Common-subexpression elimination: a node with the same op, inputs and attributes as an
    earlier one reads the earlier one's value instead (KV-writing nodes are never merged)."""
    seen: dict[tuple, str] = {}
    renames: dict[str, str] = {}
    nodes = []
    for n in g.nodes:
        n = Node(n.name, n.op, tuple(renames.get(i, i) for i in n.inputs), n.attrs, n.type)
        if n.op not in SIDE_EFFECT_OPS:
            k = _key(n)
            if k in seen:
                renames[n.name] = seen[k]
                continue
            seen[k] = n.name
        nodes.append(n)
    outputs = [renames.get(o, o) for o in g.outputs]
    return Graph(g.name, dict(g.inputs), dict(g.params), nodes, outputs, list(g.kv_layers), dict(g.meta))


def toposort(g: Graph) -> Graph:
    """Order nodes so each follows its inputs, keeping the given order where it already holds."""
    by_name = {n.name: n for n in g.nodes}
    done: set[str] = set()
    open_: set[str] = set()
    order: list[Node] = []
    for root in g.nodes:
        stack = [(root, False)]
        while stack:
            n, expanded = stack.pop()
            if n.name in done:
                continue
            if expanded:
                done.add(n.name)
                order.append(n)
                continue
            if n.name in open_:
                raise GraphError(f"node {n.name!r} ({n.op}) depends on itself (a rewrite made a cycle)")
            open_.add(n.name)
            stack.append((n, True))
            for i in reversed(n.inputs):
                if i in by_name and i not in done:
                    stack.append((by_name[i], False))
    return Graph(g.name, dict(g.inputs), dict(g.params), order, list(g.outputs), list(g.kv_layers), dict(g.meta))
