"""Reliability under hostile input, faults and load, with nothing lost (issue 9).

Live servers: ``server`` (hostile inputs, disconnects, DELETE under load), ``small_server`` (2 slots:
eviction churn, pool exhaustion, soak), ``guarded_server`` (SIGTERM drain + restart). The registry's
crash safety is a unit test over the real registry with a stand-in engine. ``STEER_SOAK_SECONDS``
makes the soak long (default 30 s of traffic).
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

import hostile_inputs
from conftest import ADMIN_KEY
from live_server import REPO, ServerProcess
from steering_helpers import complete, random_loreft, register, tokens
from starlette.requests import ClientDisconnect
from steer_loadtest import LoadConfig, run_loadtest

PROMPTS = [[504, 3575, 282, 4649, 314], [1780, 314, 253, 1345, 282, 3233, 30], [19556, 1172, 28, 2013, 28, 216]]
SOAK_SECONDS = float(os.environ.get("STEER_SOAK_SECONDS", "30"))


def metric(client: httpx.Client, name: str) -> float:
    """One unlabelled sample from ``/metrics``."""
    match = re.search(rf"^{name} (\S+)$", client.get("/metrics").text, re.M)
    assert match, name
    return float(match.group(1))


def wait_idle(client: httpx.Client, names=(), timeout: float = 20) -> None:
    """Wait until no request is in flight and every pin is released (the server's own counters)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [n for n in names if client.get(f"/v1/interventions/{n}").json()["in_flight"]]
        if not busy and metric(client, "steer_slot_refcount_total") == 0 and \
                metric(client, "steer_requests_in_flight") == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"still busy after {timeout}s: {busy}, refcount "
                         f"{metric(client, 'steer_slot_refcount_total')}, in flight "
                         f"{metric(client, 'steer_requests_in_flight')}")


# ----- hostile adapters -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_env(server, intervention_dir, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    with httpx.Client(base_url=server.url, timeout=300) as c:
        before = {i["id"] for i in c.get("/v1/interventions").json()["data"]}
    return {"allowed": intervention_dir, "outside": outside, "marker": outside / "pwned", "before": before}


@pytest.mark.parametrize("builder", hostile_inputs.BUILDERS, ids=lambda b: b.__name__)
def test_hostile_adapter_is_a_clear_400(client, hostile_env, builder):
    source, words = builder(hostile_env["allowed"], hostile_env["outside"], hostile_env["marker"])
    name = f"hostile-{builder.__name__}"
    response = client.post("/v1/interventions", json={"id": name, "source": source})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["code"] and error["type"] == "invalid_request_error", error
    assert not hostile_env["marker"].exists(), "a pickle payload ran"
    assert client.get(f"/v1/interventions/{name}").status_code == 404
    assert client.get("/health").json() == {"status": "ok"}


