"""What one replica costs per intervention slot, and how long registrations and cold loads take (issue 17, item 5).

1. Memory per slot: the slot tables the engine allocates (``kernels.slot_tables.register_slot_tables``,
   the same call the engine makes per layer and component), measured as allocated bytes for the
   default model's geometry, by max rank and by hooked components, per layer and for all layers.
2. Against one server (``--max-interventions 2`` unless ``--url``): registration latency (native
   uploads), cold-load latency (requests cycling over more ids than slots, so every one loads; the
   engine's ``steer_slot_load_seconds`` histogram), warm vs cold request latency, and unsteered
   decode throughput (for ``fleet_simulator.py``).

    python benchmarks/capacity.py [--quick] [--url URL]

Writes benchmarks/results/capacity[_quick].json.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench_util import RESULTS, machine, prompts, random_loreft_native, start_server, timed_batch
from steer_client import Client

RANKS = (1, 4, 8, 16, 32)
COMPONENT_SETS = {"block_output": ("block_output",),
                  "all eleven": ("block_input", "block_output", "attention_input", "attention_output",
                                 "attention_value_output", "query_output", "key_output", "value_output", "mlp_input",
                                 "mlp_activation", "mlp_output")}


def slot_bytes(width: int, rank: int) -> int:
    """Bytes one more slot adds to one site's tables of ``width`` columns at ``rank``."""
    import torch

    from steer_serve.kernels.slot_tables import register_slot_tables

    def allocated(slots: int) -> int:
        module = torch.nn.Module()
        register_slot_tables(module, "t", slots, rank, width)
        return sum(b.numel() * b.element_size() for b in module.buffers())

    return allocated(2) - allocated(1)


def memory_rows() -> list[dict]:
    """Bytes per slot for the default model, by rank and component set."""
    from steer_serve.engine.architectures import component_geometry
    from steer_serve.model import prepare_default_model

    config = json.loads((prepare_default_model() / "config.json").read_text())
    widths, _ = component_geometry(config)
    rows = []
    for rank in RANKS:
        for label, components in COMPONENT_SETS.items():
            per_layer = sum(slot_bytes(widths[c], rank) for c in components)
            rows.append({"rank": rank, "components": label, "bytes_per_slot_per_layer": per_layer,
                         "mib_per_slot_all_layers": per_layer * config["num_hidden_layers"] / 2 ** 20})
    return rows


def _load_histogram(client: httpx.Client) -> tuple[float, float]:
    values = dict(re.findall(r"^steer_slot_load_seconds_(count|sum) (\S+)$", client.get("/metrics").text, re.M))
    return float(values.get("count", 0)), float(values.get("sum", 0))


def _latency(client: httpx.Client, body: dict) -> float:
    started = time.perf_counter()
    response = client.post("/v1/completions", json=body)
    response.raise_for_status()
    return time.perf_counter() - started


def live_numbers(url: str, workdir: Path, p: dict) -> dict:
    """Registration and cold-load latency, warm vs cold request latency, unsteered decode tok/s."""
    registration = []
    with Client(url, timeout=600) as steer:
        for i in range(p["ids"]):
            directory = random_loreft_native(workdir / f"cap-{i}", 4000 + i, [15])
            started = time.perf_counter()
            steer.interventions.upload(f"cap-{i}", directory, replace=True)
            registration.append(time.perf_counter() - started)
    with httpx.Client(base_url=url, timeout=600) as client:
        body = {"prompt": [504, 3575, 282], "max_tokens": 1, "temperature": 0}
        before = _load_histogram(client)
        cold = [_latency(client, {**body, "intervention": f"cap-{i % p['ids']}"}) for i in range(p["ids"] * 2)]
        loads, seconds = (a - b for a, b in zip(_load_histogram(client), before))
        warm = [_latency(client, {**body, "intervention": "cap-0"}) for _ in range(p["ids"])]
        plain = [_latency(client, body) for _ in range(p["ids"])]
    with Client(url, timeout=600) as steer:
        for i in range(p["ids"]):
            steer.interventions.delete(f"cap-{i}", force=True)
    elapsed, _ = timed_batch(url, prompts(p["batch"], 32, 1), [{}] * p["batch"], p["new_tokens"])
    return {"registration_ms_median": 1000 * statistics.median(registration),
            "registration_ms_max": 1000 * max(registration), "loads": loads,
            "cold_load_ms": 1000 * seconds / max(loads, 1),
            "cold_request_ms_median": 1000 * statistics.median(cold),
            "warm_request_ms_median": 1000 * statistics.median(warm),
            "plain_request_ms_median": 1000 * statistics.median(plain),
            "unsteered_tok_s": p["batch"] * p["new_tokens"] / elapsed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--url", help="a running server with few slots (e.g. --max-interventions 2)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    p = {"ids": 6, "batch": 8, "new_tokens": 8} if args.quick else {"ids": 24, "batch": 32, "new_tokens": 32}
    out = args.out or RESULTS / f"capacity{'_quick' if args.quick else ''}.json"
    memory = memory_rows()
    for row in memory:
        print(f"rank {row['rank']:>2} {row['components']:<13} {row['bytes_per_slot_per_layer']:>9} B/slot/layer "
              f"{row['mib_per_slot_all_layers']:8.3f} MiB/slot (30 layers)")
    workdir = Path(tempfile.mkdtemp(prefix="capacity-"))
    server = None if args.url else start_server(workdir, workdir, "--max-interventions", "2", "--max-rank", "4")
    try:
        live = live_numbers(args.url or server.url, workdir, p)
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(live, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "capacity", "quick": args.quick, "params": p, "machine": machine(),
                               "measured_unix": time.time(), "memory": memory, **live}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
