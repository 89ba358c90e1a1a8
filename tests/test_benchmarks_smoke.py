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


def test_fleet_simulator_affinity_and_random_routing():
    """The fleet simulator: one replica makes the policies equal; with several, affinity keeps each
    replica's slots on its own share of the catalogue (hit rate above random), and a catalogue that
    fits the fleet's slots loads each id at most once under affinity."""
    import fleet_simulator as sim

    one = [sim.simulate(2000, 1.1, 1, 32, 4000, policy) for policy in ("affinity", "random")]
    assert one[0] == one[1]
    affinity, random_ = (sim.simulate(2000, 1.1, 4, 32, 8000, policy) for policy in ("affinity", "random"))
    assert affinity > random_ + 0.05
    keys = range(40)
    fits = max(sum(sim.affinity_replica(k, 4) == r for k in keys) for r in range(4))
    assert sim.simulate(40, 1.1, 4, fits, 4000, "affinity") >= 1 - 40 / 4000  # at most one load per id
    for policy in ("affinity", "random"):      # the long-run rate (Che) is what a long simulation reaches
        assert abs(sim.steady_hit_rate(500, 1.1, 2, 32, policy) - sim.simulate(500, 1.1, 2, 32, 20000, policy)) < 0.03
    assert sim.steady_hit_rate(40, 1.1, 4, fits, "affinity") == 1.0
    assert sim.estimate(0.5, 2, 10.0, 0.1, 100.0) == {"hit_rate": 0.5, "loads_per_s_per_replica": 2.5,
                                                     "load_busy_fraction": 0.25, "fleet_tok_s": 150.0}