def test_hostile_uploads(client, hostile_env):
    good = hostile_inputs.save_native(random_loreft(920), hostile_env["outside"] / "upload-src")
    meta, weights = (good / "intervention.json").read_bytes(), (good / "weights.safetensors").read_bytes()
    pickled = hostile_env["outside"] / "payload.pt"
    import torch
    torch.save({"w": hostile_inputs.Payload(hostile_env["marker"])}, pickled)
    cases = [("truncated", meta, weights[: len(weights) // 3]), ("pickle-as-safetensors", meta, pickled.read_bytes()),
             ("garbage-meta", os.urandom(2000), weights), ("empty", b"", b"")]
    for label, meta_bytes, weight_bytes in cases:
        files = {"intervention.json": ("intervention.json", meta_bytes),
                 "weights.safetensors": ("weights.safetensors", weight_bytes)}
        response = client.post("/v1/interventions", data={"id": f"hostile-upload-{label}"}, files=files)
        assert response.status_code == 400, (label, response.text)
        assert client.get(f"/v1/interventions/hostile-upload-{label}").status_code == 404
    assert not hostile_env["marker"].exists()


def test_nothing_hostile_was_registered(client, server, hostile_env):
    after = {i["id"] for i in client.get("/v1/interventions").json()["data"]}
    assert not {i for i in after - hostile_env["before"] if i.startswith("hostile")}
    registry = Path(server.args[server.args.index("--registry-dir") + 1]) / "registry.json"
    assert "hostile" not in registry.read_text()
    assert not hostile_env["marker"].exists()
    assert client.get("/health").json() == {"status": "ok"}
    assert tokens(complete(client, PROMPTS[0], 4))


# ----- faults -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _raw_post(url: str, body: dict, path: str = "/v1/completions"):
    """Send a JSON POST on a raw socket; the connection is closed, unread, when the block ends."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        yield


def _raw_request_then_hang_up(url: str, body: dict) -> None:
    """Send a request on a raw socket and close it before reading a byte of the answer."""
    with _raw_post(url, body):
        time.sleep(0.05)


def test_client_disconnect_mid_stream_frees_the_request_and_its_pin(client, server, intervention_dir):
    register(client, intervention_dir, "fault-disconnect", random_loreft(930))
    body = {"prompt": PROMPTS[0], "max_tokens": 1500, "ignore_eos": True, "stream": True,
            "intervention": "fault-disconnect"}
    for _ in range(3):
        with httpx.Client(base_url=server.url, timeout=120) as c, c.stream("POST", "/v1/completions", json=body) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    assert client.get("/v1/interventions/fault-disconnect").json()["in_flight"] == 1
                    break
    for _ in range(5):
        _raw_request_then_hang_up(server.url, body)
    started = time.monotonic()
    wait_idle(client, ["fault-disconnect"])
    assert time.monotonic() - started < 20           # 1500 tokens would take minutes: the engine aborted them
    assert client.get("/v1/interventions/fault-disconnect").json()["status"] == "loaded"
    assert tokens(complete(client, PROMPTS[0], 4, intervention="fault-disconnect"))


def _generated_tokens(client: httpx.Client) -> float:
    """vLLM's own count of tokens generated so far (all engines)."""
    return sum(float(v) for v in re.findall(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)$",
                                            client.get("/metrics").text, re.M))


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 1500, "ignore_eos": True}),
    ("/v1/completions", {"prompt": [PROMPTS[0], PROMPTS[1]], "n": 2, "max_tokens": 1500, "ignore_eos": True}),
    ("/v1/completions", {"prompt": PROMPTS[1], "n": 3, "max_tokens": 1500, "ignore_eos": True, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1500,
                              "ignore_eos": True, "intervention": "fault-abandon"}),
], ids=["non-streaming", "batched-prompts-n2", "streaming-n3", "chat-steered"])
def test_an_abandoned_request_of_any_kind_stops_generating(client, server, intervention_dir, path, body):
    """The client sends a 1500-token request, lets it run, and closes the connection without reading:
    within seconds the server holds no request, no pin, and the engine generates nothing more."""
    if "fault-abandon" not in client.get("/v1/interventions").text:
        register(client, intervention_dir, "fault-abandon", random_loreft(932))
    with _raw_post(server.url, body, path):
        before = _generated_tokens(client)
        while _generated_tokens(client) < before + 8:      # it is generating
            time.sleep(0.1)
    left = time.monotonic()
    wait_idle(client, ["fault-abandon"], timeout=10)
    released = time.monotonic() - left
    settled = _generated_tokens(client)
    time.sleep(1.5)
    assert _generated_tokens(client) == settled, "the engine kept generating for a client that left"
    assert released < 5, released


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
@pytest.mark.parametrize("leaves", ["before the first byte", "after two chunks"])
async def test_stream_cleanup_runs_however_the_client_leaves(spec_version, leaves):
    """In process, at the ASGI level: the request's pins, concurrency place and engine request go."""
    from fake_engine import FakeEngine, fake_app

    engine = FakeEngine(step_seconds=0.01)
    app, state = fake_app(engine)
    body = json.dumps({"prompt": [5, 6], "max_tokens": 500, "stream": True}).encode()
    inbox = [{"type": "http.request", "body": body, "more_body": False}]
    chunks, gone = [], asyncio.Event()

    async def receive():
        if inbox:
            return inbox.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if leaves == "before the first byte" or len(chunks) == 2:
            gone.set()
            if spec_version == "2.4":
                raise OSError("client went away")
            await asyncio.sleep(0.05)
        chunks.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 9), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    try:
        await asyncio.wait_for(app(scope, receive, send), 10)
    except ClientDisconnect:                             # how Starlette reports it under ASGI spec 2.4
        assert spec_version == "2.4"
    assert state.limiter.in_flight == 0
    assert len(engine.aborted) == (0 if leaves == "before the first byte" else 1)
    assert len(chunks) < 10


