"""Shared fixtures: tiny random-weight Hugging Face checkpoints of each architecture."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests.helpers import ARCHS, make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session", params=ARCHS)
def tiny_checkpoint(request, tmp_path_factory):
    """(architecture, path) of a saved tiny fp32 checkpoint with a tokenizer."""
    path = tmp_path_factory.mktemp(request.param)
    make_hf_checkpoint(request.param, path)
    return request.param, path
