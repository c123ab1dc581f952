"""The model-definition API. Model authors write plain Python against a `Builder`:

    x = b.embedding(b.param("embed", (V, E), ("vocab", "embed")), b.input("token_ids"))
    with b.scope("layers.0"):
        h = b.rms_norm(x, b.param("attn_norm", (E,), ("embed",), init="ones"), eps=1e-5)

Every op in the registry is a method (`b.linear`, `b.rope`, ...); each call checks its
shape rule at once, so a wrong edge fails where the model author wrote it.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

from kiln.errors import GraphError
from kiln.graph.ir import STEP_INPUTS, Graph, KVLayer, Node, Param, TensorType, fresh_name
from kiln.graph.ops import ShapeError, get_op


@dataclass(frozen=True)
class Value:
    """A symbolic tensor: a name in the graph and its type."""
    name: str
    type: TensorType

    @property
    def shape(self):
        return self.type.shape

    @property
    def dtype(self):
        return self.type.dtype


class Builder:
    def __init__(self, name: str, dtype: str = "float32"):
        self.name = name
        self.dtype = dtype
        self._inputs: dict[str, TensorType] = {}
        self._params: dict[str, Param] = {}
        self._nodes: list[Node] = []
        self._names: set[str] = set()
        self._outputs: list[str] = []
        self._kv_layers: list[KVLayer] = []
        self._prefix: list[str] = []
        self.meta: dict = {}

    # -- naming
    @contextlib.contextmanager
    def scope(self, prefix: str):
        self._prefix.append(prefix)
        try:
            yield
        finally:
            self._prefix.pop()

    def _qualify(self, name: str) -> str:
        return ".".join(self._prefix + [name])

    def _fresh(self, base: str) -> str:
        return fresh_name(base, self._names)

    # -- declarations
    def input(self, name: str) -> Value:
        if name not in STEP_INPUTS:
            raise GraphError(f"unknown step input {name!r}; step inputs are {', '.join(STEP_INPUTS)}")
        if name not in self._inputs:
            self._inputs[name] = STEP_INPUTS[name]
            self._names.add(name)
        return Value(name, self._inputs[name])

    def param(self, name: str, shape, axes, init: str = "normal", dtype: str | None = None, **init_args) -> Value:
        full = self._qualify(name)
        if full in self._params:
            raise GraphError(f"parameter {full!r} declared twice")
        t = TensorType(tuple(shape), dtype or self.dtype, tuple(axes))
        self._params[full] = Param(full, t, init, dict(init_args))
        self._names.add(full)
        return Value(full, t)

    def kv_layer(self, num_kv_heads: int, head_dim: int, sliding_window: int | None = None) -> int:
        """Reserve a KV cache slot for one attention layer; returns its index."""
        self._kv_layers.append(KVLayer(num_kv_heads, head_dim, sliding_window))
        return len(self._kv_layers) - 1

    # -- ops
    def op(self, op: str, *inputs: Value | None, name: str | None = None, **attrs) -> Value:
        opdef = get_op(op)
        attrs = json.loads(json.dumps(attrs))  # attributes are JSON data: tuples become lists now, not on reload
        args = [v for v in inputs if v is not None]
        node_name = self._fresh(self._qualify(name or op))
        if not opdef.min_inputs <= len(args) <= opdef.max_inputs:
            raise GraphError(f"node {node_name!r} ({op}): takes {opdef.min_inputs}..{opdef.max_inputs} inputs, got {len(args)}")
        try:
            t = opdef.shape(attrs, *[a.type for a in args])
        except ShapeError as e:
            raise GraphError(f"node {node_name!r} ({op}): {e}") from None
        self._nodes.append(Node(node_name, op, tuple(a.name for a in args), dict(attrs), t))
        return Value(node_name, t)

    def __getattr__(self, op: str):
        if op.startswith("_"):
            raise AttributeError(op)
        return lambda *inputs, **attrs: self.op(op, *inputs, **attrs)

    def output(self, v: Value):
        self._outputs.append(v.name)

    def build(self) -> Graph:
        from kiln.graph.verify import verify

        g = Graph(self.name, dict(self._inputs), dict(self._params), list(self._nodes),
                  list(self._outputs), list(self._kv_layers), dict(self.meta))
        verify(g)
        return g