def _stream_tokens(url: str, body: dict, barrier: threading.Barrier | None = None) -> tuple[int, list[int], float]:
    with httpx.Client(base_url=url, timeout=300) as c:
        if barrier is not None:
            c.get("/health")                             # connected; then all send at once
            barrier.wait(60)
        return _read_stream(c, body)


def _read_stream(c: httpx.Client, body: dict) -> tuple[int, list[int], float]:
    ids = []
    with c.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    ids += choice.get("token_ids") or []
        return r.status_code, ids, time.monotonic()


def test_delete_while_20_requests_use_it(client, server, intervention_dir):
    register(client, intervention_dir, "fault-delete", random_loreft(931))
    bodies = [{"prompt": PROMPTS[i % 3], "max_tokens": 32, "ignore_eos": True, "temperature": 0, "stream": True,
               "return_token_ids": True, "intervention": "fault-delete"} for i in range(20)]
    solo = {i: _stream_tokens(server.url, bodies[i])[1] for i in range(3)}
    barrier = threading.Barrier(20)
    with cf.ThreadPoolExecutor(21) as pool:
        futures = [pool.submit(_stream_tokens, server.url, b, barrier) for b in bodies]
        deadline, most = time.monotonic() + 120, 0
        while most < 20:
            most = max(most, client.get("/v1/interventions/fault-delete").json()["in_flight"])
            done = sum(f.done() for f in futures)
            assert time.monotonic() < deadline and not done, f"at most {most} ran together; {done} finished"
            time.sleep(0.05)
        refused = client.delete("/v1/interventions/fault-delete")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "conflict"
        assert "in use by 20" in refused.json()["error"]["message"]
        forced = pool.submit(client.delete, "/v1/interventions/fault-delete", params={"force": "true"})
        time.sleep(0.5)
        late = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "intervention": "fault-delete"})
        assert late.status_code == 404                   # no new users while it drains
        deleted = forced.result(120)
        deleted_at = time.monotonic()
        results = [f.result(120) for f in futures]
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert [status for status, _, _ in results] == [200] * 20
    assert all(ids == solo[i % 3] for i, (_, ids, _) in enumerate(results))
    assert all(len(ids) == 32 for _, ids, _ in results)
    assert max(done for _, _, done in results) <= deleted_at
    assert client.get("/v1/interventions/fault-delete").status_code == 404
    wait_idle(client)


@pytest.fixture(scope="module")
def small(small_server):
    with httpx.Client(base_url=small_server.url, timeout=300) as c:
        yield c


def test_more_distinct_interventions_than_slots(small, small_server, intervention_dir):
    names = [f"pool-{i}" for i in range(6)]
    for i, name in enumerate(names):
        register(small, intervention_dir, name, random_loreft(940 + i, layer=4 + 4 * i))
    reqs = [(PROMPTS[i % 3], names[i % 6]) for i in range(12)]
    solo = {(tuple(p), n): tokens(complete(small, p, 12, intervention=n)) for p, n in set(
        (tuple(p), n) for p, n in reqs)}
    with cf.ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda r: tokens(complete(small, r[0], 12, intervention=r[1])), reqs))
    assert together == [solo[(tuple(p), n)] for p, n in reqs]
    assert len(set(map(tuple, together))) > 3
    wait_idle(small, names)


