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

import time
from pathlib import Path
from typing import Iterator, Sequence

from kiln.errors import ConfigError, RequestError
from kiln.models.config import DTYPE_NAMES, ModelConfig
from kiln.models.loader import open_checkpoint
from kiln.models.registry import build_graph
from kiln.passes import PipelineOptions, build_passes, run_pipeline
from kiln.runtime.engine_dir import is_engine_dir
from kiln.runtime.engine import Engine
from kiln.runtime.outputs import EngineStats, RequestOutput
from kiln.runtime.runner import Runner, _log_stderr, default_compiler_options, default_small_step_options
from kiln.runtime.sampling_params import SamplingParams


def resolve_dtype(dtype: str, checkpoint_dtype: str) -> str:
    if dtype == "auto":
        return checkpoint_dtype
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose auto, float32, bfloat16 or float16")
    return DTYPE_NAMES[dtype]


class _Background:
    """fn(*args) in a daemon thread; `result()` joins it and returns (or raises) what it did."""

    def __init__(self, fn, *args):
        import threading

        self._out = self._err = None

        def run():
            try:
                self._out = fn(*args)
            except BaseException as e:
                self._err = e

        self._t = threading.Thread(target=run, name="kiln-restore", daemon=True)
        self._t.start()

    def result(self):
        self._t.join()
        if self._err is not None:
            raise self._err
        return self._out


