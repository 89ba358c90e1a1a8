"""Every error path answers with OpenAI's error shape and the right status (issue 7, items 3-4, 6).

Most cases run against ``guarded_server`` (API key, admin key, tiny limits); a few need the
default ``server`` (no CORS there) or the in-process app over a fake engine (an engine fault).
"""
from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import httpx
import pytest

from conftest import ADMIN_KEY, USER_KEY
from fake_engine import FAULT_TOKEN, FakeEngine, fake_app
from steering_helpers import random_loreft, register

USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = [{"role": "user", "content": "Hi"}]


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """``response`` is an OpenAI-style error with ``status`` (and ``code``/``param`` when given)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert param in (error["param"] or ""), error
    return error


@pytest.fixture(scope="module")
def guarded(guarded_server):
    with httpx.Client(base_url=guarded_server.url, timeout=120, headers=ADMIN) as client:
        yield client


@pytest.fixture(scope="module")
def guarded_iv(guarded, intervention_dir):
    register(guarded, intervention_dir, "err-iv", random_loreft(71))
    return "err-iv"


def test_401_without_or_with_a_wrong_key(guarded_server):
    with httpx.Client(base_url=guarded_server.url, timeout=60) as anon:
        for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "x"}),
                                   ("POST", "/v1/chat/completions", {"messages": CHAT}),
                                   ("GET", "/v1/interventions", None), ("POST", "/v1/interventions", {})]:
            response = anon.request(method, path, json=body)
            assert_error(response, 401, "invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
            assert_error(anon.request(method, path, json=body, headers={"Authorization": "Bearer wrong"}), 401)
            assert_error(anon.request(method, path, json=body, headers={"Authorization": USER_KEY}), 401)
        assert anon.get("/health").status_code == 200 and anon.get("/ready").status_code == 200
        assert anon.get("/metrics").status_code == 200


def test_403_for_management_with_the_user_key(guarded, guarded_server, guarded_iv):
    with httpx.Client(base_url=guarded_server.url, timeout=60, headers=USER) as user:
        assert user.get("/v1/models").status_code == 200
        assert user.get(f"/v1/interventions/{guarded_iv}").status_code == 200
        assert_error(user.post("/v1/interventions", json={"id": "x", "source": "y"}), 403, "insufficient_permissions")
        assert_error(user.patch(f"/v1/interventions/{guarded_iv}", json={"scale": 2}), 403)
        assert_error(user.delete(f"/v1/interventions/{guarded_iv}"), 403)
        body = {"prompt": "Hello", "max_tokens": 2, "intervention": guarded_iv}
        assert user.post("/v1/completions", json=body).status_code == 200
    assert guarded.get(f"/v1/interventions/{guarded_iv}").json()["scale"] == 1.0


def test_404s(guarded, guarded_iv):
    assert_error(guarded.post("/v1/completions", json={"prompt": "x", "intervention": "nope"}), 404,
                 "intervention_not_found", "intervention")
    assert_error(guarded.post("/v1/chat/completions", json={"messages": CHAT, "interventions": [{"id": "nope"}]}),
                 404, "intervention_not_found")
    assert_error(guarded.post("/v1/chat/completions", json={"messages": CHAT, "model": "no-such-model"}), 404,
                 "model_not_found", "model")
    assert_error(guarded.get("/v1/interventions/nope"), 404, "intervention_not_found")
    assert_error(guarded.patch("/v1/interventions/nope", json={"scale": 1}), 404)
    assert_error(guarded.delete("/v1/interventions/nope"), 404)
    assert_error(guarded.get("/v1/nothing-here"), 404, "not_found")
    assert_error(guarded.delete("/health"), 405, "method_not_allowed")


def test_409_for_an_existing_id(guarded, guarded_iv, intervention_dir):
    response = guarded.post("/v1/interventions", json={"id": guarded_iv, "source": str(intervention_dir / guarded_iv)})
    assert_error(response, 409, "conflict", "id")
    replaced = guarded.post("/v1/interventions", json={"id": guarded_iv, "source": str(intervention_dir / guarded_iv),
                                                       "replace": True})
    assert replaced.status_code == 201, replaced.text


@pytest.mark.parametrize("payload,param", [
    ({"prompt": "hi", "max_tokens": 17}, "max_tokens"),                         # above --max-tokens-limit 16
    ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": "maybe"}}, "stream_options"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "stop": [""]}, None),                                      # vLLM's errors name no param
    ({"prompt": "hi", "intervention_positions": "f1+"}, "intervention_positions"),
    ({"prompt": "hi", "interventions": [{"id": "a", "bogus": 1}]}, "interventions"),
    ({"prompt": "hi", "interventions": [{"id": "a", "scale": 1e9}]}, "interventions"),
    ({"prompt": [[]]}, None),
    ({"prompt": "x " * 600, "max_tokens": 4}, "input_tokens"),                   # longer than the context
    ({"prompt": ["hi"] * 9, "max_tokens": 1}, "prompt"),                         # --max-sequences-per-request 8
    ({"prompt": ["hi"] * 3, "n": 3, "max_tokens": 1}, "n"),
    ({"prompt": "hi", "return_hidden_states": True}, "return_hidden_states"),  # vllm-router's no-op only when false
])
def test_400_completions(guarded, payload, param):
    assert_error(guarded.post("/v1/completions", json=payload), 400, param=param)


@pytest.mark.parametrize("payload,param", [
    ({"messages": []}, None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
    ({"messages": CHAT, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": CHAT, "temperature": 3}, "temperature"),
    ({"messages": CHAT, "n": 9}, "n"),
])
def test_400_chat(guarded, payload, param):
    assert_error(guarded.post("/v1/chat/completions", json=payload), 400, param=param)


def test_max_tokens_limit_also_caps_the_default(guarded):
    body = {"messages": CHAT, "ignore_eos": True, "temperature": 0}
    usage = guarded.post("/v1/chat/completions", json=body).json()["usage"]
    assert usage["completion_tokens"] == 16                      # --max-tokens-limit 16, not the default 256


def test_400_bodies_that_are_not_json(guarded, guarded_iv):
    raw = {"content-type": "application/json"}
    for path in ("/v1/completions", "/v1/interventions", f"/v1/interventions/{guarded_iv}"):
        method = "PATCH" if path.endswith(guarded_iv) else "POST"
        assert_error(guarded.request(method, path, content=b"{not json", headers=raw), 400)
        assert_error(guarded.request(method, path, content=b"[" * 30000, headers=raw), 400)
        assert_error(guarded.request(method, path, content=b'"just a string"', headers=raw), 400)
    lone_surrogate = b'{"prompt": "\\ud800 hello", "max_tokens": 2}'
    assert_error(guarded.post("/v1/completions", content=lone_surrogate, headers=raw), 400)
    unknown_model = b'{"prompt": "x", "model": "\\udfff"}'
    assert_error(guarded.post("/v1/completions", content=unknown_model, headers=raw), 404)
    infinite = b'{"prompt": "x", "intervention_scale": Infinity}'
    assert_error(guarded.post("/v1/completions", content=infinite, headers=raw), 400, param="intervention_scale")


def test_400_registration(guarded, intervention_dir, guarded_iv):
    assert_error(guarded.post("/v1/interventions", json={"id": "", "source": "x"}), 400, param="id")
    assert_error(guarded.post("/v1/interventions", json={"id": "a b", "source": "x"}), 400, param="id")
    assert_error(guarded.post("/v1/interventions", json={"id": "ok", "source": "x", "evil": 1}), 400)
    assert_error(guarded.post("/v1/interventions", json={"id": "ok", "source": "no/such-dir"}), 400,
                 "source_not_found")  # looks like a hub id, and this server has --no-hub
    assert_error(guarded.post("/v1/interventions", json={"id": "ok", "source": "/etc"}), 400, "source_not_allowed")
    assert_error(guarded.post("/v1/interventions", json={"id": "ok", "source": "../../../etc"}), 400)
    assert_error(guarded.patch(f"/v1/interventions/{guarded_iv}", json={"positions": "sideways"}), 400,
                 param="positions")
    assert_error(guarded.patch(f"/v1/interventions/{guarded_iv}", json={"scale": "big"}), 400, param="scale")


def test_413_declared_chunked_and_uploaded(guarded):
    big = b'{"prompt": "' + b"a" * 70000 + b'"}'
    response = guarded.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert_error(response, 413, "request_too_large")

    def chunks():
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * 4096
        yield b'"}'

    response = guarded.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "request_too_large")
    files = {"intervention.json": ("intervention.json", b"{}"),
             "weights.safetensors": ("weights.safetensors", b"\0" * 300_000)}
    assert_error(guarded.post("/v1/interventions", data={"id": "too-big"}, files=files), 413, param="weights")
    # a multipart content-type lifts the limit only for the registration upload, not on other routes
    small = {"intervention.json": ("intervention.json", b"{}"), "weights.safetensors": ("w", b"\0" * 100_000)}
    assert_error(guarded.post("/v1/completions", data={"prompt": "x"}, files=small), 413, "request_too_large")
    assert guarded.get("/health").json() == {"status": "ok"}
    assert_error(guarded.get("/v1/interventions/too-big"), 404)


async def test_429_with_retry_after_at_the_concurrency_limit():
    """Two slow requests fill a limit of 2; a third gets 429, and passes once they are done."""
    app, state = fake_app(FakeEngine(step_seconds=0.05), max_concurrent_requests=2)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        slow = [asyncio.create_task(client.post("/v1/completions", json={"prompt": [5], "max_tokens": 200}))
                for _ in range(2)]
        while state.limiter.in_flight < 2:
            await asyncio.sleep(0.01)
        response = await client.post("/v1/completions", json={"prompt": [5], "max_tokens": 2})
        error = assert_error(response, 429, "rate_limit_exceeded")
        assert error["type"] == "rate_limit_error" and int(response.headers["retry-after"]) >= 1
        assert (await client.get("/v1/models")).status_code == 200     # only generation counts against the limit
        assert [r.status_code for r in await asyncio.gather(*slow)] == [200, 200]
        assert (await client.post("/v1/completions", json={"prompt": [5], "max_tokens": 2})).status_code == 200
        assert state.limiter.in_flight == 0


async def test_admission_counts_sequences_not_requests():
    """prompts × n count against the limits: past the per-request cap a 400 naming the field; a request
    that would take the sequences in flight past their cap a 429, while a smaller one still fits."""
    app, state = fake_app(FakeEngine(step_seconds=0.05), max_sequences_per_request=8, max_concurrent_sequences=12)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        too_many = await client.post("/v1/completions", json={"prompt": [[5]] * 3, "n": 3, "max_tokens": 2})
        assert "9 sequences" in assert_error(too_many, 400, "too_many_sequences", param="n")["message"]
        slow = asyncio.create_task(client.post("/v1/completions", json={"prompt": [5], "n": 8, "max_tokens": 100}))
        while state.limiter.sequences < 8:
            await asyncio.sleep(0.01)
        assert (await client.get("/ready")).json()["sequences"] == 8
        assert_error(await client.post("/v1/completions", json={"prompt": [5], "n": 5, "max_tokens": 2}), 429,
                     "rate_limit_exceeded")
        fits = await client.post("/v1/completions", json={"prompt": [5], "n": 4, "max_tokens": 2})
        assert fits.status_code == 200, fits.text
        assert (await slow).status_code == 200
        assert state.limiter.in_flight == 0 and state.limiter.sequences == 0


def _raw_exchange(url: str, data: bytes, wait: float = 0.0) -> tuple[float, bytes]:
    """Send ``data`` on a fresh connection; read until the server closes it. (seconds, answer)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        started, answer = time.monotonic(), b""
        while chunk := sock.recv(65536):
            answer += chunk
        return time.monotonic() - started, answer


