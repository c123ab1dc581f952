"""The OpenAI-compatible HTTP server (`kiln serve`): FastAPI on the runtime's `AsyncEngine`.

    POST /v1/completions        POST /v1/chat/completions   (stream=true: server-sent events)
    GET  /v1/models             GET  /health                GET  /metrics (Prometheus text)

One engine loop serves every request. Errors use OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`): 400 for bad JSON or parameters (the
message names the field), 401 for a wrong or missing key, 404 for an unknown model, 503 with
`Retry-After` when the queue is full. A client that goes away mid-stream aborts its request,
which frees its KV blocks.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from kiln.errors import KilnError, RequestError
from kiln.runtime.engine import AsyncEngine
from kiln.runtime.sampling_params import MAX_LOGPROBS, SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.headers = status, message, param, type_, headers


# --------------------------------------------------------------------------- parameters

_NUM = (int, float)


def _field(body: dict, name: str, types, default=None, *, alt: str | None = None):
    v = body.get(name, body.get(alt) if alt else None)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise APIError(400, f"'{name}' must be {_type_name(types)}, got {json.dumps(v)}", name)
    if not isinstance(v, types):
        raise APIError(400, f"'{name}' must be {_type_name(types)}, got {json.dumps(v)[:40]}", name)
    return v


def _type_name(types) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list", dict: "an object"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def sampling_params(body: dict, *, chat: bool) -> SamplingParams:
    """OpenAI request fields -> SamplingParams; a bad value raises a 400 naming the field."""
    max_tokens = _field(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                        int, 16 if not chat else None)
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop")
    if chat:
        want = _field(body, "logprobs", bool, False)
        top = _field(body, "top_logprobs", int, 0)
        if top and not want:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = top if want else None
    else:
        logprobs = _field(body, "logprobs", int, None)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {logprobs}", "logprobs")
    temperature = _field(body, "temperature", _NUM, 1.0)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"'temperature' must be in [0, 2], got {temperature}", "temperature")
    kw = dict(
        n=_field(body, "n", int, 1), temperature=float(temperature),
        top_p=float(_field(body, "top_p", _NUM, 1.0)), top_k=_field(body, "top_k", int, 0),
        min_p=float(_field(body, "min_p", _NUM, 0.0)), seed=_field(body, "seed", int, None),
        presence_penalty=float(_field(body, "presence_penalty", _NUM, 0.0)),
        frequency_penalty=float(_field(body, "frequency_penalty", _NUM, 0.0)),
        repetition_penalty=float(_field(body, "repetition_penalty", _NUM, 1.0)),
        ignore_eos=_field(body, "ignore_eos", bool, False), min_tokens=_field(body, "min_tokens", int, 0),
        stop=stop, stop_token_ids=_field(body, "stop_token_ids", list, []), logprobs=logprobs)
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    try:
        return SamplingParams(**kw)
    except RequestError as e:
        raise APIError(400, str(e), str(e).split()[0]) from None


# --------------------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics on a private registry (several apps may live in one process)."""

    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("kiln_requests", "Finished HTTP generation requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("kiln_request_latency_seconds", "End-to-end request latency", registry=r)
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "Time to first token", registry=r)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens processed", registry=r)
        self.gen_tokens = Counter("kiln_generation_tokens", "Tokens generated", registry=r)
        self._recent: deque = deque()  # (time, tokens) of the last window, for tokens/s
        tps = Gauge("kiln_generation_tokens_per_second", "Generated tokens per second over the last 10 s", registry=r)
        tps.set_function(self.tokens_per_second)
        stats = engine.stats
        for name, doc, fn in (
                ("kiln_requests_running", "Requests running", lambda: stats().running),
                ("kiln_requests_waiting", "Requests waiting", lambda: stats().waiting),
                ("kiln_kv_cache_usage_ratio", "Share of KV blocks in use",
                 lambda: stats().kv_blocks_used / max(stats().kv_blocks_total, 1)),
                ("kiln_kv_blocks_free", "Free KV blocks", lambda: stats().kv_blocks_free),
                ("kiln_prefix_cache_hit_rate", "Prefix-cache hit rate", lambda: stats().prefix_cache_hit_rate)):
            Gauge(name, doc, registry=r).set_function(fn)

    def add_tokens(self, n: int):
        self.gen_tokens.inc(n)
        now = time.monotonic()
        self._recent.append((now, n))

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - 10:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / 10.0

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# --------------------------------------------------------------------------- the app