class LLM:
    """An engine over one model.

    max_num_seqs / max_num_tokens: sequences and tokens per step (the batch); max_model_len:
    prompt + generated tokens per sequence (default: the model's); kv_block_size: tokens per
    KV block; num_kv_blocks: the pool size, else sized from gpu_memory_utilization of the
    device memory; enable_prefix_caching: reuse the KV blocks of shared prompt prefixes;
    seed: the base of the per-request seeds; attention: the attention implementation
    (see runtime/kernels); overlap: plan step N+1 while step N runs; warmup: compile every
    token bucket at start-up instead of on first use; compiler_options: XLA options of the
    step compiles (default: `runner.default_compiler_options`, and `default_small_step_options` for the
    token buckets of batch-1-sized steps; an engine keeps its build's).
    quant_method / calibration: how
    `quantization` rounds the weights (rtn | awq | gptq | awq+gptq; calibration: "default"
    for passes/calibration.txt, a text, or token-id prompts; with calibration, GPTQ by default).
    """

    def __init__(self, model: str | None = None, *, dtype: str = "auto", quantization: str | None = None,
                 quant_method: str | None = None, calibration=None, kv_cache_dtype: str | None = None, fuse: bool = True, tp: int = 1, pp: int = 1,
                 max_num_seqs: int = 64, max_num_tokens: int = 1024, max_model_len: int | None = None,
                 kv_block_size: int = 16, gpu_memory_utilization: float = 0.9, num_kv_blocks: int | None = None,
                 enable_prefix_caching: bool = True, seed: int = 0, attention: str = "auto",
                 overlap: bool = True, warmup: bool = False, compiler_options: dict | None = None, log=...):
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_tokens", max_num_tokens),
                        ("kv_block_size", kv_block_size), ("tp", tp), ("pp", pp)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        kw = {} if log is ... else {"log": log}
        self._log = _log_stderr if log is ... else (log or (lambda msg: None))
        if is_engine_dir(model):  # a built engine: no passes, no recompiles; its build options hold
            bc = self._load_engine(model, attention)
            tp, pp, kv_block_size, num_kv_blocks = bc.tp, bc.pp, bc.kv_block_size, bc.num_kv_blocks
            max_model_len, max_num_seqs, max_num_tokens = bc.max_model_len, bc.max_num_seqs, bc.max_num_tokens
            compiler_options = None  # the build's, set by _finish_engine_load
        else:
            if compiler_options is None:  # Kiln's rule, with its own options for batch-1-sized buckets
                compiler_options = default_compiler_options(quantization)
                kw["small_step_options"] = default_small_step_options(quantization)
            from kiln.runtime.kernels.quant_matmul import set_tuned_table

            set_tuned_table(None)  # no engine, no autotune table: the static rule
            ckpt = open_checkpoint(model)
            self.config = ckpt.config
            self.dtype = resolve_dtype(dtype, ckpt.config.dtype)
            self.tokenizer = ckpt.load_tokenizer()
            if isinstance(calibration, str) or (calibration is None and quant_method not in (None, "rtn")):
                from kiln.passes.quantize import calibration_prompts   # "default" (passes/calibration.txt) or a text

                calibration = calibration_prompts(self.tokenizer, None if calibration in (None, "default") else calibration)
            probe = None
            if tp * pp == 1 and num_kv_blocks is None:  # the KV pool is sized from memory: measure beside the load
                probe = dict(block_size=kv_block_size, max_num_seqs=max_num_seqs, max_num_tokens=max_num_tokens,
                             max_model_len=min(max_model_len or self.config.max_position_embeddings,
                                               self.config.max_position_embeddings), attention=attention)
            self._prepare_model(ckpt, PipelineOptions(fuse=fuse, quantization=quantization,
                                                      kv_cache_dtype=kv_cache_dtype, quant_method=quant_method,
                                                      calibration=calibration), tp, pp, attention, probe)
        cfg = self.config
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        sharded = self.sharded
        self.runner = Runner(self.graph, self.params, dtype=self.dtype, block_size=kv_block_size,
                             max_num_seqs=max_num_seqs, max_num_tokens=max_num_tokens,
                             max_model_len=self.max_model_len, num_kv_blocks=num_kv_blocks,
                             gpu_memory_utilization=gpu_memory_utilization, attention=attention,
                             step_fn=sharded.raw_step if sharded else None,
                             allocate_kv=sharded.allocate_kv_cache if sharded else None,
                             kv_shards=tp * pp, activation_bytes=self._activation_bytes(),
                             compiler_options=compiler_options, **kw)
        if is_engine_dir(model):
            self._finish_engine_load(bc)
        if warmup:
            self.runner.warmup()
        self.engine = Engine(self.runner, tokenizer=self.tokenizer, eos_token_ids=cfg.eos_token_ids,
                             vocab_size=cfg.vocab_size, max_model_len=self.max_model_len, max_num_seqs=max_num_seqs,
                             max_num_tokens=max_num_tokens, enable_prefix_caching=enable_prefix_caching, seed=seed,
                             overlap=overlap)

    def _prepare_model(self, ckpt, options: PipelineOptions, tp: int, pp: int, attention: str,
                       probe: dict | None = None) -> None:
        """Graph and placed params: load, run the pass pipeline (fusion, quantization: the
        weight transforms run once, here), then place on a (pp, tp) mesh when tp * pp > 1.
        On one device the weights stream straight to it; sharded, they pass through the host
        once and go to their shards. With `probe` (the runner's shape options), the largest
        step's activation memory is measured in a thread while the weights load: the pass
        pipeline is first run on shapes only (`jax.eval_shape`), which gives the final graph
        and parameter shapes without any weight."""
        graph = build_graph(ckpt.config, self.dtype)
        sharded = tp * pp > 1
        self._activation_probe = None
        if probe is not None and options.calibration is None:  # calibration runs the model: not on shapes
            self._activation_probe = self._start_activation_probe(graph, options, probe)
        t = time.perf_counter()
        shardings = None
        if sharded and ckpt.source is None:  # random weights: made sharded, never whole on one device
            from kiln.passes.sharding import make_mesh, param_shardings

            shardings = param_shardings(graph, make_mesh(tp, pp))
        params = ckpt.load_params(graph, put=(lambda name, a: a) if sharded else None, shardings=shardings)
        t_load = time.perf_counter() - t
        self.passes_run = [p.name for p in build_passes(options)]
        self.graph, self.params = run_pipeline(graph, params, options)
        self._log(f"weights loaded in {t_load:.1f} s, passes ({', '.join(self.passes_run)}) "
                  f"in {time.perf_counter() - t - t_load:.1f} s")
        self.sharded = None
        if sharded:
            from kiln.passes.sharding import shard_model

            self.sharded = shard_model(self.graph, tp=tp, pp=pp, attention=attention)
            self.params = self.sharded.place(self.params)

    def _start_activation_probe(self, graph, options: PipelineOptions, probe: dict):
        import jax
        import numpy as np

        if "bytes_limit" not in (jax.devices()[0].memory_stats() or {}):  # no device memory to size (CPU)
            return None
        shapes = {p.name: jax.ShapeDtypeStruct(tuple(p.type.shape), np.dtype(p.type.dtype)) for p in graph.params.values()}
        box = {}

        def passes_on_shapes(p):
            box["graph"], out = run_pipeline(graph, p, options)
            return out

        try:
            params = jax.eval_shape(passes_on_shapes, shapes)
        except Exception:  # a pass that needs values: the runner measures after the load instead
            return None
        dtype = self.dtype

        def measure():
            t = time.perf_counter()
            n = Runner(box["graph"], params, dtype=dtype, num_kv_blocks=1, log=None, **probe)._activation_bytes()
            return n, time.perf_counter() - t

        return _Background(measure)

    def _activation_bytes(self) -> int | None:
        probe, self._activation_probe = getattr(self, "_activation_probe", None), None
        if probe is None:
            return None
        n, dt = probe.result()
        self._log(f"activation memory of the largest step measured in {dt:.1f} s (beside the weights' load)")
        return n

    def _load_engine(self, path, attention: str):
        """Restore a `kiln build` engine directory; its compiled steps come from its cache."""
        from kiln.graph import load as load_graph
        from kiln.runtime.engine_dir import BuildConfig, read_manifest, restore_weights, use_compile_cache, weight_shapes

        manifest = read_manifest(path)
        use_compile_cache(Path(path) / "compiled")
        from kiln.runtime import autotune
        from kiln.runtime.kernels.quant_matmul import set_tuned_table

        # the build's quantized-matmul choices, fixed before any step is traced
        set_tuned_table(autotune.load(path, manifest) if autotune.FILE in manifest.get("files", {}) else None)
        bc = BuildConfig.from_json(manifest["build"])
        self._restore = None
        if bc.tp * bc.pp == 1:  # one device: the restore starts first, in a thread (graph, tokenizer and executables meanwhile)
            self._restore_t0 = time.perf_counter()
            self._restore = _Background(restore_weights, path, manifest, None)
        self.config = ModelConfig.from_json(manifest["model_config"])
        self.graph = load_graph(Path(path) / "graph.json")
        self.dtype = resolve_dtype(bc.dtype, self.config.dtype)
        self.passes_run = bc.passes
        self.sharded = None
        shardings = None
        if bc.tp * bc.pp > 1:
            from kiln.passes.sharding import shard_model

            self.sharded = shard_model(self.graph, tp=bc.tp, pp=bc.pp, attention=attention)
            shardings = self.sharded.param_shardings if bc.pp == 1 else None
        if self._restore is not None:
            self.params = weight_shapes(manifest)
        else:
            self.params = restore_weights(path, manifest, shardings)
        if self.sharded is not None and bc.pp > 1:
            self.params = self.sharded.place(self.params)
        tok = Path(path) / "tokenizer"
        if tok.exists():
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tok)
        else:
            self.tokenizer = None
        return bc

    def _finish_engine_load(self, bc) -> None:
        """The engine's compiler options; its build buckets fetched from the compilation
        cache in the background (shapes only), while the weights' restore completes."""
        self.runner.set_compiler_options(bc.compiler_options, bc.small_step_compiler_options)
        if self._restore is not None:
            # the build buckets' executables fetched beside the restore (H100: fetching them after it, or
            # only on first use, started 1-3 s slower; BENCHMARKS.md, issue #6)
            self.runner.preload(self.runner.build_batches())
            self.runner.kv  # noqa: B018  (the pools are allocated while the weights arrive)
            self.params = self.runner.params = self._restore.result()
            self._restore = None
            self._log(f"weights restored in {time.perf_counter() - self._restore_t0:.1f} s "
                      f"(build buckets fetched by then: {self.runner.preloaded()})")

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
