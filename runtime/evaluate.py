"""Sliding-window perplexity of a model over a text.

    windows of `window` tokens, each starting `stride` after the last; each token is scored
    once, by the first window that reaches it, with the rest of that window as its context:

    tokens:   t0 t1 t2 t3 t4 t5 t6 t7 t8 t9
    window 0  [t0 ............ t5]            scores t1..t5
    window 1           [t3 ............ t8]   scores t6..t8 (t3..t5: context only)
    window 2                    [t6 ... t9]   scores t9

    perplexity = exp(mean negative log-likelihood over the scored tokens)

Each window is one prefill step of a fresh sequence (every window is padded to `window`
tokens, so the step compiles once); the log-softmax and the gather of the targets run on the
device, so the [window, vocab] logits never reach the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kiln.errors import ConfigError


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float            # mean negative log-likelihood (nats per scored token)
    tokens: int           # tokens scored
    windows: int


def window_spans(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: tokens [begin, end) are fed, those in
    [first_scored, end) are scored (first_scored >= 1: token 0 has no context). Windows start
    `stride` apart, but never so far that the next one would have no context."""
    if window < 2 or not 0 < stride <= window:
        raise ConfigError(f"perplexity window {window} and stride {stride}: need window >= 2 and 0 < stride <= window")
    spans, prev_end, begin = [], 1, 0
    while prev_end < n_tokens:
        end = min(begin + window, n_tokens)
        spans.append((begin, end, prev_end))
        prev_end = end
        begin = min(begin + stride, end - 1)   # at least one token of context for the next window
    return spans


class _WindowScorer:
    """A jitted prefill that returns (sum of NLL over the masked rows) for one window."""

    def __init__(self, graph, params, window: int, dtype: str, block_size: int = 16, attention: str = "reference"):
        import jax
        import jax.numpy as jnp

        from kiln.graph import lower
        from kiln.runtime.kv_cache import allocate_kv_cache

        self.window, self.block_size = window, block_size
        self.table = list(range(-(-window // block_size)))
        self.params = params
        self.kv = allocate_kv_cache(graph, len(self.table), block_size, dtype)
        step = lower(graph, attention=attention)

        def score(params, kv, inputs, targets, mask):
            logits, kv = step(params, kv, inputs)                        # [window, vocab]
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
            return jnp.sum(jnp.where(mask, nll, 0.0)), kv

        self._score = jax.jit(score, donate_argnums=(1,))

    def __call__(self, ids: list[int], first_scored: int) -> tuple[float, int]:
        from kiln.runtime.batch import SeqChunk, prepare_inputs

        n = len(ids)
        inputs, _ = prepare_inputs([SeqChunk(ids, 0, self.table, all_logits=True)], self.block_size,
                                   pad_tokens=self.window, pad_seqs=1, pad_logits=self.window)
        targets = np.zeros(self.window, np.int32)
        targets[:n - 1] = ids[1:]                 # row i predicts token i + 1
        mask = np.zeros(self.window, bool)
        mask[first_scored - 1:n - 1] = True
        total, self.kv = self._score(self.params, self.kv, inputs, targets, mask)
        return float(total), int(mask.sum())


def perplexity_of_ids(graph, params, ids: list[int], *, window: int = 512, stride: int = 256,
                      dtype: str = "float32", progress: bool = False) -> Perplexity:
    """Perplexity of token ids under a built graph and its params (see the module docstring)."""
    if len(ids) < 2:
        raise ConfigError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    spans = window_spans(len(ids), window, stride)
    scorer = _WindowScorer(graph, params, min(window, len(ids)), dtype)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(spans), desc="perplexity", unit="window")
    total, count = 0.0, 0
    for begin, end, first in spans:
        nll, n = scorer(ids[begin:end], first - begin)
        total, count = total + nll, count + n
        if bar is not None:
            bar.update(1)
            bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    if bar is not None:
        bar.close()
    mean = total / count
    return Perplexity(math.exp(mean), mean, count, len(spans))


def evaluate_text(model: str | None, text: str, *, dtype: str = "auto", quantization: str | None = None,
                  quant_method: str | None = None, calibration: str | None = None, int4_group_size: int | None = None,
                  window: int = 512, stride: int = 256, progress: bool = False) -> Perplexity:
    """Perplexity of `model` (a checkpoint directory, a .gguf file, or None for the default
    model) on `text`, tokenized with the model's tokenizer. `quantization` (fp8 | int8_wo |
    int4_wo) runs the pass pipeline with it first, as `LLM(..., quantization=)` does;
    `quant_method` (rtn | awq | gptq | awq+gptq) with `calibration` (a text, or "default":
    passes/calibration.txt; the default whenever the method needs one)."""
    from kiln.models.config import DTYPE_NAMES
    from kiln.models.loader import load_params, open_checkpoint
    from kiln.models.registry import build_graph

    ckpt = open_checkpoint(model)
    tok = ckpt.load_tokenizer()
    if tok is None:
        raise ConfigError(f"{model}: the checkpoint has no tokenizer, so it cannot score text")
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose auto, float32, bfloat16 or float16")
    dtype = ckpt.config.dtype if dtype == "auto" else DTYPE_NAMES[dtype]
    graph = build_graph(ckpt.config, dtype)
    params = load_params(graph, ckpt.config, ckpt.source, progress=progress)
    if quantization:
        from kiln.passes.pipeline import compile_model

        from kiln.passes.quantize import calibration_prompts

        calib = None
        if calibration is not None or quant_method not in (None, "rtn"):
            calib = calibration_prompts(tok, None if calibration in (None, "default") else calibration)
        graph, params = compile_model(graph, params, quantization=quantization, quant_method=quant_method,
                                      calibration=calib, int4_group_size=int4_group_size)
    ids = tok.encode(text)
    return perplexity_of_ids(graph, params, ids, window=window, stride=stride, dtype=dtype, progress=progress)
