"""The Kiln IR and the model-definition API (owner: graph)."""

from kiln.graph.builder import Builder, Value
from kiln.graph.ir import STEP_INPUTS, Graph, KVLayer, Node, Param, TensorType
from kiln.graph.lower import lower
from kiln.graph.ops import REGISTRY, LowerCtx, register_op
from kiln.graph.serialize import dumps, from_json, load, loads, save, to_json, to_text
from kiln.graph.verify import verify

__all__ = ["Builder", "Value", "Graph", "KVLayer", "Node", "Param", "TensorType", "STEP_INPUTS", "lower",
           "REGISTRY", "LowerCtx", "register_op", "dumps", "loads", "save", "load", "to_json", "from_json",
           "to_text", "verify"]

import kiln.passes.ops  # noqa: E402,F401  (fused and quantized ops join the registry with the graph package)
