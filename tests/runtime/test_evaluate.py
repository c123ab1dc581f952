"""Sliding-window perplexity: the windows score each token once, the result equals
transformers on the same windows, and SmolLM2 on the fixed excerpt stays where BENCHMARKS.md
recorded it."""

import math
from pathlib import Path

import numpy as np
import pytest

from kiln import cli
from kiln.errors import ConfigError
from kiln.models.loader import load_params, open_checkpoint
from kiln.models.registry import build_graph
from kiln.runtime.evaluate import perplexity_of_ids, window_spans
from tests.helpers import hf_perplexity, load_hf, make_hf_checkpoint

EXCERPT = Path(__file__).parent.parent / "data" / "alice_chapter1_excerpt.txt"
# BENCHMARKS.md "SmolLM2-135M-Instruct perplexity": `kiln eval --text tests/data/alice_chapter1_excerpt.txt
# --dtype float32` (window 512, stride 256) measured 24.2096
SMOLLM2_FP32_PPL = 24.2096


@pytest.mark.parametrize("n,window,stride", [(10, 6, 3), (50, 16, 8), (50, 16, 16), (7, 16, 4), (2, 2, 1), (33, 8, 5)])
def test_every_token_after_the_first_is_scored_once(n, window, stride):
    spans = window_spans(n, window, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == list(range(1, n))
    for begin, end, first in spans:
        assert end - begin <= window and begin < first <= end


def test_bad_window():
    with pytest.raises(ConfigError):
        window_spans(10, 4, 5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl")
    make_hf_checkpoint("llama", path)
    ckpt = open_checkpoint(path)
    graph = build_graph(ckpt.config, "float32")
    return path, graph, load_params(graph, ckpt.config, ckpt.source), load_hf(path)


def test_equals_transformers_on_the_same_windows(tiny):
    _, graph, params, hf = tiny
    ids = [int(t) for t in np.random.default_rng(0).integers(0, 300, 45)]
    got = perplexity_of_ids(graph, params, ids, window=16, stride=6)
    want, count = hf_perplexity(hf, ids, 16, 6)
    assert got.tokens == count == 44 and got.windows == len(window_spans(45, 16, 6))
    assert abs(got.perplexity - want) / want < 1e-4


def test_cli_eval(tiny, tmp_path, capsys):
    path = tiny[0]
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 6)
    assert cli.main(["eval", str(path), "--text", str(text), "--window", "32", "--stride", "16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    ppl = float(out.split()[1])
    assert math.isfinite(ppl) and ppl > 1
    assert cli.main(["eval", str(path), "--text", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.txt" in err and "\n" not in err


def test_smollm2_perplexity_on_the_excerpt(smollm2):
    """fp32 SmolLM2 on the fixed excerpt, within 1% of the value BENCHMARKS.md records."""
    _, graph, params, tok = smollm2
    ids = tok.encode(EXCERPT.read_text(encoding="utf-8"))
    r = perplexity_of_ids(graph, params, ids, window=512, stride=256)
    assert r.tokens == len(ids) - 1 == 1059
    assert abs(r.perplexity - SMOLLM2_FP32_PPL) / SMOLLM2_FP32_PPL < 0.01, r