def test_register_evict_loop_while_traffic_runs(small, small_server, intervention_dir):
    stable = ["churn-stable-0", "churn-stable-1", "churn-stable-2"]
    for i, name in enumerate(stable):
        register(small, intervention_dir, name, random_loreft(950 + i, layer=6 + 7 * i))
    work = [(p, n) for p in PROMPTS[:2] for n in stable + [None]]
    fields = lambda n: {"intervention": n} if n else {}
    reference = {(tuple(p), n): tokens(complete(small, p, 10, **fields(n))) for p, n in work}
    evictions_before = metric(small, "steer_slot_evictions")
    stop = time.monotonic() + 12
    mismatches, statuses, cycles = [], [], [0]

    def traffic(seed: int):
        rng = random.Random(seed)
        with httpx.Client(base_url=small_server.url, timeout=300) as c:
            while time.monotonic() < stop:
                p, n = rng.choice(work)
                r = c.post("/v1/completions", json={"prompt": p, "max_tokens": 10, "temperature": 0,
                                                    "return_token_ids": True, **fields(n)})
                statuses.append(r.status_code)
                if r.status_code == 200 and r.json()["choices"][0]["token_ids"] != reference[(tuple(p), n)]:
                    mismatches.append((p, n))

    def churn():
        with httpx.Client(base_url=small_server.url, timeout=300) as c:
            while time.monotonic() < stop:
                k = cycles[0]
                name = f"churn-temp-{k % 3}"
                target = intervention_dir / f"churn-temp-src-{k}"
                hostile_inputs.save_native(random_loreft(960 + k, layer=k % 30), target)
                created = c.post("/v1/interventions", json={"id": name, "source": str(target), "replace": True})
                assert created.status_code == 201, created.text
                assert len(tokens(complete(c, PROMPTS[2], 4, intervention=name))) == 4
                assert c.delete(f"/v1/interventions/{name}", params={"force": "true"}).status_code == 200
                cycles[0] += 1

    with cf.ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(traffic, s) for s in range(3)] + [pool.submit(churn)]:
            f.result(300)
    assert statuses and set(statuses) == {200}, set(statuses)
    assert not mismatches
    assert cycles[0] >= 2
    assert metric(small, "steer_slot_evictions") > evictions_before
    wait_idle(small, stable)


def test_sigterm_drains_in_flight_requests_then_restart_keeps_the_registry(guarded_server, intervention_dir):
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=guarded_server.url, timeout=300, headers=headers) as c:
        register(c, intervention_dir, "persist-a", random_loreft(970, layer=10), positions="l1")
        assert c.patch("/v1/interventions/persist-a", json={"scale": 0.7}).status_code == 200
        src = hostile_inputs.save_native(random_loreft(971, layer=18), intervention_dir / "persist-b-src")
        files = {n: (n, (src / n).read_bytes()) for n in ("intervention.json", "weights.safetensors")}
        assert c.post("/v1/interventions", data={"id": "persist-b"}, files=files).status_code == 201
        before = {n: c.get(f"/v1/interventions/{n}").json() for n in ("persist-a", "persist-b")}
        expected = {n: tokens(complete(c, PROMPTS[1], 16, intervention=n)) for n in before}
    bodies = {n: {"prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0, "ignore_eos": False, "stream": True,
                  "return_token_ids": True, "intervention": n} for n in expected}
    first_chunk = {n: threading.Event() for n in bodies}
    results = {}

    def stream(name):
        ids, lines = [], []
        with httpx.Client(base_url=guarded_server.url, timeout=300, headers=headers) as c, \
                c.stream("POST", "/v1/completions", json=bodies[name]) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    first_chunk[name].set()
                    if line.startswith("data: {"):
                        ids += json.loads(line[6:])["choices"][0].get("token_ids") or []
        results[name] = (r.status_code, ids, lines[-1])

    threads = [threading.Thread(target=stream, args=(n,)) for n in bodies]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in first_chunk.values())
    guarded_server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert guarded_server.proc.wait(90) is not None
    assert {n: (status, ids, last) for n, (status, ids, last) in results.items()} == \
        {n: (200, expected[n], "data: [DONE]") for n in expected}
    assert "Traceback" not in guarded_server.tail(200)
    guarded_server.stop()

    guarded_server.start()
    with httpx.Client(base_url=guarded_server.url, timeout=300, headers=headers) as c:
        after = {n: c.get(f"/v1/interventions/{n}").json() for n in before}
        keys = ("content_hash", "scale", "positions", "source", "format", "created", "num_parameters", "edits")
        assert {n: {k: d[k] for k in keys} for n, d in after.items()} == \
            {n: {k: d[k] for k in keys} for n, d in before.items()}
        assert after["persist-a"]["scale"] == 0.7 and after["persist-a"]["positions"] == "l1"
        assert {n: tokens(complete(c, PROMPTS[1], 16, intervention=n)) for n in after} == expected


_CRASH_SCRIPT = textwrap.dedent("""
    import asyncio, pathlib, sys, types
    sys.path.insert(0, {tests!r})
    from steer_serve.registry import InterventionRegistry
    from steering_helpers import random_loreft

    class Engine:
        geometry = {{"num_slots": 2, "max_rank": 8, "max_columns": 4, "components": ("block_output",),
                     "num_layers": 30, "hidden_size": 576, "widths": {{"block_output": 576}}, "heads": {{}}}}
        settings = types.SimpleNamespace(max_loras=0, max_lora_rank=16, model="/nonexistent")

    async def main(directory, start):
        registry = InterventionRegistry(Engine(), persist_dir=pathlib.Path(directory))
        await registry.restore()
        for k in range(start, start + 1000):
            await registry.register(f"iv-{{k}}", random_loreft(k, layer=k % 30), source="x", format="native")
            if k % 3 == 0 and f"iv-{{k - 1}}" in registry.entries:
                await registry.unregister(f"iv-{{k - 1}}")
            print("committed", k, flush=True)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
""")


