"""`LLM`: the programmatic generation API, on the engine.

    llm = LLM("path/to/checkpoint", dtype="float32")
    outs = llm.generate(["Hello", "Bonjour"], SamplingParams(max_tokens=32, temperature=0.0))
    outs[0].outputs[0].text

    for out in llm.generate_stream(["Hello"], SamplingParams(max_tokens=32)):
        print(out.outputs[0].text, end="")       # deltas: they concatenate to the final text

    llm.chat([{"role": "user", "content": "Hi"}])  # through the checkpoint's chat template

Construction: open the checkpoint, build the graph, load the weights, then hand graph and
params to the runner. `_prepare_model` is the seam where a pass pipeline rewrites the
graph and its weights, and a sharding plan places them, before the runner takes them.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from kiln.errors import ConfigError, RequestError
from kiln.models.config import DTYPE_NAMES
from kiln.models.loader import open_checkpoint
from kiln.models.registry import build_graph
from kiln.runtime.engine import Engine
from kiln.runtime.outputs import EngineStats, RequestOutput
from kiln.runtime.runner import Runner
from kiln.runtime.sampling_params import SamplingParams


def resolve_dtype(dtype: str, checkpoint_dtype: str) -> str:
    if dtype == "auto":
        return checkpoint_dtype
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose auto, float32, bfloat16 or float16")
    return DTYPE_NAMES[dtype]


class LLM:
    """An engine over one model.

    max_num_seqs / max_num_tokens: sequences and tokens per step (the batch); max_model_len:
    prompt + generated tokens per sequence (default: the model's); kv_block_size: tokens per
    KV block; num_kv_blocks: the pool size, else sized from gpu_memory_utilization of the
    device memory; enable_prefix_caching: reuse the KV blocks of shared prompt prefixes;
    seed: the base of the per-request seeds; attention: the attention implementation
    (see runtime/kernels); overlap: plan step N+1 while step N runs; warmup: compile every
    token bucket at start-up instead of on first use.
    """

    def __init__(self, model: str | None = None, *, dtype: str = "auto", max_num_seqs: int = 64,
                 max_num_tokens: int = 1024, max_model_len: int | None = None, kv_block_size: int = 16,
                 gpu_memory_utilization: float = 0.9, num_kv_blocks: int | None = None,
                 enable_prefix_caching: bool = True, seed: int = 0, attention: str = "reference",
                 overlap: bool = True, warmup: bool = False, mesh=None, log=...):
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_tokens", max_num_tokens),
                        ("kv_block_size", kv_block_size)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        ckpt = open_checkpoint(model)
        self.config = cfg = ckpt.config
        self.dtype = resolve_dtype(dtype, cfg.dtype)
        self.tokenizer = ckpt.load_tokenizer()
        self.graph, self.params = self._prepare_model(ckpt, mesh)
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        kw = {} if log is ... else {"log": log}
        self.runner = Runner(self.graph, self.params, dtype=self.dtype, block_size=kv_block_size,
                             max_num_seqs=max_num_seqs, max_num_tokens=max_num_tokens,
                             max_model_len=self.max_model_len, num_kv_blocks=num_kv_blocks,
                             gpu_memory_utilization=gpu_memory_utilization, attention=attention, mesh=mesh, **kw)
        if warmup:
            self.runner.warmup()
        self.engine = Engine(self.runner, tokenizer=self.tokenizer, eos_token_ids=cfg.eos_token_ids,
                             vocab_size=cfg.vocab_size, max_model_len=self.max_model_len, max_num_seqs=max_num_seqs,
                             max_num_tokens=max_num_tokens, enable_prefix_caching=enable_prefix_caching, seed=seed,
                             overlap=overlap)

    def _prepare_model(self, ckpt, mesh):
        """Graph and placed params. Seam: a pass pipeline (graph -> graph with matching
        weight transforms) and sharded placement over `mesh` plug in here."""
        graph = build_graph(ckpt.config, self.dtype)
        return graph, ckpt.load_params(graph)

    # -- generation
    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One finished `RequestOutput` per prompt (a string or a list of token ids), in order.
        `sampling_params`: one for all, or one per prompt. Every request is checked before
        any is queued: a bad one raises `RequestError` and runs nothing."""
        ids = self._add_all(prompts, sampling_params, "final")
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(ids) > 1:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit="req", leave=False)
        try:
            while len(results) < len(ids):
                for out in self.engine.step():
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        except BaseException:
            self._abort_all(ids, results)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[i] for i in ids]

    def generate_stream(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                        ) -> Iterator[RequestOutput]:
        """Incremental outputs of all `prompts` as they are produced, interleaved: each
        `RequestOutput` holds deltas (new text, token ids, logprobs) of one request; the
        deltas of a request concatenate to its final output. Closing the iterator early
        aborts what is still running."""
        ids = self._add_all(prompts, sampling_params, "delta")
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                    yield out
        finally:
            self._abort_all(ids, done)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or a
        list of them, rendered with the checkpoint's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self.generate([self.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                                       chat_template=chat_template) for c in convs],
                             sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, conversation, *, add_generation_prompt: bool = True,
                            chat_template: str | None = None) -> list[int]:
        """The conversation as prompt token ids (the template carries its special tokens)."""
        tok = self.tokenizer
        if tok is None or (chat_template is None and not getattr(tok, "chat_template", None)):
            raise RequestError("this model has no chat template; pass chat_template= or use generate()")
        text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       chat_template=chat_template)
        return tok.encode(text, add_special_tokens=False)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def stats(self) -> EngineStats:
        """Running/waiting requests, KV blocks used/free, prefix-cache hit rate, tokens per step."""
        return self.engine.stats()

    # -- tokens
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer: pass prompts as lists of token ids")
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    # -- helpers
    def _add_all(self, prompts, sampling_params, kind: str) -> list[str]:
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one or one each")
        encoded = [self.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        for ids, sp in zip(encoded, params):
            self.engine._validate(ids, sp)  # all or nothing
        ids = []
        for p, e, sp in zip(prompts, encoded, params):
            ids.append(self.engine.add_request(e, sp, output_kind=kind, prompt_text=p if isinstance(p, str) else None))
        return ids

    def _abort_all(self, ids, done) -> None:
        live = [i for i in ids if i not in done]
        if not live:
            return
        for i in live:
            self.engine.abort(i)
        while self.engine.has_unfinished():
            self.engine.step()
