"""Decode throughput with many distinct interventions in one batch vs the unsteered model (issue 5, item 7).

One server (``--max-interventions 64 --max-rank 4``), K random LoReFT rank-4 interventions at one
layer (positions ``all``) and K on every layer; batch B requests x N new tokens (greedy, ignore_eos)
for: unsteered, K = 1, 8, 64 distinct (one layer), K = 64 every layer, and unsteered again (drift
control). With ``--adapters`` the server also serves weight-space adapters (``--max-loras 1``) and
two rows are added: every request on one PEFT LoRA (the fixture adapter), and LoRA + K = 8 LoReFT
per request (issue 10); every row then runs on the LoRA-enabled server. Each configuration gets a warm-up batch (loads its slots) and ``--rounds`` timed batches
with fresh prompts; tok/s is the best round (the least disturbed on a shared machine; the median
is recorded too). The ratio is to the mean of the two unsteered rows.

    python benchmarks/steered_throughput.py [--quick] [--url http://127.0.0.1:8000]

Writes benchmarks/results/steered_throughput[_quick].json and .png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_util import (RESULTS, add_ratios, machine, prompts,
                        random_loreft_native, register_all, start_server, table, timed_batch)
from live_server import FIXTURES_LORA
from steer_client import Client

FULL = {"batch": 64, "new_tokens": 64, "prompt_len": 32, "ks": [1, 8, 64], "every_layer_k": 64, "rounds": 3}
QUICK = {"batch": 16, "new_tokens": 16, "prompt_len": 16, "ks": [1, 8, 16], "every_layer_k": 16, "rounds": 2}
SERVER_ARGS = ["--max-interventions", "64", "--max-rank", "4"]
LAYER = 15
ADAPTER_ARGS = ["--max-loras", "1", "--allowed-intervention-dir", str(FIXTURES_LORA)]
RECORDED_ADAPTER_ARGS = ["--max-loras", "1", "--allowed-intervention-dir", "tests/fixtures/data_lora"]
LORA_ID = "bench-lora"


def configurations(p: dict) -> list[tuple[str, list[str | None]]]:
    """(label, intervention id per request) in the order they are measured."""
    b = p["batch"]
    rows = [("unsteered", [None] * b)]
    rows += [(f"K={k} one layer", [f"bench-one-{i % k}" for i in range(b)]) for k in p["ks"]]
    k = p["every_layer_k"]
    rows.append((f"K={k} on {p['every_layers']} layers", [f"bench-all-{i % k}" for i in range(b)]))
    if p.get("adapters"):
        rows.append(("LoRA only", [LORA_ID] * b))
        rows.append(("LoRA + K=8 one layer", [(LORA_ID, f"bench-one-{i % 8}") for i in range(b)]))
    rows.append(("unsteered (again)", [None] * b))
    return rows


def steering_fields(ids: str | tuple[str, ...] | None) -> dict:
    """Request fields naming one id, several ids (applied in order), or none."""
    if ids is None:
        return {}
    if isinstance(ids, tuple):
        return {"interventions": [{"id": i} for i in ids]}
    return {"intervention": ids}


def prepare(url: str, workdir: Path, p: dict) -> list[str]:
    """Write and register the random interventions; returns their ids."""
    one = {f"bench-one-{i}": random_loreft_native(workdir / f"one-{i}", 1000 + i, [LAYER]) for i in range(max(p["ks"]))}
    every = {f"bench-all-{i}": random_loreft_native(workdir / f"all-{i}", 2000 + i, list(range(p["every_layers"])))
             for i in range(p["every_layer_k"])}
    started = time.perf_counter()
    register_all(url, {**one, **every}, positions="all", upload=True)
    if p.get("adapters"):
        with Client(url, timeout=600) as client:
            client.interventions.register(LORA_ID, str(FIXTURES_LORA / "peft_lora"), replace=True)
    print(f"registered {len(one) + len(every)} interventions in {time.perf_counter() - started:.1f}s", flush=True)
    return [*one, *every, *([LORA_ID] if p.get("adapters") else [])]


def measure(url: str, p: dict) -> list[dict]:
    """Time every configuration; one row per configuration."""
    rows, reference_tokens = [], None
    for c, (label, ids) in enumerate(configurations(p)):
        steering = [steering_fields(i) for i in ids]
        again = label.endswith("(again)")
        timed_batch(url, prompts(p["batch"], p["prompt_len"], 10_000 + c), steering, 4)  # warm-up: load slots
        seconds, first_tokens = [], None
        for r in range(p["rounds"]):
            batch = prompts(p["batch"], p["prompt_len"], (100 if again else 0) + r)
            elapsed, tokens = timed_batch(url, batch, steering, p["new_tokens"])
            seconds.append(elapsed)
            first_tokens = first_tokens or tokens
        reference_tokens = reference_tokens or first_tokens
        tok_s = [p["batch"] * p["new_tokens"] / s for s in seconds]
        changed = None if again else sum(a != b for a, b in zip(first_tokens, reference_tokens)) / p["batch"]
        rows.append({"config": label, "distinct": len(set(ids) - {None}), "tok_s": max(tok_s),
                     "tok_s_median": statistics.median(tok_s), "tok_s_rounds": tok_s,
                     "changed_vs_unsteered": changed})
        print(f"  {label:<22} {rows[-1]['tok_s']:8.1f} tok/s  rounds {[round(t, 1) for t in tok_s]}", flush=True)
    add_ratios(rows)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    from steer_loadtest.plots import bars

    base = add_ratios(rows)
    bars([r["config"].replace(" ", "\n", 1) for r in rows], [r["tok_s"] for r in rows], path, "output tok/s", title,
         reference=0.95 * base)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"small version: {QUICK}")
    ap.add_argument("--url", help="use a running server (started with the flags above) instead of starting one")
    ap.add_argument("--rounds", type=int, help="timed batches per configuration")
    ap.add_argument("--every-layers", type=int, help="layers 0..N-1 for the every-layer row (default: all)")
    ap.add_argument("--adapters", action="store_true", help="add the LoRA-only and LoRA + LoReFT rows (issue 10)")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/steered_throughput*.json)")
    args = ap.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    p["rounds"] = args.rounds or p["rounds"]
    p["adapters"] = args.adapters
    suffix = ("_quick" if args.quick else "") + ("_adapters" if args.adapters else "")
    out = args.out or RESULTS / f"steered_throughput{suffix}.json"
    workdir = Path(tempfile.mkdtemp(prefix="steered-throughput-"))
    server_args = SERVER_ARGS + (ADAPTER_ARGS if args.adapters else [])
    server = None if args.url else start_server(workdir, workdir, *server_args)
    url = args.url or server.url
    try:
        with Client(url) as client:
            model = client.models()[0]
        num_layers = json.loads((Path(model.root) / "config.json").read_text())["num_hidden_layers"]
        p["every_layers"] = args.every_layers or num_layers
        ids = prepare(url, workdir, p)
        rows = measure(url, p)
        if args.url:
            with Client(url) as client:
                for name in ids:
                    client.interventions.delete(name, force=True)
    finally:
        if server is not None:
            server.stop()
    print(table(rows, [("config", "configuration", ""), ("distinct", "distinct", "d"), ("tok_s", "tok/s", ".1f"),
                       ("ratio", "ratio", ".3f"), ("changed_vs_unsteered", "changed", ".2f")]))
    out.parent.mkdir(parents=True, exist_ok=True)
    recorded_args = SERVER_ARGS + (RECORDED_ADAPTER_ARGS if args.adapters else [])
    doc = {"benchmark": "steered_throughput", "quick": args.quick, "params": p, "server_args": recorded_args,
           "model": model.id, "layer": LAYER, "num_layers": num_layers, "machine": machine(),
           "measured_unix": time.time(), "rows": rows}
    out.write_text(json.dumps(doc, indent=2))
    plot(rows, out.with_suffix(".png"), f"batch {p['batch']} x {p['new_tokens']} new tokens, {model.id}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
