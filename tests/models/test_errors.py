"""Bad input gives one line naming the file or field; the CLI exits with code 2."""

import json
import shutil

import pytest

from kiln.cli import main
from kiln.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from kiln.models.loader import load_params, open_checkpoint
from kiln.models.registry import build_graph


def _run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_missing_path(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no such file or directory"):
        open_checkpoint(tmp_path / "nope")
    code, err = _run_cli(capsys, "generate", str(tmp_path / "nope"), "--prompt", "hi")
    assert code == 2 and err.count("\n") == 0 and "nope" in err


def test_missing_config_json(tmp_path, capsys):
    code, err = _run_cli(capsys, "graph", str(tmp_path))
    assert code == 2 and "config.json: not found" in err and err.count("\n") == 0


def test_malformed_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,')
    code, err = _run_cli(capsys, "graph", str(tmp_path))
    assert code == 2 and "config.json: malformed JSON at line 1" in err
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    code, err = _run_cli(capsys, "graph", str(tmp_path))
    assert code == 2 and "missing field 'num_attention_heads'" in err
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": "big"}))
    with pytest.raises(ConfigError, match="field 'hidden_size' has the wrong type"):
        open_checkpoint(tmp_path)


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        open_checkpoint(tmp_path)
    code, err = _run_cli(capsys, "generate", str(tmp_path), "--prompt", "x")
    assert code == 2 and "'BertForMaskedLM' is not supported; supported: " in err


def test_missing_and_truncated_weights(tiny_checkpoint, tmp_path):
    _, src = tiny_checkpoint
    shutil.copytree(src, tmp_path / "ck")
    ck = tmp_path / "ck"
    weights = ck / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        c = open_checkpoint(ck)
        load_params(build_graph(c.config), c.config, c.source)
    weights.unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights found"):
        open_checkpoint(ck)
