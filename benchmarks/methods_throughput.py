"""Decode throughput of directional ablation, projection clamps and norm-preserving steering on every
layer, K distinct per batch, and of conditional steering (the LoReFTs gated by a CAST condition at
layer 12 that always holds, so the condition's prompt sums and the gate are paid in full), against
plain LoReFT on every layer and unsteered, in one run (issue 19).

One server with a device slot for every registered intervention (``--max-interventions 4K+1 --max-rank 4``:
with fewer, each configuration would first evict the previous one's and load its own inside the timed
batch, which is what the first full run measured); each method's K random interventions edit
``block_output`` of every layer (positions ``all``); batch B requests x N new tokens (greedy,
ignore_eos); unsteered first and again last. A warm-up round, then rounds that each time every
configuration in turn (interleaved, so load changes on a shared machine hit every row alike), fresh
prompts each time; tok/s is the best round, the ratio is to the mean of the two unsteered rows.

    python benchmarks/methods_throughput.py [--quick]

Writes benchmarks/results/methods_throughput[_quick].json and .png.
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

FULL = {"batch": 64, "new_tokens": 64, "prompt_len": 32, "k": 64, "rounds": 3}
QUICK = {"batch": 16, "new_tokens": 16, "prompt_len": 16, "k": 16, "rounds": 3}
METHODS = ("loreft", "directional_ablation", "projection_clamp", "norm_preserving_steering")
#: a CAST condition that always holds (a cosine is below 2), on the random vector ``condition``
CONDITION = {"intervention": "condition", "layer": 12, "threshold": 2.0, "comparator": "larger"}


def server_args(k: int) -> list[str]:
    """Slots for all K interventions of every method and the condition: none is evicted between rows."""
    return ["--max-interventions", str(len(METHODS) * k + 1), "--max-rank", "4"]


def method_native(directory: Path, method: str, seed: int, layers: list[int], hidden: int = 576) -> Path:
    """A random intervention of ``method`` on ``block_output`` of every layer, saved natively."""
    import torch

    from steer_serve.formats.native import save_native
    from steer_serve.interventions.base import Edit, Intervention, Placement

    if method == "loreft":
        return random_loreft_native(directory, seed, layers)
    gen = torch.Generator().manual_seed(seed)
    edits = []
    for layer in layers:
        r = torch.randn(hidden, generator=gen)
        params, config = {"direction": r}, {}
        if method == "projection_clamp":
            config = {"lo": -1.0, "hi": 1.0}
        elif method == "norm_preserving_steering":
            params = {"vector": 4.0 * r / r.norm()}
        edits.append(Edit(method, Placement(layer, "block_output"), params, config))
    if not directory.exists():
        save_native(Intervention(edits, hidden), directory)
    return directory


def condition_native(directory: Path, layer: int, hidden: int = 576) -> Path:
    """A random steering vector at ``layer`` (block_output): the CAST condition direction."""
    import torch

    from steer_serve.formats.native import save_native
    from steer_serve.interventions.base import Edit, Intervention, Placement

    vector = torch.randn(hidden, generator=torch.Generator().manual_seed(7))
    save_native(Intervention([Edit("steering_vector", Placement(layer, "block_output"), {"vector": vector})], hidden),
                directory)
    return directory


def measure(url: str, p: dict) -> list[dict]:
    """Rounds interleave the configurations (each round times every one in turn), so a load change on a
    shared machine hits every row alike."""
    configs = ([("unsteered", None)] + [(f"{m} K={p['k']}", m) for m in METHODS]
               + [(f"conditional loreft K={p['k']}", "loreft"), ("unsteered (again)", None)])
    steering = {label: [{} if m is None else {"intervention": f"{m}-{i % p['k']}"} for i in range(p["batch"])]
                for label, m in configs}
    for request in steering[f"conditional loreft K={p['k']}"]:
        request["condition"] = CONDITION
    seconds = {label: [] for label, _ in configs}
    for r in range(p["rounds"] + 1):                    # round 0: warm-up (loads the slots), not timed
        for c, (label, _) in enumerate(configs):
            batch = prompts(p["batch"], p["prompt_len"], 100 * c + r)
            elapsed = timed_batch(url, batch, steering[label], p["new_tokens"] if r else 4)[0]
            if r:
                seconds[label].append(elapsed)
    rows = []
    for label, _ in configs:
        tok_s = [p["batch"] * p["new_tokens"] / s for s in seconds[label]]
        rows.append({"config": label, "tok_s": max(tok_s), "tok_s_median": statistics.median(tok_s),
                     "tok_s_rounds": tok_s})
        print(f"  {label:<34} {rows[-1]['tok_s']:8.1f} tok/s  rounds {[round(t, 1) for t in tok_s]}", flush=True)
    add_ratios(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"small version: {QUICK}")
    args = ap.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    out = RESULTS / f"methods_throughput{'_quick' if args.quick else ''}.json"
    workdir = Path(tempfile.mkdtemp(prefix="methods-throughput-"))
    server = start_server(workdir, workdir, *server_args(p["k"]))
    try:
        layers = list(range(30))
        sources = {f"{m}-{i}": method_native(workdir / f"{m}-{i}", m, 1000 * j + i, layers)
                   for j, m in enumerate(METHODS) for i in range(p["k"])}
        sources["condition"] = condition_native(workdir / "condition", CONDITION["layer"])
        started = time.perf_counter()
        register_all(server.url, sources, positions="all", upload=True)
        print(f"registered {len(sources)} interventions in {time.perf_counter() - started:.0f}s", flush=True)
        rows = measure(server.url, p)
    finally:
        server.stop()
    print(table(rows, [("config", "configuration", ""), ("tok_s", "tok/s", ".1f"), ("ratio", "ratio", ".3f")]))
    doc = {"benchmark": "methods_throughput", "quick": args.quick, "params": p, "server_args": server_args(p["k"]),
           "layers": "all 30", "machine": machine(), "measured_unix": time.time(), "rows": rows}
    out.write_text(json.dumps(doc, indent=2))
    from steer_loadtest.plots import bars

    base = add_ratios(rows)
    bars([r["config"].replace(" ", "\n", 1) for r in rows], [r["tok_s"] for r in rows], out.with_suffix(".png"),
         "output tok/s", f"batch {p['batch']} x {p['new_tokens']} new tokens, every layer", reference=0.95 * base)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
