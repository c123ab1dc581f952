"""`kiln graph` before and after the pass pipeline: matmuls per Llama layer 7 -> 4."""

import json

from kiln.cli import main


def _graph_json(capsys, *args):
    assert main(["graph", *args, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def _matmuls(g, layer=0):
    return sum(1 for n in g["nodes"] if n["op"] in ("linear", "qlinear") and n["name"].startswith(f"layers.{layer}."))


def test_graph_json_before_and_after_passes(tiny_checkpoint, capsys):
    _, path = tiny_checkpoint
    before = _graph_json(capsys, str(path), "--no-passes")
    after = _graph_json(capsys, str(path), "--passes")
    assert [_matmuls(before, i) for i in (0, 1)] == [7, 7]
    assert [_matmuls(after, i) for i in (0, 1)] == [4, 4]
    quant = _graph_json(capsys, str(path), "--quant", "int4_wo", "--kv-cache-dtype", "fp8")
    assert sum(n["op"] == "qlinear" for n in quant["nodes"]) == 8 and quant["meta"]["kv_cache_dtype"] == "float8_e4m3fn"
    assert {p["dtype"] for p in quant["params"] if p["name"] == "layers.0.qkv_proj.w"} == {"uint8"}


def test_print_after_all(tiny_checkpoint, capsys):
    _, path = tiny_checkpoint
    assert main(["graph", str(path), "--print-after-all", "--quant", "fp8"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[3] for line in out.splitlines() if line.startswith("# ---- after")]
    assert names == ["cse", "dce", "fold_rope", "fuse_qkv", "fuse_gate_up", "fuse_add_norm", "quantize_fp8", "fp8_weight_nk",
                     "fuse_fp8_act", "cse", "dce"]
    assert "%layers.0.qkv_proj" in out and "qlinear(" in out
