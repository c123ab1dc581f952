"""`kiln serve` on 127.0.0.1, driven by the official openai client and raw HTTP."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest


KEY = "test-key"
NAME = "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ckpt):
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "serve", str(ckpt), "--port", str(port), "--api-key", KEY,
         "--served-model-name", NAME, "--dtype", "float32", "--max-num-seqs", "32", "--max-num-tokens", "256",
         "--num-kv-blocks", "512", "--max-model-len", "256", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
        assert proc.poll() is None, proc.stdout.read()
    yield proc, base
    if proc.poll() is None:
        proc.kill()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0)


def _metrics(base) -> dict[str, float]:
    text = httpx.get(base + "/metrics").text
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def _kv_idle(base, timeout=10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = _metrics(base)
        if m["kiln_kv_cache_usage_ratio"] == 0 and m["kiln_requests_running"] == 0:
            return True
        time.sleep(0.2)
    return False


def test_completion_chat_and_stream_agree(client):
    r = client.completions.create(model=NAME, prompt="the quick brown fox", max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    text = r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="the quick brown fox", max_tokens=12, temperature=0, stream=True))
    assert streamed == text and text

    msgs = [{"role": "user", "content": "paged attention keeps the cache"}]
    c = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    assert c.choices[0].message.role == "assistant" and c.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == c.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == c.usage.prompt_tokens


def test_seed_and_sampling_parameters(client):
    kw = dict(model=NAME, prompt="Kiln compiles", max_tokens=10, temperature=0.9, top_p=0.9, seed=42)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    r = client.completions.create(model=NAME, prompt="Kiln compiles", max_tokens=6, temperature=1.0, n=3, seed=1,
                                  logprobs=2, extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1,
                                                          "ignore_eos": True},
                                  presence_penalty=0.5, frequency_penalty=0.5)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 6 and all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    c = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    assert len(c.choices[0].logprobs.content) == 4 and len(c.choices[0].logprobs.content[0].top_logprobs) >= 3


def test_models_and_auth(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    bad = openai.OpenAI(base_url=server[1] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.post(server[1] + "/v1/completions", json={"prompt": "x"}).status_code == 401


@pytest.mark.parametrize("body,status,field", [
    (b"{not json", 400, None),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ({"model": NAME, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "hi", "temperature": 7}, 400, "temperature"),
    ({"model": NAME, "prompt": "hi", "top_p": "high"}, 400, "top_p"),
    ({"model": NAME, "prompt": "the " * 300, "max_tokens": 4}, 400, "prompt"),
    ({"model": NAME, "prompt": ""}, 400, "prompt"),
])
def test_bad_input_gets_4xx_naming_the_field(server, body, status, field):
    base = server[1]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(base + "/v1/completions", content=body if isinstance(body, bytes) else json.dumps(body),
                   headers=headers, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"]
    if field:
        assert field in err["message"] or err["param"] == field
    assert httpx.get(base + "/health").status_code == 200  # still answering


def test_100_concurrent_streams_then_metrics_and_kv(server):
    base = server[1]
    prompts = [f"the quick brown fox {i}" for i in range(10)]
    sync = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    ref = {p: sync.completions.create(model=NAME, prompt=p, max_tokens=4, temperature=0).choices[0].text
           for p in prompts}
    before = _metrics(base)

    async def one(client, i):
        p = prompts[i % len(prompts)]
        stream = await client.completions.create(model=NAME, prompt=p, max_tokens=4, temperature=0, stream=True)
        text, finish = "", None
        async for ch in stream:
            text += ch.choices[0].text
            finish = ch.choices[0].finish_reason or finish
        return p, text, finish

    async def main():
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120) as client:
            return await asyncio.gather(*[one(client, i) for i in range(100)])

    results = asyncio.run(main())
    assert len(results) == 100
    for p, text, finish in results:
        assert text == ref[p] and finish == "length"
    assert _kv_idle(base)
    after = _metrics(base)
    key = 'kiln_requests_total{endpoint="completions",status="200"}'
    assert after[key] - before[key] == 100
    assert after["kiln_generation_tokens_total"] - before["kiln_generation_tokens_total"] == 400


def test_disconnects_mid_stream_free_their_blocks(server):
    base = server[1]

    async def drop(client):
        stream = await client.completions.create(model=NAME, prompt="the lazy dog", max_tokens=200, temperature=0.8,
                                                 stream=True, extra_body={"ignore_eos": True})
        async for _ in stream:
            break
        await stream.close()

    async def main():
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120) as client:
            await asyncio.gather(*[drop(client) for _ in range(20)])

    asyncio.run(main())
    assert _kv_idle(base, timeout=30)
    assert httpx.get(base + "/health").status_code == 200


def test_full_queue_gets_503_with_retry_after(ckpt):
    from fastapi.testclient import TestClient

    from kiln import LLM
    from kiln.runtime.server import ServerConfig, create_app

    llm = LLM(str(ckpt), dtype="float32", num_kv_blocks=64)
    app = create_app(llm, ServerConfig(model_name=NAME, max_waiting=0))
    r = TestClient(app).post("/v1/completions", json={"model": NAME, "prompt": "hi"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "capacity" in r.json()["error"]["message"]


def test_sigterm_shuts_down_gracefully(server):
    proc, base = server
    stream = httpx.stream("POST", base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": NAME, "prompt": "the quick", "max_tokens": 30, "stream": True}, timeout=60)
    with stream as r:
        lines = r.iter_lines()
        first = next(lines)
        assert first.startswith("data: ")
        proc.send_signal(signal.SIGTERM)
        rest = list(lines)  # the in-flight stream is allowed to finish
    assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
    assert proc.wait(timeout=60) == 0