def _error_of(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower(), answer[:300]
    return int(head.split()[1]), json.loads(body)["error"]


def test_http_level_limits_answer_in_the_openai_shape(guarded_server, guarded):
    """Malformed requests, oversized heads, and clients that send their head or body too slowly
    (--http-header-timeout 2, --http-body-timeout 3) are answered with the OpenAI error body and the
    connection is closed; the server stays healthy."""
    url = guarded_server.url
    status, error = _error_of(_raw_exchange(url, b"NOT AN HTTP REQUEST\r\n\r\n")[1])
    assert status == 400 and error["code"] == "invalid_http_request"
    huge_head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    status, error = _error_of(_raw_exchange(url, huge_head)[1])
    assert status == 431 and error["code"] == "request_header_too_large"
    unfinished_huge_head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000   # never ends
    status, error = _error_of(_raw_exchange(url, unfinished_huge_head)[1])
    assert status == 400 and error["code"] == "invalid_http_request"
    seconds, answer = _raw_exchange(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    status, error = _error_of(answer)
    assert status == 408 and error["code"] == "request_timeout" and 1.5 < seconds < 10, (seconds, error)
    seconds, answer = _raw_exchange(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                    + USER_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    status, error = _error_of(answer)
    assert status == 408 and "body" in error["message"] and 2.5 < seconds < 12, (seconds, error)
    assert guarded.get("/health").json() == {"status": "ok"}
    assert guarded.get("/ready").json()["in_flight"] == 0


def _read_response(sock: socket.socket) -> bytes:
    """One whole response (head + content-length body) from a kept-alive connection; b"" if it closed."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        if not (chunk := sock.recv(65536)):
            return answer
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_an_idle_kept_alive_connection_outlives_the_header_timeout(guarded_server):
    """Between two requests of a kept-alive connection only the keep-alive timeout runs
    (--http-keep-alive-timeout 5, longer than the 2 s header timeout): a client reusing its idle
    connection after 3.5 s is answered, not disconnected; after 5 s idle the server closes it."""
    host, port = guarded_server.url.removeprefix("http://").split(":")
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        for idle in (0, 3.5):
            time.sleep(idle)
            sock.sendall(request)
            assert _read_response(sock).startswith(b"HTTP/1.1 200"), idle
        started = time.monotonic()
        assert sock.recv(65536) == b""                     # closed by the server, idle
        assert 4 < time.monotonic() - started < 15


def test_errors_by_code_in_metrics(guarded):
    guarded.get("/v1/interventions/nope")
    text = guarded.get("/metrics").text
    counts = {m[0]: float(m[1]) for m in re.findall(r'^steer_errors_total\{code="(\d+)"\} (\S+)$', text, re.M)}
    assert counts.get("404", 0) >= 1 and counts.get("400", 0) >= 1
    if "413" in counts:
        assert counts["413"] >= 1


def test_request_id_and_structured_access_log(guarded_server, guarded):
    response = guarded.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "user": "alice-7"},
                            headers={"X-Request-Id": "trace-abc-123"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-abc-123"
    generated = guarded.get("/v1/models").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", generated)
    assert guarded.get("/v1/models", headers={"X-Request-Id": "bad id!"}).headers["x-request-id"] != "bad id!"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        records = [json.loads(line.split("steer_serve.access: ", 1)[1])
                   for line in guarded_server.log_path.read_text(errors="replace").splitlines()
                   if "steer_serve.access: " in line]
        mine = [r for r in records if r["request_id"] == "trace-abc-123"]
        if mine:
            break
        time.sleep(0.2)
    assert mine, "no access log line for the request"
    assert mine[0] | {"ms": 0} == {"request_id": "trace-abc-123", "method": "POST", "path": "/v1/completions",
                                   "status": 200, "ms": 0, "client": "127.0.0.1", "bytes_in": mine[0]["bytes_in"],
                                   "user": "alice-7", "interventions": "none", "stream": False}
    assert any(r["request_id"] == generated and r["path"] == "/v1/models" for r in records)


def test_cors_only_for_the_configured_origin(guarded_server, server):
    preflight = {"Origin": "http://allowed.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    response = httpx.options(f"{guarded_server.url}/v1/chat/completions", headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://allowed.example"
    other = httpx.options(f"{guarded_server.url}/v1/chat/completions",
                          headers={**preflight, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    default = httpx.options(f"{server.url}/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in default.headers
    plain = httpx.get(f"{server.url}/v1/models", headers={"Origin": "http://allowed.example"})
    assert "access-control-allow-origin" not in plain.headers


async def test_engine_error_is_a_5xx_for_that_request_only():
    """A failing engine request costs only its own request: others finish, limits and pins come back."""
    app, state = fake_app(max_concurrent_requests=8)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        good = {"prompt": [5, 6, 7], "max_tokens": 4}
        bad = {"prompt": [FAULT_TOKEN, 1], "max_tokens": 4}
        results = await asyncio.gather(client.post("/v1/completions", json=good),
                                       client.post("/v1/completions", json=bad),
                                       client.post("/v1/completions", json={**bad, "stream": True}),
                                       client.post("/v1/completions", json=good), return_exceptions=True)
        assert [results[i].status_code for i in (0, 1, 3)] == [200, 500, 200]
        assert results[0].json()["choices"][0]["token_ids"] == [8, 9, 10, 11] == results[3].json()["choices"][0]["token_ids"]
        assert_error(results[1], 500, "internal_error")
        cut = results[2]                                 # the failed stream breaks off, never ends as a success
        assert isinstance(cut, Exception) or "[DONE]" not in cut.text
        assert state.limiter.in_flight == 0
        assert (await client.get("/health")).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert re.search(r'steer_errors_total\{code="500"\} [12]\.0', metrics)
