"""Device sampling: greedy, filters, and seeds."""

import numpy as np
import pytest

from kiln.errors import RequestError
from kiln.runtime.sampling import SamplingParams, request_key, sample


def _run(logits, temp, top_k=0, top_p=1.0, min_p=0.0, seeds=None):
    n = logits.shape[0]
    seeds = seeds if seeds is not None else list(range(n))
    keys = np.stack([request_key(s, 0) for s in seeds])
    f = lambda v, dt: np.full(n, v, dt)  # noqa: E731
    return np.asarray(sample(logits, f(temp, np.float32), f(top_k, np.int32), f(top_p, np.float32),
                             f(min_p, np.float32), keys))


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(5, 50)).astype(np.float32)
    assert (_run(logits, 0.0) == logits.argmax(-1)).all()


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = np.random.default_rng(1).normal(size=(6, 50)).astype(np.float32)
    assert (_run(logits, 1.0, top_k=1) == logits.argmax(-1)).all()
    assert (_run(logits, 1.0, top_p=1e-6) == logits.argmax(-1)).all()


def test_top_k_restricts_support():
    logits = np.tile(np.arange(20, dtype=np.float32) / 5, (64, 1))
    out = _run(logits, 2.0, top_k=3, seeds=list(range(64)))
    assert set(out.tolist()) <= {17, 18, 19} and len(set(out.tolist())) > 1


def test_same_seed_same_token_regardless_of_batch():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 100)).astype(np.float32)
    together = _run(logits, 1.0, seeds=[7, 8, 9, 10])
    alone = [_run(logits[i:i + 1], 1.0, seeds=[s])[0] for i, s in enumerate([7, 8, 9, 10])]
    assert together.tolist() == alone


def test_bad_parameters_are_typed_errors():
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(RequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0)