def _persisted_states(state: frozenset, start: int, count: int) -> list[frozenset]:
    """Every registry state the writer script persists, in order, from ``state`` on."""
    states = [state]
    for k in range(start, start + count):
        state = state | {f"iv-{k}"}
        states.append(state)
        if k % 3 == 0 and f"iv-{k - 1}" in state:
            state = state - {f"iv-{k - 1}"}
            states.append(state)
    return states


def test_a_crash_during_registry_writes_never_loses_the_previous_registry(tmp_path):
    """SIGKILL a process that registers and deletes in a loop, at random moments: every time, the
    registry on disk restores to a state the process wrote, never older than its last acknowledged one."""
    from fake_engine import FakeEngine
    from steer_serve.registry import InterventionRegistry

    script = tmp_path / "writer.py"
    script.write_text(_CRASH_SCRIPT.format(tests=str(REPO / "tests")))
    rng = random.Random(5)
    state, start = frozenset(), 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "registry"), str(start)],
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
        acknowledged, target = start - 1, rng.randint(2, 8)
        while acknowledged < start + target - 1:
            line = proc.stdout.readline()
            assert line, "the writer died on its own"
            acknowledged = int(line.split()[1])
        time.sleep(rng.uniform(0, 0.2))                  # land somewhere inside a later write
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        states = _persisted_states(state, start, 1000)
        registry = InterventionRegistry(FakeEngine(), persist_dir=tmp_path / "registry")
        restored = frozenset(asyncio.run(registry.restore()))
        assert restored in states, sorted(restored)
        acknowledged_state = _persisted_states(state, start, acknowledged - start + 1)[-1]
        assert states.index(restored) >= states.index(acknowledged_state), (sorted(restored), acknowledged)
        state, start = restored, start + 1000


def test_a_failed_registry_write_leaves_the_previous_one_and_registers_nothing(tmp_path, monkeypatch):
    from fake_engine import FakeEngine
    from steer_serve.registry import InterventionRegistry, RegistryError

    async def scenario():
        registry = InterventionRegistry(FakeEngine(), persist_dir=tmp_path)
        await registry.register("kept", random_loreft(980), source="x", format="native")
        saved = (tmp_path / "registry.json").read_bytes()
        real_replace = os.replace

        def failing_replace(src, dst):
            if str(dst).endswith("registry.json"):
                raise OSError(28, "No space left on device (injected)")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", failing_replace)
        with pytest.raises((RegistryError, OSError)):
            await registry.register("lost", random_loreft(981), source="x", format="native")
        monkeypatch.setattr(os, "replace", real_replace)
        assert (tmp_path / "registry.json").read_bytes() == saved
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".registry.json")]
        assert "lost" not in registry.entries
        fresh = InterventionRegistry(FakeEngine(), persist_dir=tmp_path)
        assert await fresh.restore() == ["kept"]

    asyncio.run(scenario())


# ----- soak -------------------------------------------------------------------------------------
def _tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


async def _aborts(url: str, names: list[str], stop: float, counts: dict) -> None:
    rng = random.Random(3)
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        while time.monotonic() < stop:
            body = {"prompt": rng.choice(PROMPTS), "max_tokens": 64, "ignore_eos": True, "stream": True,
                    "intervention": rng.choice(names)}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                wanted, seen = rng.randint(0, 4), 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen > wanted:
                        break
            counts["aborts"] += 1


async def _churn(url: str, directory: Path, stop: float, counts: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        while time.monotonic() < stop:
            k = counts["churn"]
            target = directory / f"soak-churn-src-{k}"
            hostile_inputs.save_native(random_loreft(2000 + k, layer=k % 30), target)
            r = await c.post("/v1/interventions", json={"id": "soak-churn", "source": str(target), "replace": True})
            assert r.status_code == 201, r.text
            r = await c.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4, "intervention": "soak-churn"})
            assert r.status_code == 200, r.text
            assert (await c.delete("/v1/interventions/soak-churn", params={"force": "true"})).status_code == 200
            counts["churn"] += 1


