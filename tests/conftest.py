"""Shared fixtures: tiny random-weight Hugging Face checkpoints of each architecture."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # the transformers reference runs ~7x faster than with 2 contending threads

from tests.helpers import ARCHS, make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session", params=ARCHS)
def tiny_checkpoint(request, tmp_path_factory):
    """(architecture, path) of a saved tiny fp32 checkpoint with a tokenizer."""
    path = tmp_path_factory.mktemp(request.param)
    make_hf_checkpoint(request.param, path)
    return request.param, path


@pytest.fixture(scope="session")
def smollm2():
    """The default model (SmolLM2-135M-Instruct GGUF) opened once: (checkpoint, fp32 graph,
    fp32 params, tokenizer)."""
    from kiln.models.loader import load_params, open_checkpoint
    from kiln.models.registry import build_graph

    ckpt = open_checkpoint(None)
    graph = build_graph(ckpt.config, "float32")
    return ckpt, graph, load_params(graph, ckpt.config, ckpt.source), ckpt.load_tokenizer()
