"""Chaos run: steady steered traffic while every fault an operator meets is injected, with figures.

One server on the default model. Four client threads send greedy requests (streaming or not, over
a few interventions and none) and compare each answer with its solo answer, recorded first. Each
round injects one fault of each kind, in random order:

* abandoned requests: non-streaming, streaming, batched prompts × n, closed by the client mid-run;
* slow clients: connections that send half a head or half a body, then nothing (must be closed);
* malformed HTTP (must get the OpenAI error body), a fan-out over the per-request cap (400);
* a fan-out at the cap, with a small request sent behind it (its latency against an idle one);
* registration churn: register a new intervention, force-delete an older one (acknowledged ones are
  remembered, to be checked after the restart);
* an engine pause shorter than ``--engine-stall-timeout`` (SIGSTOP, then SIGCONT): must be survived.

At the end: the server must be idle (no request, no pin), then the engine is SIGKILLed (the server
must exit non-zero within seconds), the server is restarted on the same registry (every
acknowledged registration must be there), and its engine is frozen past the stall timeout (it must
exit again). Reported: requests served, mismatches, errors by status, hung requests, faults injected,
registrations lost, RSS drift of the API process, exit times, small-request latency behind a fan-out.

    python benchmarks/chaos.py [--quick] [--seconds 600]

Writes benchmarks/results/chaos[_quick].json.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import signal
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from bench_util import RESULTS, machine, random_loreft_native, start_server

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The best way to learn is"]
HEADER_TIMEOUT, BODY_TIMEOUT, STALL_TIMEOUT = 3, 5, 8
SERVER_ARGS = ["--max-interventions", "4", "--max-num-seqs", "32", "--max-model-len", "1024",
               "--http-header-timeout", str(HEADER_TIMEOUT), "--http-body-timeout", str(BODY_TIMEOUT),
               "--engine-stall-timeout", str(STALL_TIMEOUT)]
PER_REQUEST_CAP = 16                                 # --max-num-seqs 32 / 2


class Traffic:
    """Client threads sending greedy requests and checking each against its solo answer."""

    def __init__(self, url: str, solo: dict, threads: int = 4):
        self.url, self.solo, self.threads = url, solo, threads
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.served, self.mismatches, self.hung = 0, 0, 0
        self.statuses: Counter = Counter()
        self.pool = cf.ThreadPoolExecutor(threads)

    def start(self) -> None:
        self.futures = [self.pool.submit(self._loop, seed) for seed in range(self.threads)]

    def _loop(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self.stop.is_set():
                key = rng.choice(list(self.solo))
                stream = rng.random() < 0.5
                try:
                    text = _complete(client, *key, stream=stream)
                    status = 200
                except httpx.HTTPStatusError as exc:
                    text, status = None, exc.response.status_code
                except httpx.TimeoutException:
                    text, status = None, "timeout"
                except httpx.HTTPError:
                    text, status = None, "connection"
                with self.lock:
                    self.statuses[status] += 1
                    self.hung += status == "timeout"
                    if text is not None:
                        self.served += 1
                        self.mismatches += text != self.solo[key]

    def finish(self) -> dict:
        self.stop.set()
        for future in self.futures:
            future.result()
        return {"served": self.served, "mismatches": self.mismatches, "hung": self.hung,
                "statuses": {str(k): v for k, v in self.statuses.items()}}


def _complete(client: httpx.Client, prompt: str, intervention: str | None, *, stream: bool = False,
              max_tokens: int = 16) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if intervention:
        body["intervention"] = intervention
    if not stream:
        response = client.post("/v1/completions", json=body)
        response.raise_for_status()
        return response.json()["choices"][0]["text"]
    text = ""
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=60)


def _post_bytes(path: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


def abandon(url: str, body: dict) -> None:
    """Send a long request, let it run a second, close the connection unread."""
    with _connect(url) as sock:
        sock.sendall(_post_bytes("/v1/completions", body))
        time.sleep(1.0)


def slow_clients(url: str, count: int) -> dict:
    """``count`` connections sending half a head or half a body; how many the server closed in time."""
    sockets = []
    for i in range(count):
        sock = _connect(url)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" if i % 2 == 0 else
                     b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
        sockets.append(sock)
    deadline, closed = time.monotonic() + max(HEADER_TIMEOUT, BODY_TIMEOUT) + 5, 0
    for sock in sockets:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            while sock.recv(65536):
                pass
            closed += 1
        except OSError:
            pass
        sock.close()
    return {"sent": count, "closed_by_server": closed}


def malformed(url: str, count: int) -> int:
    """Garbage requests; how many got the OpenAI error body (JSON with an ``error`` object)."""
    shaped = 0
    for i in range(count):
        with _connect(url) as sock:
            sock.sendall(random.Random(i).randbytes(64) + b"\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        shaped += b'"error"' in answer and b"application/json" in answer
    return shaped


def fan_out_with_a_small_request_behind(url: str, idle_latency: float) -> dict:
    """A request at the per-request cap (prompts × n), then a 4-token request: its latency behind it."""
    big = {"prompt": PROMPTS[:2], "n": PER_REQUEST_CAP // 2, "max_tokens": 128, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=600) as client, cf.ThreadPoolExecutor(1) as pool:
        over = client.post("/v1/completions", json={**big, "n": PER_REQUEST_CAP})
        running = pool.submit(client.post, "/v1/completions", json=big)
        time.sleep(1.0)
        started = time.monotonic()
        _complete(client, PROMPTS[0], None, max_tokens=4)
        behind = time.monotonic() - started
        big_status = running.result().status_code
    return {"over_cap_status": over.status_code, "big_status": big_status, "small_latency_s": round(behind, 2),
            "small_latency_vs_idle": round(behind / idle_latency, 2)}


def engine_processes(server) -> list[psutil.Process]:
    return psutil.Process(server.proc.pid).children(recursive=True)


def pause_engine(server, seconds: float) -> None:
    processes = engine_processes(server)
    for p in processes:
        p.suspend()
    time.sleep(seconds)
    for p in processes:
        p.resume()


def exit_after(server, fault: str) -> dict:
    """SIGKILL or SIGSTOP the engine; how the server process ends."""
    processes = engine_processes(server)
    started = time.monotonic()
    for p in processes:
        p.kill() if fault == "kill" else p.suspend()
    try:
        code = server.proc.wait(120)
    except Exception:
        code = None
    seconds = time.monotonic() - started
    for p in processes:
        try:
            p.kill()
        except psutil.Error:
            pass
    server.stop()
    return {"fault": fault, "exit_code": code, "exit_after_s": round(seconds, 1)}


def run(seconds: float, work: Path) -> dict:
    sources = {f"chaos-{i}": random_loreft_native(work / f"iv{i}", 700 + i, [5, 15]) for i in range(3)}
    server = start_server(work / "server", work, *SERVER_ARGS)
    api = psutil.Process(server.proc.pid)
    acknowledged, deleted = set(), set()
    figures: dict = {"faults": Counter()}
    try:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            for name, path in sources.items():
                client.post("/v1/interventions", json={"id": name, "source": str(path)}).raise_for_status()
                acknowledged.add(name)
            solo = {(p, i): _complete(client, p, i) for p in PROMPTS for i in [None, *sources]}
            started = time.monotonic()
            _complete(client, PROMPTS[0], None, max_tokens=4)
            idle_latency = time.monotonic() - started
            rss_start = api.memory_info().rss
            traffic = Traffic(server.url, solo)
            traffic.start()
            deadline, round_no, fanouts = time.monotonic() + seconds, 0, []
            while time.monotonic() < deadline:
                faults = ["abandon", "slow", "malformed", "fanout", "churn", "pause"]
                random.Random(round_no).shuffle(faults)
                for fault in faults:
                    figures["faults"][fault] += 1
                    if fault == "abandon":
                        long = {"max_tokens": 1000, "ignore_eos": True}
                        abandon(server.url, {"prompt": PROMPTS[1], **long})
                        abandon(server.url, {"prompt": PROMPTS[2], "stream": True, "intervention": "chaos-0", **long})
                        abandon(server.url, {"prompt": PROMPTS[:2], "n": 2, **long})
                    elif fault == "slow":
                        figures.setdefault("slow_clients", []).append(slow_clients(server.url, 20))
                    elif fault == "malformed":
                        figures["malformed_sent"] = figures.get("malformed_sent", 0) + 10
                        figures["malformed_openai_shaped"] = figures.get("malformed_openai_shaped", 0) + \
                            malformed(server.url, 10)
                    elif fault == "fanout":
                        fanouts.append(fan_out_with_a_small_request_behind(server.url, idle_latency))
                    elif fault == "churn":
                        name = f"churn-{round_no}"
                        path = random_loreft_native(work / name, 800 + round_no, [10])
                        if client.post("/v1/interventions", json={"id": name, "source": str(path)}).status_code == 201:
                            acknowledged.add(name)
                        if round_no and f"churn-{round_no - 1}" in acknowledged:
                            old = f"churn-{round_no - 1}"
                            if client.delete(f"/v1/interventions/{old}", params={"force": "true"}).status_code == 200:
                                deleted.add(old)
                    elif fault == "pause":
                        pause_engine(server, STALL_TIMEOUT / 4)
                round_no += 1
            figures["traffic"] = traffic.finish()
            settle = time.monotonic() + 30
            while time.monotonic() < settle and client.get("/ready").json()["in_flight"]:
                time.sleep(0.5)
            figures["in_flight_after"] = client.get("/ready").json()["in_flight"]
            figures["rss_drift_mib"] = round((api.memory_info().rss - rss_start) / 2**20, 1)
            figures["rounds"] = round_no
            figures["fanout"] = fanouts
        figures["engine_kill"] = exit_after(server, "kill")
        server = start_server(work / "server", work, *SERVER_ARGS)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            present = {item["id"] for item in client.get("/v1/interventions").json()["data"]}
        expected = acknowledged - deleted
        figures["registrations"] = {"acknowledged": len(acknowledged), "deleted": len(deleted),
                                    "lost": sorted(expected - present), "resurrected": sorted(present & deleted)}
        figures["engine_freeze"] = exit_after(server, "stop")
    finally:
        server.stop()
    figures["faults"] = dict(figures["faults"])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="90 s of chaos instead of --seconds")
    parser.add_argument("--seconds", type=float, default=600)
    args = parser.parse_args()
    seconds = 90 if args.quick else args.seconds
    with tempfile.TemporaryDirectory(prefix="steer-chaos-") as work:
        figures = run(seconds, Path(work))
    figures["seconds"], figures["machine"] = seconds, machine()
    out = RESULTS / f"chaos{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(figures, indent=2))
    traffic = figures["traffic"]
    latencies = [f["small_latency_vs_idle"] for f in figures["fanout"]]
    rows = [{"figure": "requests served / mismatches / hung", "value": f"{traffic['served']} / "
             f"{traffic['mismatches']} / {traffic['hung']}"},
            {"figure": "statuses", "value": json.dumps(traffic["statuses"])},
            {"figure": "faults injected", "value": json.dumps(figures["faults"])},
            {"figure": "slow clients closed", "value": f"{sum(s['closed_by_server'] for s in figures['slow_clients'])}"
                                                       f" of {sum(s['sent'] for s in figures['slow_clients'])}"},
            {"figure": "malformed answered in the OpenAI shape",
             "value": f"{figures['malformed_openai_shaped']} of {figures['malformed_sent']}"},
            {"figure": "small request behind a fan-out (x idle, median)",
             "value": f"{statistics.median(latencies):.2f}" if latencies else "-"},
            {"figure": "in flight after the run", "value": str(figures["in_flight_after"])},
            {"figure": "registrations acknowledged / lost", "value": f"{figures['registrations']['acknowledged']} / "
                                                                   f"{len(figures['registrations']['lost'])}"},
            {"figure": "RSS drift of the API process (MiB)", "value": str(figures["rss_drift_mib"])},
            {"figure": "exit after engine SIGKILL (s, code)", "value": f"{figures['engine_kill']['exit_after_s']}, "
                                                                      f"{figures['engine_kill']['exit_code']}"},
            {"figure": "exit after engine SIGSTOP (s, code)", "value": f"{figures['engine_freeze']['exit_after_s']}, "
                                                                      f"{figures['engine_freeze']['exit_code']}"}]
    print("\n".join(f"{row['figure']:<48} {row['value']}" for row in rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