def test_soak(small, small_server, intervention_dir):
    names = [f"soak-{i}" for i in range(4)]
    for i, name in enumerate(names):
        register(small, intervention_dir, name, random_loreft(1000 + i, layer=3 + 7 * i))
        complete(small, PROMPTS[0], 4, intervention=name)
    rss_before = _tree_rss(small_server.proc.pid)
    counts = {"aborts": 0, "churn": 0}
    cfg = LoadConfig(base_url=small_server.url, concurrency=4, duration=SOAK_SECONDS, interventions=names,
                     none_fraction=0.2, prompt_len="uniform:4:40", output_len="uniform:4:24", verify=12, seed=11)

    async def run():
        stop = time.monotonic() + SOAK_SECONDS
        load = asyncio.create_task(run_loadtest(cfg, progress_stream=None))
        await asyncio.gather(_aborts(small_server.url, names, stop, counts),
                             _churn(small_server.url, intervention_dir, stop, counts))
        return await load

    report, results = asyncio.run(run())
    failed = [(r.status, r.error) for r in results if not r.ok]
    wait_idle(small, names)
    rss_growth = _tree_rss(small_server.proc.pid) - rss_before
    figures = {"requests_served": len(results) - len(failed), "requests_failed": len(failed),
               "aborted_streams": counts["aborts"], "churn_cycles": counts["churn"],
               "verified": report["verify"]["checked"], "cross_talk": report["verify"]["mismatched"],
               "rss_growth_mb": round(rss_growth / 2**20, 1), "seconds": SOAK_SECONDS}
    print("soak figures:", json.dumps(figures))
    assert not failed, failed[:5]
    assert report["verify"]["checked"] >= 8 and report["verify"]["mismatched"] == 0, report["verify"]
    assert len(results) >= 10 and counts["aborts"] >= 3 and counts["churn"] >= 2, figures
    assert rss_growth < 400 * 2**20, figures
    assert small.get("/health").json() == {"status": "ok"}


def test_a_second_server_on_one_registry_dir_refuses_to_start(small_server, tmp_path):
    """Two servers on one --registry-dir would overwrite each other's registry: the second one exits at
    once (before loading the model), naming the directory and the holder's pid; the first keeps serving."""
    registry_dir = small_server.args[small_server.args.index("--registry-dir") + 1]
    second = ServerProcess(registry_dir=Path(registry_dir), log_path=tmp_path / "second.log")
    with pytest.raises(RuntimeError, match="is in use by another steer-serve process"):
        second.start(timeout=120)
    assert httpx.get(f"{small_server.url}/health", timeout=10).status_code == 200


