"""The Kiln IR: a flat list of typed nodes over named values.

Every value has a unique name and a `TensorType`. Values are of four kinds:

    input   a step input (token ids, positions, block tables ...), symbolic dims allowed
    param   a declared weight (shape, dtype, logical axes, initializer)
    node    the output of one op applied to earlier values
    (const) none: constants live in node attributes, so attributes stay JSON-able

Dims are ints or symbolic names (``"T"`` tokens in the flat batch, ``"S"`` sequences,
``"B"`` blocks per sequence, ``"L"`` rows of logits). Nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Union

Dim = Union[int, str]

DTYPES = ("float32", "bfloat16", "float16", "int32", "int8", "uint8", "int4", "float8_e4m3fn", "bool")


def fresh_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first not in `taken`, which it is added to."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str
    axes: tuple[str | None, ...] | None = None  # logical axis names, one per dim

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(self.shape))
        if self.axes is not None:
            object.__setattr__(self, "axes", tuple(self.axes))
            if len(self.axes) != len(self.shape):
                raise ValueError(f"axes {self.axes} do not match shape {self.shape}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {DTYPES}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_(self, **changes) -> "TensorType":
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        dims = ",".join(str(d) for d in self.shape)
        s = f"{_SHORT.get(self.dtype, self.dtype)}[{dims}]"
        if self.axes and any(a is not None for a in self.axes):
            s += "(" + ",".join(a or "_" for a in self.axes) + ")"
        return s


_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int32": "i32", "int8": "i8",
          "uint8": "u8", "int4": "i4", "float8_e4m3fn": "f8e4m3", "bool": "bool"}


@dataclass(frozen=True)
class Param:
    """A declared weight. `init` names an initializer (`normal`, `zeros`, `ones`) with its
    JSON-able arguments in `init_args`; random init, loading, sharding and quantization
    all read this one declaration."""
    name: str
    type: TensorType
    init: str = "normal"
    init_args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Node:
    name: str                 # the output value's name
    op: str
    inputs: tuple[str, ...]   # names of inputs, params or earlier nodes
    attrs: dict[str, Any]
    type: TensorType          # declared output type; the verifier re-derives it

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))


@dataclass(frozen=True)
class KVLayer:
    """One attention layer's slot in the paged KV cache.

    Pool layout per layer (K and V alike)::

        [num_kv_heads, num_blocks, block_size, head_dim]
    """
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None


@dataclass
class Graph:
    name: str
    inputs: dict[str, TensorType]
    params: dict[str, Param]
    nodes: list[Node]
    outputs: list[str]
    kv_layers: list[KVLayer]
    meta: dict[str, Any] = field(default_factory=dict)

    def type_of(self, name: str) -> TensorType:
        if name in self.inputs:
            return self.inputs[name]
        if name in self.params:
            return self.params[name].type
        node = self.node_map().get(name)
        if node is None:
            raise KeyError(name)
        return node.type

    def node_map(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def users(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                out.setdefault(i, []).append(n)
        return out

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def copy(self) -> "Graph":
        return Graph(self.name, dict(self.inputs), dict(self.params), list(self.nodes),
                     list(self.outputs), list(self.kv_layers), dict(self.meta))


# The step inputs every graph takes. Tokens of one sequence are contiguous in the flat batch.
#
#   token_ids[T]         token to embed            positions[T]      its position in its sequence
#   seq_ids[T]           its sequence (row of the per-sequence arrays)
#   slot_mapping[T]      flat KV slot (block * block_size + offset) to write; -1 = padding
#   block_tables[S, B]   KV blocks of each sequence, in order
#   context_lens[S]      tokens in the cache per sequence after this step
#   seq_lens[S]          the sequence's whole length (known tokens, >= context_lens while a
#                        prefill is chunked): what length-dependent RoPE (LongRoPE) reads
#   query_start_loc[S+1] where each sequence's new tokens start in the flat batch
#   logits_indices[L]    flat rows whose logits the step returns
STEP_INPUTS: dict[str, TensorType] = {
    "token_ids": TensorType(("T",), "int32"),
    "positions": TensorType(("T",), "int32"),
    "seq_ids": TensorType(("T",), "int32"),
    "slot_mapping": TensorType(("T",), "int32"),
    "block_tables": TensorType(("S", "B"), "int32"),
    "context_lens": TensorType(("S",), "int32"),
    "seq_lens": TensorType(("S",), "int32"),
    "query_start_loc": TensorType(("S+1",), "int32"),
    "logits_indices": TensorType(("L",), "int32"),
}
