"""Decode throughput with a PEFT LoRA on every request, with vLLM's CPU LoRA ops and with steer-serve's
grouped ones, side by side in one run (issue 16, item 7).

Two servers at once, the same flags (``--max-loras 1 --max-interventions 8 --max-rank 4``), one started
with ``STEER_SERVE_CPU_LORA_OPS=vllm`` (vLLM's own torch ops, with only the index -1 fix) and one with
the default (``steer_serve.kernels.lora_ops``). Per server and batch size B: unsteered, every request
on the fixture PEFT LoRA (rank 4, q/v/down of layers 8-15), that LoRA + K = 8 distinct LoReFT rank 4
at layer 15 (positions ``all``), and unsteered again; B requests x N new tokens (greedy,
ignore_eos). A warm-up round, then rounds that time every (batch, server, configuration) in turn, so
load changes on a shared machine hit every row alike; both servers get the same prompts. tok/s is
the best round; the ratio is to the mean of the two unsteered rows of the same server and batch;
``same_tokens_as_vllm_ops`` is the share of requests whose tokens equal the vLLM-ops server's.

    python benchmarks/lora_throughput.py [--quick] [--out FILE]

Writes benchmarks/results/lora_throughput[_quick].json and .png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_util import (RESULTS, add_ratios, machine, prompts, random_loreft_native, register_all,
                        start_server, table, timed_batch)
from live_server import FIXTURES_LORA
from steer_client import Client

FULL = {"batches": [16, 64], "new_tokens": 24, "prompt_len": 16, "k": 8, "rounds": 3}
QUICK = {"batches": [16, 64], "new_tokens": 8, "prompt_len": 16, "k": 8, "rounds": 1}
SERVER_ARGS = ["--max-loras", "1", "--max-interventions", "8", "--max-rank", "4"]
OPS = {"vllm": {"STEER_SERVE_CPU_LORA_OPS": "vllm"}, "grouped": {}}
LAYER = 15
LORA_ID = "bench-lora"


def configurations(batch: int, k: int) -> list[tuple[str, list[dict]]]:
    """(label, request fields per request) in the order they are measured."""
    lora_reft = [{"interventions": [{"id": LORA_ID}, {"id": f"bench-reft-{i % k}"}]} for i in range(batch)]
    return [("unsteered", [{}] * batch), ("LoRA only", [{"intervention": LORA_ID}] * batch),
            (f"LoRA + K={k} LoReFT", lora_reft), ("unsteered (again)", [{}] * batch)]


def prepare(url: str, workdir: Path, k: int) -> None:
    sources = {f"bench-reft-{i}": random_loreft_native(workdir / f"reft-{i}", 1000 + i, [LAYER]) for i in range(k)}
    register_all(url, sources, positions="all", upload=True)
    with Client(url, timeout=600) as client:
        client.interventions.register(LORA_ID, str(FIXTURES_LORA / "peft_lora"), replace=True)


def measure(urls: dict[str, str], p: dict) -> list[dict]:
    seconds, tokens = {}, {}
    for r in range(p["rounds"] + 1):                     # round 0: warm-up (loads the slots), not timed
        for batch in p["batches"]:
            for c, (label, steering) in enumerate(configurations(batch, p["k"])):
                for ops, url in urls.items():
                    elapsed, out = timed_batch(url, prompts(batch, p["prompt_len"], 100 * r + c),
                                               steering, p["new_tokens"] if r else 2)
                    if r:
                        seconds.setdefault((ops, batch, label), []).append(elapsed)
                        tokens.setdefault((ops, batch, label), []).extend(out)
            print(f"  round {r} batch {batch} done", flush=True)
    rows = []
    for ops in urls:
        for batch in p["batches"]:
            group = []
            for label, _ in configurations(batch, p["k"]):
                tok_s = [batch * p["new_tokens"] / s for s in seconds[(ops, batch, label)]]
                mine, theirs = tokens[(ops, batch, label)], tokens[("vllm", batch, label)]
                group.append({"ops": ops, "batch": batch, "config": label, "tok_s": max(tok_s),
                              "tok_s_median": statistics.median(tok_s), "tok_s_rounds": tok_s,
                              "same_tokens_as_vllm_ops": sum(a == b for a, b in zip(mine, theirs)) / len(mine)})
            add_ratios(group)
            rows += group
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    from steer_loadtest.plots import bars

    labels = [f"{r['ops']} B={r['batch']}\n" + r["config"].replace(" + ", " +\n") for r in rows]
    bars(labels, [r["tok_s"] for r in rows], path, "output tok/s", title)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"small version: {QUICK}")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/lora_throughput*.json)")
    args = ap.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    out = args.out or RESULTS / f"lora_throughput{'_quick' if args.quick else ''}.json"
    workdir = Path(tempfile.mkdtemp(prefix="lora-throughput-"))
    servers = {}
    try:
        for ops, env in OPS.items():
            servers[ops] = start_server(workdir / ops, workdir, *SERVER_ARGS, "--allowed-intervention-dir",
                                        str(FIXTURES_LORA), env=env)
            prepare(servers[ops].url, workdir, p["k"])
        with Client(servers["grouped"].url) as client:
            model = client.models()[0].id
        rows = measure({ops: s.url for ops, s in servers.items()}, p)
    finally:
        for server in servers.values():
            server.stop()
    print(table(rows, [("config", "configuration", ""), ("ops", "ops", ""), ("batch", "batch", "d"),
                       ("tok_s", "tok/s", ".1f"), ("ratio", "ratio", ".3f"),
                       ("same_tokens_as_vllm_ops", "same tokens", ".2f")]))
    doc = {"benchmark": "lora_throughput", "quick": args.quick, "params": p,
           "server_args": SERVER_ARGS + ["--allowed-intervention-dir", "tests/fixtures/data_lora"],
           "server_env": OPS, "model": model, "layer": LAYER, "machine": machine(), "measured_unix": time.time(),
           "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    plot(rows, out.with_suffix(".png"), f"LoRA decode, {p['new_tokens']} new tokens, {model}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
