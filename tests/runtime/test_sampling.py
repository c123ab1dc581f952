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


def test_penalties_and_suppression_match_numpy():
    from kiln.runtime.sampling import apply_penalties, suppress

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 12)).astype(np.float32)
    prompt = np.array([[1, 2, -1], [-1, -1, -1]], np.int32)
    output = np.array([[2, 2, 5, -1], [7, -1, -1, -1]], np.int32)
    rep, pres, freq = np.float32([1.5, 2.0]), np.float32([0.5, 0.0]), np.float32([0.25, 1.0])
    got = np.asarray(apply_penalties(logits, prompt, output, rep, pres, freq))
    want = logits.copy()
    for r in range(2):
        seen = set(prompt[r][prompt[r] >= 0]) | set(output[r][output[r] >= 0])
        for t in seen:
            want[r, t] = want[r, t] / rep[r] if want[r, t] > 0 else want[r, t] * rep[r]
        for t in set(output[r][output[r] >= 0]):
            c = int((output[r] == t).sum())
            want[r, t] -= freq[r] * c + pres[r]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    sup = np.asarray(suppress(logits, np.array([[3, -1], [0, 11]], np.int32)))
    assert np.isneginf(sup[0, 3]) and np.isneginf(sup[1, [0, 11]]).all() and np.isfinite(sup[0, [0, 11]]).all()
