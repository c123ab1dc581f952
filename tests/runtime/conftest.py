"""Runtime fixtures."""

import pytest

from tests.helpers import make_hf_checkpoint


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A tiny fp32 Llama checkpoint with a tokenizer, shared read-only by the runtime tests."""
    path = tmp_path_factory.mktemp("llama_runtime")
    make_hf_checkpoint("llama", path)
    return path
