"""The Python client (``clients/python``): retries and error mapping offline, then against the live server."""
from __future__ import annotations

import asyncio
import email.utils
import json
import time

import httpx
import pytest

import steer_client
from steer_client import (
    APIConnectionError, AsyncClient, BadRequestError, Client, ConflictError, InternalServerError, NotFoundError,
    RateLimitError, ServiceUnavailableError,
)
from steer_client import _ops
from steer_client.cli import main as client_cli
from steering_helpers import random_loreft
from steer_serve.formats.native import save_native

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = [504, 3575, 282, 4649, 314]


def _error(status: int, code: str, headers: dict | None = None) -> httpx.Response:
    body = {"error": {"message": f"failure {status}", "type": "rate_limit_error", "param": "x", "code": code}}
    return httpx.Response(status, json=body, headers=headers)


def _completion(text: str = "ok") -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": "length", "token_ids": [1, 2]}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                      "prompt_tokens_details": {"cached_tokens": 3}}}


class Flaky:
    """A fake server: answers ``failures`` (status, headers) first, then a completion; counts calls."""

    def __init__(self, *failures):
        self.failures, self.calls = list(failures), 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.failures:
            status, headers = self.failures.pop(0)
            return _error(status, "busy", headers)
        return httpx.Response(200, json=_completion())


@pytest.fixture
def sleeps(monkeypatch):
    """Record (instead of sleeping) the client's backoff delays, sync and async."""
    delays: list[float] = []

    async def fake_async_sleep(seconds):
        delays.append(seconds)

    monkeypatch.setattr(steer_client.client.time, "sleep", delays.append)
    monkeypatch.setattr(steer_client.async_client.asyncio, "sleep", fake_async_sleep)
    return delays


def test_retries_429_respecting_retry_after(sleeps):
    fake = Flaky((429, {"Retry-After": "2"}), (503, {"Retry-After": "1"}))
    with Client("http://fake", transport=httpx.MockTransport(fake), max_retries=2) as client:
        result = client.complete("hi")
    assert fake.calls == 3 and sleeps == [2.0, 1.0]
    assert result.choices[0].text == "ok" and result.choices[0].token_ids == [1, 2]
    assert result.usage.cached_tokens == 3


def test_backoff_grows_without_retry_after_and_gives_up(sleeps):
    fake = Flaky(*[(429, None)] * 4)
    with Client("http://fake", transport=httpx.MockTransport(fake), max_retries=3) as client:
        with pytest.raises(RateLimitError) as info:
            client.complete("hi")
    assert fake.calls == 4 and len(sleeps) == 3
    assert 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0 and 1.0 <= sleeps[2] <= 2.0
    err = info.value
    assert (err.status, err.code, err.param, err.message) == (429, "busy", "x", "failure 429")


def test_client_errors_are_not_retried(sleeps):
    fake = Flaky((400, None))
    with Client("http://fake", transport=httpx.MockTransport(fake)) as client:
        with pytest.raises(BadRequestError):
            client.complete("hi")
    assert fake.calls == 1 and sleeps == []
    with Client("http://fake", transport=httpx.MockTransport(Flaky((503, None))), max_retries=0) as client:
        with pytest.raises(ServiceUnavailableError) as info:
            client.models()
    assert info.value.status == 503 and sleeps == []


def test_async_client_retries_503(sleeps):
    fake = Flaky((503, {"Retry-After": "0"}))

    async def go():
        async with AsyncClient("http://fake/v1", transport=httpx.MockTransport(fake)) as client:
            return await client.complete("hi")

    assert asyncio.run(go()).choices[0].text == "ok"
    assert fake.calls == 2 and sleeps == [0.0]


def test_refused_connection_is_retried_then_raised(sleeps):
    with Client("http://127.0.0.1:9", max_retries=2, timeout=5) as client:
        with pytest.raises(APIConnectionError) as info:
            client.models()
    assert len(sleeps) == 2 and info.value.status is None


def test_retry_after_http_date():
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= _ops.retry_delay(0, when) <= 30
    assert _ops.retry_delay(0, "1000") == _ops.MAX_RETRY_AFTER


def test_in_band_stream_error_raises():
    chunk = {"id": "c", "object": "text_completion", "created": 1, "model": "m",
             "choices": [{"index": 0, "text": "a", "token_ids": [7]}]}
    error = {"error": {"message": "generation failed", "type": "server_error", "param": None,
                       "code": "internal_error"}}
    body = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(error)}\n\ndata: [DONE]\n\n"
    transport = httpx.MockTransport(lambda r: httpx.Response(200, text=body,
                                                             headers={"content-type": "text/event-stream"}))
    with Client("http://fake", transport=transport) as client:
        stream = client.complete("hi", stream=True)
        first = next(iter(stream))
        assert first.choices[0].token_ids == [7]
        with pytest.raises(InternalServerError) as info:
            list(stream)
    assert info.value.code == "internal_error"


