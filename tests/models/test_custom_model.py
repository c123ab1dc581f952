"""A user-defined architecture registered from outside the package builds and generates
correctly (examples/custom_model.py, through Python and through `kiln build` with
KILN_PLUGINS), and an unknown one is a one-line error listing the supported."""

import runpy
from pathlib import Path

import pytest

from kiln.errors import UnsupportedArchitectureError
from kiln.models import get_family

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_model.py"


def test_custom_model_example_equals_its_numpy_reference():
    runpy.run_path(str(EXAMPLE), run_name="__main__")  # asserts Kiln's greedy tokens == numpy's


def test_kiln_build_cli_with_the_model_as_a_plugin(tmp_path, monkeypatch):
    """`KILN_PLUGINS=examples/custom_model.py kiln build CKPT -o ENGINE`, then generate from the engine."""
    from kiln import LLM, SamplingParams
    from kiln.cli import main

    example = runpy.run_path(str(EXAMPLE))  # its helpers, without running its main
    ckpt, engine = tmp_path / "ckpt", tmp_path / "engine"
    ckpt.mkdir()
    weights = example["write_checkpoint"](ckpt)
    monkeypatch.setenv("KILN_PLUGINS", str(EXAMPLE))
    assert main(["build", str(ckpt), "-o", str(engine), "--dtype", "float32", "--max-num-seqs", "2",
                 "--max-num-tokens", "16", "--num-kv-blocks", "32"]) == 0
    out = LLM(str(engine)).generate([[3, 1, 4, 1, 5]], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert out.outputs[0].token_ids == example["reference_greedy"](weights, [3, 1, 4, 1, 5], 8)


def test_a_broken_plugin_is_a_one_line_error(monkeypatch, capsys):
    from kiln.cli import main

    monkeypatch.setenv("KILN_PLUGINS", "/nonexistent/my_model.py")
    assert main(["graph", "random:llama-tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "plugin '/nonexistent/my_model.py' failed to load" in err


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError) as e:
        get_family("FalconForCausalLM")
    msg = str(e.value)
    assert "\n" not in msg and "'FalconForCausalLM' is not supported" in msg
    for arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GPT2LMHeadModel",
                 "Phi3ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        assert arch in msg
