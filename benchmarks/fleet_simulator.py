"""Estimate a fleet from measured per-replica numbers: affinity vs random routing (issue 17, item 5).

A catalogue of C interventions, Zipf(s) request popularity, R replicas with S slots each (LRU
eviction, as the slot pool does). Affinity routing sends an intervention's requests to one replica
(consistent hashing on the id, as vllm-router does); random routing to any replica. Every request
whose intervention is not in its replica's slots costs one cold load. From the measured cold-load
latency and the unsteered decode throughput of one replica (``benchmarks/capacity.py`` writes
them), it reports slot hit rate, loads per second per replica and the fleet's throughput:

    throughput = R * replica_tok_s * (1 - loads_per_s_per_replica * load_s)

(a slot write stalls that replica's engine for about ``load_s``). Each row has the hit rate of a
simulated run (``--requests`` after as many warming ones) and the long-run one (Che's approximation
for LRU; the throughput columns use it). Sizing rule printed at the end: the smallest S per replica
whose long-run hit rate reaches ``--target-hit-rate`` under each policy.

    python benchmarks/fleet_simulator.py [--capacity benchmarks/results/capacity.json] [--catalogue 10000]

Writes benchmarks/results/fleet_simulator.json.
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import random
import sys
from collections import OrderedDict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


class LruSlots:
    """S slots, least recently used evicted first; ``use`` answers whether it was a hit."""

    def __init__(self, slots: int):
        self.slots, self.held = slots, OrderedDict()

    def use(self, key: int) -> bool:
        if key in self.held:
            self.held.move_to_end(key)
            return True
        if len(self.held) >= self.slots:
            self.held.popitem(last=False)
        self.held[key] = None
        return False


def zipf_sampler(catalogue: int, s: float, rng: random.Random):
    """A function drawing intervention ranks 0..catalogue-1 with P(k) ∝ 1/(k+1)^s."""
    cumulative, total = [], 0.0
    for k in range(catalogue):
        total += 1.0 / (k + 1) ** s
        cumulative.append(total)
    return lambda: bisect.bisect_left(cumulative, rng.random() * total)


def affinity_replica(key: int, replicas: int) -> int:
    """The replica consistent hashing puts an id on (stable across runs)."""
    return int.from_bytes(hashlib.blake2b(f"iv-{key}".encode(), digest_size=8).digest(), "big") % replicas


def simulate(catalogue: int, zipf_s: float, replicas: int, slots: int, requests: int, policy: str,
             seed: int = 0) -> float:
    """Steady-state slot hit rate of ``requests`` Zipf requests, after as many uncounted ones that fill the
    slots (otherwise the first use of each id, a miss no slot count avoids, would dominate)."""
    draw = zipf_sampler(catalogue, zipf_s, random.Random(seed))
    route = random.Random(seed + 1)  # its own stream: both policies see the same requests
    fleet = [LruSlots(slots) for _ in range(replicas)]
    warm, hits = requests, 0
    for i in range(requests + warm):
        key = draw()
        replica = affinity_replica(key, replicas) if policy == "affinity" else route.randrange(replicas)
        hit = fleet[replica].use(key)
        hits += hit and i >= warm
    return hits / requests


def steady_hit_rate(catalogue: int, zipf_s: float, replicas: int, slots: int, policy: str) -> float:
    """Long-run LRU hit rate by Che's approximation (what ``simulate`` tends to over a long enough run):
    item k stays cached with probability 1 - exp(-p_k T), where T makes the expected count equal to
    ``slots``. Affinity: each replica sees only its ids (renormalised); random: every replica sees all."""
    import numpy as np

    popularity = 1.0 / np.arange(1, catalogue + 1) ** zipf_s
    popularity /= popularity.sum()
    if policy == "affinity":
        owner = np.array([affinity_replica(k, replicas) for k in range(catalogue)])
        shares = [popularity[owner == r] for r in range(replicas)]
    else:
        shares = [popularity]
    total = 0.0
    for share in shares:
        mass = share.sum()
        if mass == 0:
            continue
        p = share / mass
        if slots >= len(p):
            total += mass
            continue
        low, high = 0.0, 1.0
        while np.sum(1 - np.exp(-p * high)) < slots:
            high *= 2
        for _ in range(100):
            mid = (low + high) / 2
            low, high = (mid, high) if np.sum(1 - np.exp(-p * mid)) < slots else (low, mid)
        total += mass * float(np.sum(p * (1 - np.exp(-p * high))))
    return total


def estimate(hit_rate: float, replicas: int, rate: float, load_s: float, replica_tok_s: float) -> dict:
    """Loads per second per replica and fleet throughput at ``rate`` requests/s over the fleet."""
    loads = rate * (1 - hit_rate) / replicas
    busy = min(1.0, loads * load_s)
    return {"hit_rate": hit_rate, "loads_per_s_per_replica": loads, "load_busy_fraction": busy,
            "fleet_tok_s": replicas * replica_tok_s * (1 - busy)}


def smallest_slots(catalogue: int, zipf_s: float, replicas: int, policy: str, target: float,
                   max_slots: int = 1 << 16) -> int | None:
    """The smallest power of two S whose long-run hit rate reaches ``target`` (None if ``max_slots`` does not)."""
    slots = 1
    while slots <= max_slots:
        if steady_hit_rate(catalogue, zipf_s, replicas, slots, policy) >= target:
            return slots
        slots *= 2
    return None


def _shown(value):
    """A parameter as the results file records it: paths relative to the repository, never machine-specific."""
    if not isinstance(value, Path):
        return value
    root = RESULTS.parent.parent
    return str(value.resolve().relative_to(root)) if value.resolve().is_relative_to(root) else value.name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", type=Path, default=RESULTS / "capacity.json",
                    help="measured numbers (benchmarks/capacity.py); --load-ms/--replica-tok-s override")
    ap.add_argument("--load-ms", type=float, help="cold load latency of one intervention (ms)")
    ap.add_argument("--replica-tok-s", type=float, help="decode tok/s of one replica")
    ap.add_argument("--catalogue", type=int, default=10_000)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--slots", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--rate", type=float, default=50.0, help="requests per second over the fleet")
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--target-hit-rate", type=float, default=0.9)
    ap.add_argument("--out", type=Path, default=RESULTS / "fleet_simulator.json")
    args = ap.parse_args(argv)
    measured = json.loads(args.capacity.read_text()) if args.capacity.exists() else {}
    load_s = (args.load_ms if args.load_ms is not None else measured["cold_load_ms"]) / 1000
    replica_tok_s = args.replica_tok_s if args.replica_tok_s is not None else measured["unsteered_tok_s"]
    rows = []
    for replicas in args.replicas:
        for slots in args.slots:
            for policy in ("affinity", "random"):
                hit = simulate(args.catalogue, args.zipf, replicas, slots, args.requests, policy)
                steady = steady_hit_rate(args.catalogue, args.zipf, replicas, slots, policy)
                rows.append({"replicas": replicas, "slots": slots, "policy": policy, "simulated_hit_rate": hit,
                             **estimate(steady, replicas, args.rate, load_s, replica_tok_s)})
                r = rows[-1]
                print(f"R={replicas:<3} S={slots:<4} {policy:<8} hit simulated {hit:.3f} long-run {steady:.3f}  "
                      f"loads/s/replica {r['loads_per_s_per_replica']:7.2f}  fleet tok/s {r['fleet_tok_s']:9.1f}",
                      flush=True)
    sizing = {f"R={r}": {policy: smallest_slots(args.catalogue, args.zipf, r, policy, args.target_hit_rate)
                         for policy in ("affinity", "random")}
              for r in args.replicas}
    print(f"slots per replica for hit rate >= {args.target_hit_rate}: {sizing}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "fleet_simulator", "params": {k: _shown(v) for k, v in vars(args).items()},
                                    "load_s": load_s, "replica_tok_s": replica_tok_s, "rows": rows,
                                    "slots_for_target_hit_rate": sizing}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