# -- against the live server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def steer(server):
    with Client(server.url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def native_dir(intervention_dir):
    """A native LoReFT that changes the greedy chat answer, saved inside the server's allowed directory."""
    target = intervention_dir / "client-loreft"
    if not target.exists():
        save_native(random_loreft(7, layer=15, strength=8.0), target)
    return target


@pytest.fixture(scope="module")
def registered(steer, native_dir):
    steer.interventions.register("client-a", str(native_dir), positions="all")
    yield "client-a"
    steer.interventions.delete("client-a", force=True)


def test_register_list_get_patch_delete(steer, native_dir, registered):
    item = steer.interventions.get(registered)
    assert item.id == registered and item.families == ["loreft"] and item.layers == [15]
    assert registered in {i.id for i in steer.interventions.list()}
    assert {m.id: m.parent for m in steer.models()}[registered] is not None
    uploaded = steer.interventions.upload("client-up", native_dir, positions="l1", scale=0.5)
    assert (uploaded.source, uploaded.positions, uploaded.scale) == ("upload", "l1", 0.5)
    assert uploaded.content_hash
    patched = steer.interventions.patch("client-up", scale=0.25)
    assert patched.scale == 0.25
    with pytest.raises(ConflictError) as info:
        steer.interventions.upload("client-up", native_dir)
    assert info.value.status == 409
    assert steer.interventions.delete("client-up") is True
    with pytest.raises(NotFoundError):
        steer.interventions.get("client-up")


def test_errors_carry_the_server_body(steer):
    with pytest.raises(NotFoundError) as info:
        steer.chat(CHAT, model="no-such-intervention", max_tokens=4)
    assert (info.value.status, info.value.code, info.value.param) == (404, "model_not_found", "model")
    with pytest.raises(BadRequestError) as info:
        steer.chat(CHAT, max_tokens=4, temperature=5)
    assert info.value.status == 400 and info.value.param == "temperature"
    with pytest.raises(BadRequestError) as info:
        steer.interventions.register("client-bad", "/etc")
    assert info.value.param == "source"


def test_chat_with_intervention_is_steered(steer, server, registered):
    plain = steer.chat(CHAT, max_tokens=16, temperature=0)
    steered = steer.chat(CHAT, intervention=registered, max_tokens=16, temperature=0, return_token_ids=True)
    as_model = steer.chat(CHAT, model=registered, max_tokens=16, temperature=0, return_token_ids=True)
    assert "Paris" in plain.choices[0].message.content
    assert steered.choices[0].message.content != plain.choices[0].message.content
    assert as_model.choices[0].token_ids == steered.choices[0].token_ids
    raw = httpx.post(f"{server.url}/v1/chat/completions", timeout=300, json={
        "messages": CHAT, "max_tokens": 16, "temperature": 0, "intervention": registered}).json()
    assert raw["choices"][0]["message"]["content"] == steered.choices[0].message.content
    assert steered.usage.completion_tokens == 16


def test_streaming_sync_and_async_match_non_streaming(steer, server, registered):
    whole = steer.complete(PROMPT, interventions=[{"id": registered, "scale": 0.5}], max_tokens=12,
                           temperature=0, return_token_ids=True).choices[0]
    chunks = list(steer.complete(PROMPT, interventions=[{"id": registered, "scale": 0.5}], max_tokens=12,
                                 temperature=0, return_token_ids=True, stream=True))
    assert all(isinstance(c, steer_client.CompletionChunk) for c in chunks)
    assert [t for c in chunks for ch in c.choices for t in (ch.token_ids or [])] == whole.token_ids
    assert "".join(ch.text for c in chunks for ch in c.choices) == whole.text

    async def chat_stream():
        async with AsyncClient(server.url, timeout=300) as client:
            stream = await client.chat(CHAT, intervention=registered, max_tokens=12, temperature=0, stream=True)
            return [c async for c in stream]

    pieces = asyncio.run(chat_stream())
    text = "".join(ch.delta.content or "" for c in pieces for ch in c.choices)
    assert pieces[0].choices[0].delta.role == "assistant"
    assert text == steer.chat(CHAT, intervention=registered, max_tokens=12, temperature=0).choices[0].message.content


def test_cli(server, registered, capsys):
    assert client_cli(["--base-url", server.url, "list"]) == 0
    assert registered in capsys.readouterr().out
    assert client_cli(["--base-url", server.url, "chat", "-i", registered, "--max-tokens", "8",
                       "What is the capital of France?"]) == 0
    streamed = capsys.readouterr().out.strip()
    assert streamed
    assert client_cli(["--base-url", server.url, "get", "nope"]) == 1
    assert "404" in capsys.readouterr().err
