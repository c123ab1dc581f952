"""The verifier: every value defined once before use, every op known, every node's declared
type equal to what its op's shape rule derives. Errors name the node."""

from __future__ import annotations

from kiln.errors import GraphError
from kiln.graph.ir import Graph
from kiln.graph.ops import REGISTRY, ShapeError


def verify(g: Graph) -> Graph:
    types = dict(g.inputs)
    for name, p in g.params.items():
        if name != p.name:
            raise GraphError(f"parameter {name!r} is registered under the name {p.name!r}")
        if any(not isinstance(d, int) or d <= 0 for d in p.type.shape):
            raise GraphError(f"parameter {name!r} has a non-static shape {p.type.shape}")
        types[name] = p.type
    for node in g.nodes:
        where = f"node {node.name!r} ({node.op})"
        if node.name in types:
            raise GraphError(f"{where}: name already defined")
        opdef = REGISTRY.get(node.op)
        if opdef is None:
            raise GraphError(f"{where}: unknown op; registered ops: {', '.join(sorted(REGISTRY))}")
        missing = [i for i in node.inputs if i not in types]
        if missing:
            raise GraphError(f"{where}: input {missing[0]!r} is not defined before this node")
        if not opdef.min_inputs <= len(node.inputs) <= opdef.max_inputs:
            raise GraphError(f"{where}: takes {opdef.min_inputs}..{opdef.max_inputs} inputs, got {len(node.inputs)}")
        try:
            derived = opdef.shape(node.attrs, *[types[i] for i in node.inputs])
        except ShapeError as e:
            raise GraphError(f"{where}: {e}") from None
        if (derived.shape, derived.dtype) != (node.type.shape, node.type.dtype):
            raise GraphError(f"{where}: declared type {node.type} but its inputs give {derived}")
        if node.op == "attention" and not 0 <= node.attrs["layer"] < len(g.kv_layers):
            raise GraphError(f"{where}: KV layer {node.attrs['layer']} does not exist ({len(g.kv_layers)} declared)")
        types[node.name] = node.type
    for out in g.outputs:
        if out not in types:
            raise GraphError(f"graph output {out!r} is not defined")
    if not g.outputs:
        raise GraphError("graph has no outputs")
    return g
