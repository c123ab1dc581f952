"""`LLM`: the programmatic generation API.

    llm = LLM("path/to/checkpoint", dtype="float32")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0.0))
    outs[0].outputs[0].text

This first version runs each request on its own: one prefill of the whole prompt, then one
decode step per token, over a paged KV cache of `kv_block_size`-token blocks.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import jax
import numpy as np

from kiln.errors import ConfigError, RequestError
from kiln.graph import lower
from kiln.models.config import DTYPE_NAMES
from kiln.models.loader import load_params, open_checkpoint
from kiln.models.registry import build_graph
from kiln.runtime.batch import SeqChunk, bucket, prepare_inputs
from kiln.runtime.kv_cache import allocate_kv_cache
from kiln.runtime.outputs import CompletionOutput, RequestOutput
from kiln.runtime.sampling import SamplingParams, request_key, sample


def resolve_dtype(dtype: str, checkpoint_dtype: str) -> str:
    if dtype == "auto":
        return checkpoint_dtype
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose auto, float32, bfloat16 or float16")
    return DTYPE_NAMES[dtype]


class LLM:
    def __init__(self, model: str | None = None, *, dtype: str = "auto", max_model_len: int | None = None,
                 kv_block_size: int = 16, seed: int = 0, attention: str = "reference"):
        ckpt = open_checkpoint(model)
        self.config = cfg = ckpt.config
        self.dtype = resolve_dtype(dtype, cfg.dtype)
        self.graph = build_graph(cfg, self.dtype)
        self.params = load_params(self.graph, cfg, ckpt.source)
        self.tokenizer = ckpt.load_tokenizer()
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.block_size = kv_block_size
        self.seed = seed
        self._blocks_per_seq = -(-self.max_model_len // kv_block_size)
        self._kv = allocate_kv_cache(self.graph, self._blocks_per_seq, kv_block_size, self.dtype)
        self._step = jax.jit(lower(self.graph, attention=attention), donate_argnums=(1,))
        self._ids = itertools.count()

    # -- public API
    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """One `RequestOutput` per prompt (a string or a list of token ids), in order."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one or one each")
        return [self._generate_one(p, sp) for p, sp in zip(prompts, params)]

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer: pass prompts as lists of token ids")
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    # -- one request at a time
    def _generate_one(self, prompt, sp: SamplingParams) -> RequestOutput:
        request_id = str(next(self._ids))
        text = prompt if isinstance(prompt, str) else None
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise RequestError("prompt is empty")
        if len(ids) + sp.max_tokens > self.max_model_len:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({sp.max_tokens}) exceeds max_model_len "
                               f"({self.max_model_len}); shorten the prompt or lower max_tokens")
        eos = set() if sp.ignore_eos else set(self.config.eos_token_ids)
        stop_ids = eos | set(sp.stop_token_ids)
        seed = sp.seed if sp.seed is not None else self.seed + int(request_id)
        table = list(range(self._blocks_per_seq))
        out, finish = [], "length"
        chunk = SeqChunk(ids, 0, table)
        while len(out) < sp.max_tokens:
            logits = self.step_logits([chunk])
            tok = int(sample(logits, np.float32([sp.temperature]), np.int32([sp.top_k]), np.float32([sp.top_p]),
                             np.float32([sp.min_p]), request_key(seed, len(out))[None])[0])
            out.append(tok)
            if tok in stop_ids:
                finish = "stop"
                break
            chunk = SeqChunk([tok], len(ids) + len(out) - 1, table)
        return RequestOutput(request_id, text, ids, [CompletionOutput(0, self.decode(out), out, finish)], True)

    def step_logits(self, chunks: list[SeqChunk]):
        """Run one step over `chunks` (padded to power-of-two buckets) and return the logits
        rows they asked for, [rows, vocab] fp32. Updates the KV cache."""
        n_tok = sum(len(c.token_ids) for c in chunks)
        n_rows = sum(len(c.token_ids) if c.all_logits else 1 for c in chunks)
        inputs, rows = prepare_inputs(chunks, self.block_size, pad_tokens=bucket(n_tok), pad_seqs=bucket(len(chunks), 1),
                                      pad_blocks=self._blocks_per_seq, pad_logits=bucket(n_rows, 1))
        logits, self._kv = self._step(self.params, self._kv, inputs)
        return logits[:sum(rows)].astype(np.float32)

