"""The load-testing harness (``steer-loadtest``): a fake cross-talking target offline, then the live server."""
from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from steer_loadtest import LoadConfig, run_loadtest, runner
from steer_loadtest.cli import is_loopback, main as loadtest_cli
from steer_loadtest.plots import latency_cdf
from steer_loadtest.stats import percentile
from steer_loadtest.workload import LengthDist, mix_weights, workload
from steering_helpers import random_loreft, register

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class CrossTalkTarget:
    """A fake server whose greedy tokens depend only on (prompt, intervention) -- except that a request
    naming ``leaky`` gets a wrong last token whenever another request is in flight at the same time."""

    def __init__(self, names: list[str], leaky: str):
        self.names, self.leaky, self.in_flight = names, leaky, 0

    def tokens(self, body: dict, crowded: bool) -> list[int]:
        rng = random.Random(json.dumps([body["prompt"], body.get("intervention")]))
        ids = [rng.randrange(1000) for _ in range(body["max_tokens"])]
        if crowded and body.get("intervention") == self.leaky:
            ids[-1] += 1
        return ids

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/interventions":
            return httpx.Response(200, json={"object": "list", "data": [{"id": n} for n in self.names]})
        body = json.loads(request.content)
        if not body.get("stream"):
            choice = {"index": 0, "text": "", "token_ids": self.tokens(body, self.in_flight > 0)}
            return httpx.Response(200, json={"id": "x", "object": "text_completion", "choices": [choice]})
        self.in_flight += 1
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self.stream(body))

    async def stream(self, body: dict):
        await asyncio.sleep(0.02)  # let the other requests arrive
        ids = self.tokens(body, self.in_flight > 1)
        for token in ids:
            await asyncio.sleep(0.001)
            chunk = {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "t", "token_ids": [token]}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        self.in_flight -= 1  # before [DONE]: the client stops reading there
        yield b"data: [DONE]\n\n"


def test_verify_catches_cross_talk_on_a_fake_target(tmp_path):
    target = CrossTalkTarget(["a", "b", "leaky"], leaky="leaky")
    cfg = LoadConfig(base_url="http://fake", concurrency=6, num_requests=30, num_interventions=3,
                     none_fraction=0.2, prompt_len="uniform:2:6", output_len="normal:6:2", verify=30)
    report, results = asyncio.run(run_loadtest(cfg, transport=httpx.MockTransport(target), progress_stream=None))
    assert report["requests"] == {"sent": 30, "ok": 30, "failed": 0}
    assert set(report["per_intervention"]) == {"a", "b", "leaky", "none"}
    verify = report["verify"]
    assert verify["checked"] == 30 and verify["mismatched"] > 0
    assert {m["intervention"] for m in verify["mismatches"]} == {"leaky"}
    assert all(m["first_difference"] == m["batched_tokens"] - 1 for m in verify["mismatches"])
    assert report["ttft_s"]["p50"] <= report["ttft_s"]["p99"] <= report["latency_s"]["p99"]
    json.dumps(report)
    assert latency_cdf(results, tmp_path / "cdf.png").read_bytes()[:8] == PNG_MAGIC


def test_open_loop_rate_and_duration_bound():
    target = CrossTalkTarget(["a"], leaky="none")
    cfg = LoadConfig(base_url="http://fake", rate=200.0, duration=0.5, interventions=["a"], output_len="4")
    report, _ = asyncio.run(run_loadtest(cfg, transport=httpx.MockTransport(target), progress_stream=None))
    assert 40 <= report["requests"]["sent"] <= 200  # Poisson at 200/s for 0.5 s
    assert report["requests"]["failed"] == 0 and report["tokens"]["output"] == 4 * report["requests"]["sent"]


def test_workload_and_stats_helpers():
    assert [LengthDist.parse(t).kind for t in ("8", "uniform:2:9", "normal:30:5")] == ["fixed", "uniform", "normal"]
    for bad in ("0", "uniform:9:2", "poisson:3", "normal:0:1"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)
    weights = mix_weights(4, "zipf", 1.0)
    assert weights == sorted(weights, reverse=True) and abs(sum(weights) - 1) < 1e-9
    specs = workload(["a", "b"], LengthDist.parse("uniform:3:5"), LengthDist.parse("7"), none_fraction=0.5, seed=1)
    batch = [next(specs) for _ in range(200)]
    assert 60 < sum(s.intervention is None for s in batch) < 140
    assert all(3 <= len(s.prompt) <= 5 and s.max_tokens == 7 for s in batch)
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 99) is None
    assert is_loopback("http://127.0.0.1:8000") and is_loopback("http://localhost:1")
    assert not is_loopback("http://10.1.2.3:8000")
    assert loadtest_cli(["--base-url", "http://10.1.2.3:8000", "--rate", "1", "--num-requests", "1"]) == 1


def test_live_run_writes_json_and_png_and_verify_flags_injected_mismatch(client, intervention_dir, server,
                                                                        tmp_path, monkeypatch):
    names = [f"lt-{i}" for i in range(3)]
    for i, name in enumerate(names):
        register(client, intervention_dir, name, random_loreft(300 + i, layer=8 + 6 * i))
    real_send = runner.send_one

    async def corrupting(client_, spec, t0, ignore_eos):
        """Inject a cross-talk symptom: every batched ``lt-1`` result gets a wrong last token."""
        result = await real_send(client_, spec, t0, ignore_eos)
        if spec.intervention == "lt-1" and result.token_ids:
            result.token_ids[-1] = (result.token_ids[-1] + 1) % 1000
        return result

    monkeypatch.setattr(runner, "send_one", corrupting)
    out = tmp_path / "run.json"
    code = loadtest_cli(["--base-url", server.url, "--concurrency", "4", "--num-requests", "12",
                         "--interventions", *names, "--none-fraction", "0.25", "--prompt-len", "uniform:4:12",
                         "--output-len", "8", "--verify", "4", "--seed", "3", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["requests"] == {"sent": 12, "ok": 12, "failed": 0}, report["error_samples"]
    assert report["tokens"]["output"] == 12 * 8 and report["throughput"]["output_tok_s"] > 0
    for name in ("ttft_s", "tpot_s", "latency_s"):
        assert 0 < report[name]["p50"] <= report[name]["p90"] <= report[name]["p99"]
    assert sum(v["requests"] for v in report["per_intervention"].values()) == 12
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    verify = report["verify"]
    assert verify["checked"] == 4 and "lt-1" in verify["checked_interventions"]
    assert {m["intervention"] for m in verify["mismatches"]} == {"lt-1"}  # and nothing else differs
    assert code == 2
