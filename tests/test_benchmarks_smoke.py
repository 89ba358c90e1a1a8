"""Smoke run of benchmarks/steered_throughput.py's quick mode against the session server (no new server)."""
from __future__ import annotations

import json
import sys

import httpx

from live_server import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import steered_throughput  # noqa: E402


def test_steered_throughput_quick_against_running_server(server, tmp_path):
    out = tmp_path / "steered.json"
    assert steered_throughput.main(["--quick", "--url", server.url, "--rounds", "1", "--every-layers", "3",
                                    "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["config"]: r for r in doc["rows"]}
    assert list(rows) == ["unsteered", "K=1 one layer", "K=8 one layer", "K=16 one layer", "K=16 on 3 layers",
                          "unsteered (again)"]
    assert all(r["tok_s"] > 0 and r["ratio"] > 0 for r in rows.values())
    assert rows["unsteered"]["changed_vs_unsteered"] == 0
    assert rows["K=16 one layer"]["changed_vs_unsteered"] > 0.5  # the interventions really were applied
    assert rows["K=16 on 3 layers"]["changed_vs_unsteered"] > 0.5
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    remaining = httpx.get(f"{server.url}/v1/interventions").json()["data"]
    assert not [i for i in remaining if i["id"].startswith("bench-")]  # --url cleans up after itself
