"""Text printing and JSON save/load of graphs (JSON round-trips exactly)."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.errors import GraphError
from kiln.graph.ir import Graph, KVLayer, Node, Param, TensorType

FORMAT_VERSION = 1


def _type_to_json(t: TensorType) -> dict:
    return {"shape": list(t.shape), "dtype": t.dtype, "axes": list(t.axes) if t.axes is not None else None}


def _type_from_json(d: dict) -> TensorType:
    return TensorType(tuple(d["shape"]), d["dtype"], tuple(d["axes"]) if d["axes"] is not None else None)


def to_json(g: Graph) -> dict:
    return {
        "format": "kiln-graph", "version": FORMAT_VERSION, "name": g.name,
        "inputs": [{"name": k, **_type_to_json(t)} for k, t in g.inputs.items()],
        "params": [{"name": p.name, **_type_to_json(p.type), "init": p.init, "init_args": p.init_args}
                   for p in g.params.values()],
        "kv_layers": [{"num_kv_heads": kv.num_kv_heads, "head_dim": kv.head_dim, "sliding_window": kv.sliding_window}
                      for kv in g.kv_layers],
        "nodes": [{"name": n.name, "op": n.op, "inputs": list(n.inputs), "attrs": n.attrs, **_type_to_json(n.type)}
                  for n in g.nodes],
        "outputs": list(g.outputs),
        "meta": g.meta,
    }


def from_json(d: dict) -> Graph:
    if d.get("format") != "kiln-graph":
        raise GraphError("not a kiln graph: missing \"format\": \"kiln-graph\"")
    if d.get("version") != FORMAT_VERSION:
        raise GraphError(f"graph format version {d.get('version')} is not supported (expected {FORMAT_VERSION})")
    return Graph(
        name=d["name"],
        inputs={i["name"]: _type_from_json(i) for i in d["inputs"]},
        params={p["name"]: Param(p["name"], _type_from_json(p), p["init"], p["init_args"]) for p in d["params"]},
        nodes=[Node(n["name"], n["op"], tuple(n["inputs"]), n["attrs"], _type_from_json(n)) for n in d["nodes"]],
        outputs=list(d["outputs"]),
        kv_layers=[KVLayer(**kv) for kv in d["kv_layers"]],
        meta=d.get("meta", {}),
    )


def dumps(g: Graph) -> str:
    return json.dumps(to_json(g), indent=1)


def loads(s: str) -> Graph:
    return from_json(json.loads(s))


def save(g: Graph, path: str | Path):
    Path(path).write_text(dumps(g))


def load(path: str | Path) -> Graph:
    return loads(Path(path).read_text())


def _fmt_attrs(attrs: dict) -> str:
    if not attrs:
        return ""
    return " {" + ", ".join(f"{k}={v!r}" for k, v in attrs.items() if v is not None) + "}"


def to_text(g: Graph) -> str:
    """A readable listing: inputs, params, then one line per node."""
    lines = [f"graph {g.name}  ({len(g.nodes)} nodes, {len(g.params)} params, {len(g.kv_layers)} kv layers)"]
    for k, t in g.inputs.items():
        lines.append(f"  input  {k}: {t}")
    for p in g.params.values():
        lines.append(f"  param  {p.name}: {p.type}  init={p.init}")
    for n in g.nodes:
        args = ", ".join(f"%{i}" for i in n.inputs)
        lines.append(f"  %{n.name} = {n.op}({args}){_fmt_attrs(n.attrs)} : {n.type}")
    lines.append("  return " + ", ".join(f"%{o}" for o in g.outputs))
    return "\n".join(lines)
