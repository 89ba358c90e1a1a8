"""Shared fixtures: live servers (started once per session) and fixture data paths."""
from __future__ import annotations

import json

import httpx
import pytest

from live_server import FIXTURES, FIXTURES_LORA, FIXTURES_PEFT, RedisServer, ServerProcess


#: vLLM serve flags the default server takes, passed through unchanged (tool calling: SmolLM2 has no
#: special tool tokens, so the pythonic parser; cached prompt tokens in ``usage``).
VLLM_FLAGS = ("--enable-auto-tool-choice", "--tool-call-parser", "pythonic", "--enable-prompt-tokens-details")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report carries the log tail of every server still listed as started (the
    ones it used, and any that died under it): CI keeps nothing else of a server's log."""
    report = yield
    if report.failed:
        for proc in ServerProcess.started:
            state = "running" if proc.proc.poll() is None else f"exited with {proc.proc.returncode}"
            report.sections.append((f"server log {proc.log_path.name} ({state}, port {proc.port})", proc.tail(80)))
    return report


@pytest.fixture(scope="session")
def server(tmp_path_factory, intervention_dir):
    """The default server: default model, prefix caching on, 16 slots, fixtures dir allowed, and vLLM's
    tool-calling flags (passed through to vLLM unchanged)."""
    root = tmp_path_factory.mktemp("server")
    proc = ServerProcess("--allowed-intervention-dir", str(FIXTURES), "--allowed-intervention-dir",
                         str(intervention_dir), "--max-interventions", "16", *VLLM_FLAGS,
                         registry_dir=root / "registry", log_path=root / "server.log").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def small_server(tmp_path_factory, intervention_dir):
    """A constrained server: 2 slots, 32-token steps (chunked prefill), 16 sequences, 2 LoRA slots, prompt
    embeddings on (prompt-space PEFT adapters)."""
    root = tmp_path_factory.mktemp("small_server")
    proc = ServerProcess("--allowed-intervention-dir", str(FIXTURES), "--allowed-intervention-dir",
                         str(intervention_dir), "--allowed-intervention-dir", str(FIXTURES_LORA),
                         "--allowed-intervention-dir", str(FIXTURES_PEFT),
                         "--max-loras", "2", "--max-interventions", "2", "--enable-prompt-embeds",
                         "--max-num-batched-tokens", "32", "--max-num-seqs", "16", "--max-model-len", "512",
                         registry_dir=root / "registry", log_path=root / "server.log").start()
    yield proc
    proc.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def generation_fixture(name: str) -> dict:
    return json.loads((FIXTURES / "generation" / f"{name}.json").read_text())


@pytest.fixture(scope="session")
def intervention_dir(tmp_path_factory):
    """An allowed directory the tests write native interventions into."""
    return tmp_path_factory.mktemp("interventions")


USER_KEY, ADMIN_KEY = "user-key", "admin-key"


@pytest.fixture(scope="session")
def guarded_server(tmp_path_factory, intervention_dir):
    """The one server with special flags (all such tests share it): API and admin keys, tiny limits
    (2 concurrent requests, 8 sequences per request, 64 KiB bodies, 256 KiB uploads, 16 max_tokens,
    2 s / 3 s to send a head / body, 5 s keep-alive), 4 slots, no hub, CORS for one origin. Tests may stop and start it again (same port and registry dir)."""
    root = tmp_path_factory.mktemp("guarded_server")
    proc = ServerProcess("--allowed-intervention-dir", str(FIXTURES), "--allowed-intervention-dir",
                         str(intervention_dir), "--api-key", USER_KEY, "--admin-api-key", ADMIN_KEY,
                         "--max-concurrent-requests", "2", "--max-body-bytes", "65536",
                         "--max-upload-bytes", "262144", "--max-tokens-limit", "16", "--max-interventions", "4",
                         "--max-model-len", "512", "--no-hub", "--cors-origin", "http://allowed.example",
                         "--kv-cache-gb", "1", "--drain-timeout", "60", "--max-sequences-per-request", "8",
                         "--http-header-timeout", "2", "--http-body-timeout", "3", "--http-keep-alive-timeout", "5",
                         registry_dir=root / "registry", log_path=root / "server.log").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real Redis server on a loopback port, for the networked intervention store."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


_redis_dbs = iter(range(16))


@pytest.fixture
def redis_url(redis_server):
    """A Redis database of its own for one test (Redis has 16)."""
    return redis_server.url(next(_redis_dbs))
