"""Shared setup for the pass tests: load a tiny checkpoint, run a fixed two-step workload."""

from __future__ import annotations

import numpy as np

from kiln.models.loader import load_params, open_checkpoint
from kiln.models.registry import build_graph
from kiln.runtime.batch import SeqChunk
from tests.helpers import Stepper


def load_tiny(path, dtype="float32"):
    ckpt = open_checkpoint(path)
    graph = build_graph(ckpt.config, dtype)
    params = load_params(graph, ckpt.config, ckpt.source, put=lambda name, a: a)  # host numpy
    return graph, params


def prompts(lens=(5, 13), seed=1, vocab=300):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, n)] for n in lens]


_JITTED: dict[int, tuple] = {}


def _stepper(graph, params) -> Stepper:
    """A Stepper whose jitted step is shared by every Stepper of the same graph object
    (the tests run one graph on several weight sets; each compile costs seconds on CI)."""
    st = Stepper(graph, params)  # jit is lazy: nothing compiles here
    st.step_fn = _JITTED.setdefault(id(graph), (graph, st.step_fn))[1]
    return st


def run_workload(graph, params, lens=(5, 13)) -> np.ndarray:
    """Logits of a ragged prefill of two prompts (every position), then two decode steps of
    both together (fixed tokens, so models that disagree still see the same input): the KV
    cache written by one step is read by the next."""
    st = _stepper(graph, params)
    ps = prompts(lens)
    tables = [st.new_table() for _ in ps]
    outs = st.step([SeqChunk(p, 0, t, all_logits=True) for p, t in zip(ps, tables)], pad_tokens=32, pad_seqs=4)
    rows = [np.concatenate(outs)]
    for k, nxt in enumerate(prompts((len(ps), len(ps)), seed=7)):
        outs = st.step([SeqChunk([n], len(p) + k, t) for n, p, t in zip(nxt, ps, tables)], pad_tokens=8, pad_seqs=4)
        rows.append(np.concatenate(outs))
    return np.concatenate(rows)


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))