def test_a_port_in_use_fails_before_the_engine_starts(tmp_path):
    """The HTTP port is bound before the engine loads: a port another process holds is a clear exit at
    once, with no engine process started."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "steer_serve.cli", "serve", "--port", str(port),
                              "--registry-dir", str(tmp_path / "registry")],
                             capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert f"steer-serve: cannot bind 127.0.0.1:{port}" in run.stderr, run.stderr[-2000:]
    assert "EngineCore" not in run.stdout + run.stderr


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_frozen_or_dead_engine_takes_the_server_down(tmp_path, fault):
    """SIGKILL of the engine processes (what an OOM kill does) or SIGSTOP (a frozen engine, seen when
    a round trip stays unanswered for ``--engine-stall-timeout``): an in-flight request ends with a
    5xx at once, ``/ready`` and new requests answer 503 with the OpenAI error body, and the process
    exits non-zero within seconds, so a supervisor restarts it (vLLM's server does the same)."""
    from fixtures.tiny_models import build_tiny_model
    from steer_serve.model import prepare_default_model

    build_tiny_model("LlamaForCausalLM", tmp_path / "model", prepare_default_model())
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))  # RoPE
    proc = ServerProcess("--model", str(tmp_path / "model"), "--max-model-len", "4096", "--engine-stall-timeout", "3",
                         registry_dir=tmp_path / "registry", log_path=tmp_path / "server.log").start()
    engine = psutil.Process(proc.proc.pid).children(recursive=True)
    try:
        assert httpx.get(f"{proc.url}/ready", timeout=10).status_code == 200
        with cf.ThreadPoolExecutor(1) as pool, httpx.Client(base_url=proc.url, timeout=10) as client:
            # 4000 tokens take the tiny model seconds: the fault comes while it generates (400 did not
            # always: it once finished before the fault)
            in_flight = pool.submit(httpx.post, f"{proc.url}/v1/completions", timeout=120, json={
                "prompt": "Hello", "max_tokens": 4000, "ignore_eos": True})
            started = time.monotonic()
            while not (_generated_tokens(client) or in_flight.done()) and time.monotonic() - started < 30:
                time.sleep(0.1)
            faulted = time.monotonic()
            for child in engine:
                child.suspend() if fault == "SIGSTOP" else child.kill()
            answers = []
            while proc.proc.poll() is None and time.monotonic() - faulted < 60:
                try:
                    answers.append((httpx.get(f"{proc.url}/ready", timeout=5),
                                    httpx.post(f"{proc.url}/v1/completions", timeout=5,
                                               json={"prompt": "Hi", "max_tokens": 2})))
                except httpx.HTTPError:
                    pass                                 # shutting down: connections refused
                time.sleep(0.2)
            code, exited = proc.proc.wait(60), time.monotonic() - faulted
            ended = in_flight.result()
        assert ended.status_code >= 500 and "error" in ended.json(), ended.text
        assert code != 0 and exited < 20, (code, exited, proc.tail())
        said = "has not answered" if fault == "SIGSTOP" else "the engine died"
        assert said in proc.log_path.read_text(errors="replace"), proc.tail()
        refused = [(ready, new) for ready, new in answers if ready.status_code == 503]
        assert refused, answers
        for ready, new in refused:
            assert new.status_code == 503 and new.json()["error"]["code"] == "engine_dead", new.text
    finally:
        for child in engine:
            with contextlib.suppress(psutil.Error):
                child.kill()
        proc.stop()


async def test_force_delete_serves_the_requests_already_waiting_for_a_slot():
    """Both slots pinned by others; a request for `c` waits for a slot. A force-DELETE of `c` then
    lets that waiting request be served (it was accepted before the delete) and only refuses new
    ones; the delete completes once it is done."""
    from fake_engine import FakeEngine
    from steer_serve.registry import InterventionRegistry, RegistryError

    registry = InterventionRegistry(FakeEngine())
    for i, name in enumerate("abc"):
        await registry.register(name, random_loreft(940 + i), source="test", format="native")
    held = [await registry.acquire([(name, None, None)]) for name in "ab"]
    waiting = asyncio.create_task(registry.acquire([("c", None, None)]))
    await asyncio.sleep(0.05)
    deleting = asyncio.create_task(registry.unregister("c", force=True, timeout=10))
    await asyncio.sleep(0.05)
    with pytest.raises(RegistryError) as refused:
        await registry.acquire([("c", None, None)])
    assert refused.value.code == "intervention_not_found"
    await registry.release(held[0])
    lease = await asyncio.wait_for(waiting, 5)            # served, not 404
    assert lease.steering.slots and not deleting.done()
    await registry.release(lease)
    await asyncio.wait_for(deleting, 5)
    assert "c" not in registry.entries and all(owner.id != "c" for owner in registry.slots.owner.values())
    await registry.release(held[1])


async def test_leftovers_of_a_crashed_write_are_removed_at_start_up(tmp_path):
    """A process killed mid-write leaves `.<hash>.tmp-*` weight dirs and `.registry.json.*` files; the next
    start removes them and restores what registry.json holds."""
    from fake_engine import FakeEngine
    from steer_serve.registry import InterventionRegistry

    first = InterventionRegistry(FakeEngine(), persist_dir=tmp_path)
    await first.register("kept", random_loreft(950), source="test", format="native")
    leftovers = [tmp_path / "weights" / ".abc.tmp-x1", tmp_path / "adapters" / ".def.tmp-y2"]
    for leftover in leftovers:
        leftover.mkdir(parents=True)
        (leftover / "weights.safetensors").write_bytes(b"half")
    (tmp_path / ".registry.json.k3j2").write_text('{"version": 1, "interventions": [')
    second = InterventionRegistry(FakeEngine(), persist_dir=tmp_path)
    assert await second.restore() == ["kept"]
    assert not any(leftover.exists() for leftover in leftovers)
    assert not list(tmp_path.glob(".registry.json.*"))
    assert len(list((tmp_path / "weights").iterdir())) == 1