@dataclass
class ServerConfig:
    model_name: str = "kiln"
    api_key: str | None = None
    max_waiting: int = 256           # queued requests beyond which new ones get 503


def create_app(llm, config: ServerConfig | None = None):
    """A FastAPI app serving `llm` (a `kiln.LLM`)."""
    cfg = config or ServerConfig()
    engine = AsyncEngine(llm.engine)
    metrics = Metrics(llm.engine)
    created = int(time.time())
    app = FastAPI(title="Kiln", version="1")
    app.state.engine, app.state.metrics, app.state.llm = engine, metrics, llm

    def error_body(e: APIError) -> dict:
        return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.status}}

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if cfg.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {cfg.api_key}":
                e = APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                             type_="authentication_error")
                return JSONResponse(error_body(e), status_code=401)
        return await call_next(request)

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != cfg.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {cfg.model_name!r}", "model",
                           "not_found_error")
        return body

    def check_capacity():
        if llm.engine.stats().waiting >= cfg.max_waiting:
            raise APIError(503, f"the server is at capacity ({cfg.max_waiting} requests waiting); retry later",
                           type_="server_overloaded", headers={"Retry-After": "1"})

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": created,
                                            "owned_by": "kiln", "max_model_len": llm.max_model_len}]}

    @app.get("/metrics")
    async def prom():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if not (isinstance(prompt, str) and prompt) and not (
                isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            raise APIError(400, "'prompt' must be a non-empty string or a list of token ids", "prompt")
        sp = sampling_params(body, chat=False)
        return await run(request, "completions", prompt, sp, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, list))
                for m in messages):
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        messages = [{**m, "content": _text_content(m["content"])} for m in messages]
        sp = sampling_params(body, chat=True)
        try:
            ids = llm.apply_chat_template(messages)
        except RequestError as e:
            raise APIError(400, str(e), "messages") from None
        except Exception as e:  # a template that fails on these messages
            raise APIError(400, f"the chat template failed on these messages ({e})", "messages") from None
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            sp.max_tokens = max(1, min(llm.max_model_len - len(ids), 4096))
        return await run(request, "chat", ids, sp, body, chat=True)

    async def run(request, endpoint: str, prompt, sp: SamplingParams, body: dict, *, chat: bool):
        check_capacity()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        t0 = time.monotonic()
        gen = engine.generate(prompt, sp, request_id=rid)
        try:
            first = await gen.__anext__()  # surfaces RequestError before any byte is sent
        except RequestError as e:
            metrics.requests.labels(endpoint, "400").inc()
            raise APIError(400, str(e), "prompt" if "prompt" in str(e) else None) from None
        except KilnError as e:
            metrics.requests.labels(endpoint, "500").inc()
            raise APIError(500, str(e), type_="internal_error") from None
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        tracker = _Tracker(rid, cfg.model_name, chat, sp.n, len(first.prompt_token_ids), t0, metrics, endpoint,
                           llm.tokenizer)
        if not stream:
            out = first
            try:
                tracker.add(first)
                while not out.finished:
                    out = await gen.__anext__()
                    tracker.add(out)
            finally:
                await gen.aclose()
            return tracker.final_response()

        async def events() -> AsyncIterator[str]:
            out = first
            try:
                for chunk in tracker.chunks(first):
                    yield _sse(chunk)
                while not out.finished:
                    if await request.is_disconnected():
                        return
                    out = await gen.__anext__()
                    for chunk in tracker.chunks(out):
                        yield _sse(chunk)
                if include_usage:
                    yield _sse(tracker.usage_chunk())
                yield "data: [DONE]\n\n"
            finally:
                await gen.aclose()  # aborts the request if it is still running
                tracker.close()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _text_content(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _Tracker:
    """Accumulates one request's deltas into OpenAI responses and records its metrics."""

    def __init__(self, rid, model, chat, n, prompt_tokens, t0, metrics, endpoint, tokenizer):
        self.rid, self.model, self.chat, self.t0 = rid, model, chat, t0
        self.tokenizer = tokenizer
        self.metrics, self.endpoint = metrics, endpoint
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.text = [""] * n
        self.tokens = [[] for _ in range(n)]
        self.logprobs: list[list] = [[] for _ in range(n)]
        self.finish = [None] * n
        self.first_token_at = None
        self.closed = False
        self.sent_role = [False] * n

    def add(self, out):
        for c in out.outputs:
            if c.token_ids and self.first_token_at is None:
                self.first_token_at = time.monotonic()
                self.metrics.ttft.observe(self.first_token_at - self.t0)
            self.metrics.add_tokens(len(c.token_ids))
            self.text[c.index] += c.text
            self.tokens[c.index] += c.token_ids
            if c.logprobs:
                self.logprobs[c.index] += list(zip(c.token_ids, c.logprobs))
            if c.finish_reason:
                self.finish[c.index] = c.finish_reason
        if out.finished:
            self.close("200")

    def close(self, status: str = "499"):
        if not self.closed:
            self.closed = True
            self.metrics.prompt_tokens.inc(self.prompt_tokens)
            self.metrics.requests.labels(self.endpoint, status).inc()
            self.metrics.latency.observe(time.monotonic() - self.t0)

    @property
    def completion_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _logprobs(self, pairs) -> Any:
        if not pairs:
            return None
        dec = self.token_text
        if self.chat:
            return {"content": [{"token": dec(t), "logprob": lp[t], "bytes": list(dec(t).encode()),
                                 "top_logprobs": [{"token": dec(i), "logprob": v, "bytes": list(dec(i).encode())}
                                                  for i, v in sorted(lp.items(), key=lambda kv: -kv[1])]}
                                for t, lp in pairs]}
        return {"tokens": [dec(t) for t, _ in pairs], "token_logprobs": [lp[t] for t, lp in pairs],
                "top_logprobs": [{dec(i): v for i, v in lp.items()} for _, lp in pairs]}

    def token_text(self, t: int) -> str:
        return self.tokenizer.decode([t]) if self.tokenizer is not None else str(t)

    def _finish_reason(self, r):
        return None if r is None else ("stop" if r == "abort" else r)

    def final_response(self) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": self.text[i]},
                        "logprobs": self._logprobs(self.logprobs[i]), "finish_reason": self._finish_reason(self.finish[i])}
                       for i in range(len(self.text))]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": self.text[i], "logprobs": self._logprobs(self.logprobs[i]),
                        "finish_reason": self._finish_reason(self.finish[i])} for i in range(len(self.text))]
            obj = "text_completion"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage()}

    def chunks(self, out):
        """The SSE chunks for one delta output."""
        before = [len(t) for t in self.tokens]
        self.add(out)
        for c in out.outputs:
            i = c.index
            if not c.text and not c.finish_reason and not (self.chat and not self.sent_role[i]):
                continue
            lp = self._logprobs(self.logprobs[i][before[i]:]) if c.logprobs else None
            if self.chat:
                delta = {"content": c.text}
                if not self.sent_role[i]:
                    delta["role"] = "assistant"
                    self.sent_role[i] = True
                choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": self._finish_reason(c.finish_reason)}
                yield {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                       "model": self.model, "choices": [choice]}
            else:
                choice = {"index": i, "text": c.text, "logprobs": lp, "finish_reason": self._finish_reason(c.finish_reason)}
                yield {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                       "choices": [choice]}

    def usage_chunk(self) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self.usage()}


def serve(llm, *, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None,
          log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM: uvicorn stops accepting, lets in-flight requests
    finish (up to 30 s), then the process exits 0."""
    import contextlib
    import signal

    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn re-raises the signal after shutting down; we exit 0
            def stop(*_):
                self.should_exit = True

            old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    app = create_app(llm, config)
    _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)).run()
