"""Serving under load: the steer-loadtest harness over a rate sweep, unsteered vs K in {1, 8, 64}.

One server (``--max-interventions 64 --max-rank 4``) with 64 random LoReFT rank-4 interventions
(layer 15, positions ``all``). For every offered rate (open loop, Poisson arrivals, fixed duration)
and every K (0 = unsteered; K distinct, uniform mix) one harness run records throughput, TTFT and
TPOT, after one warm-up request per intervention (first-use slot loads are not measured). Per K:
the largest rate of the sweep that stays sustainable (no errors, p99 TTFT under ``--ttft-bound``)
and the latency overhead of steering (p50 TTFT/TPOT over the unsteered run at the lowest rate).

    python benchmarks/serving.py [--quick] [--url http://127.0.0.1:8000]

Writes benchmarks/results/serving[_quick].json and .png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_util import (
    RESULTS, machine, prompts, random_loreft_native, register_all, start_server, table, timed_batch,
)
from steer_client import Client
from steer_loadtest import LoadConfig, run_loadtest

FULL = {"rates": [0.5, 1.0, 2.0, 4.0, 6.0], "ks": [0, 1, 8, 64], "duration": 30.0, "prompt_len": "uniform:16:64",
        "output_len": "32"}
QUICK = {"rates": [1.0, 3.0], "ks": [0, 1, 8, 64], "duration": 8.0, "prompt_len": "uniform:8:24", "output_len": "16"}
SERVER_ARGS = ["--max-interventions", "64", "--max-rank", "4"]
NAMES = [f"serve-{i}" for i in range(64)]


def point(url: str, rate: float, k: int, p: dict, seed: int) -> dict:
    """One harness run; the summary fields the sweep reports."""
    cfg = LoadConfig(base_url=url, rate=rate, duration=p["duration"], interventions=NAMES[:k],
                     prompt_len=p["prompt_len"], output_len=p["output_len"], seed=seed)
    report, _ = asyncio.run(run_loadtest(cfg, progress_stream=None))
    row = {"rate": rate, "k": k, "sent": report["requests"]["sent"], "failed": report["requests"]["failed"],
           "errors_by_status": report["errors_by_status"], "output_tok_s": report["throughput"]["output_tok_s"],
           "requests_s": report["throughput"]["requests_s"], "ttft_s": report["ttft_s"], "tpot_s": report["tpot_s"]}
    print(f"  rate {rate:4.1f} K={k:<3} {row['output_tok_s']:7.1f} tok/s  p50/p99 TTFT "
          f"{_ms(row['ttft_s']['p50'])}/{_ms(row['ttft_s']['p99'])} ms  p50 TPOT {_ms(row['tpot_s']['p50'])} ms"
          f"  failed {row['failed']}", flush=True)
    return row


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.0f}"


def summarize(points: list[dict], p: dict, bound: float) -> list[dict]:
    """Per K: max sustainable rate, and p50 TTFT/TPOT relative to unsteered at the lowest rate."""
    base = {r["rate"]: r for r in points if r["k"] == 0}
    rows = []
    for k in p["ks"]:
        mine = [r for r in points if r["k"] == k]
        ok = [r["rate"] for r in mine if not r["failed"] and (r["ttft_s"]["p99"] or 0) <= bound]
        low = mine[0]
        ref = base.get(low["rate"])

        def rel(metric: str) -> float | None:
            a, b = low[metric]["p50"], ref[metric]["p50"] if ref else None
            return a / b if a and b else None

        rows.append({"config": "unsteered" if k == 0 else f"K={k}", "k": k, "max_rate": max(ok, default=None),
                     "peak_tok_s": max(r["output_tok_s"] for r in mine), "ttft_vs_unsteered": rel("ttft_s"),
                     "tpot_vs_unsteered": rel("tpot_s")})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"small version: {QUICK}")
    ap.add_argument("--url", help="use a running server (with >= 64 slots of rank 4) instead of starting one")
    ap.add_argument("--rates", type=float, nargs="+", help="offered request rates (req/s)")
    ap.add_argument("--ttft-bound", type=float, default=2.0, help="p99 TTFT (s) a sustainable rate stays under")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/serving*.json)")
    args = ap.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    p["rates"] = args.rates or p["rates"]
    out = args.out or RESULTS / f"serving{'_quick' if args.quick else ''}.json"
    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    server = None if args.url else start_server(work, work, *SERVER_ARGS)
    url = args.url or server.url
    try:
        register_all(url, {n: random_loreft_native(work / n, 3000 + i, [15]) for i, n in enumerate(NAMES)}, "all",
                     upload=True)
        timed_batch(url, prompts(len(NAMES), 8, 99), [{"intervention": n} for n in NAMES], 1)  # load every slot
        points = [point(url, rate, k, p, seed=i) for i, rate in enumerate(p["rates"]) for k in p["ks"]]
        if args.url:
            with Client(url) as client:
                for name in NAMES:
                    client.interventions.delete(name, force=True)
    finally:
        if server is not None:
            server.stop()
    rows = summarize(points, p, args.ttft_bound)
    print(table(rows, [("config", "configuration", ""), ("max_rate", "max rate", ".1f"),
                       ("peak_tok_s", "peak tok/s", ".1f"), ("ttft_vs_unsteered", "TTFT x", ".2f"),
                       ("tpot_vs_unsteered", "TPOT x", ".2f")]))
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "serving", "quick": args.quick, "params": p, "ttft_bound_s": args.ttft_bound,
           "server_args": SERVER_ARGS, "machine": machine(), "measured_unix": time.time(), "summary": rows,
           "points": points}
    out.write_text(json.dumps(doc, indent=2))
    from steer_loadtest.plots import sweep

    series = {("unsteered" if k == 0 else f"K={k}"): [(r["rate"], r["output_tok_s"], r["ttft_s"]["p99"])
                                                        for r in points if r["k"] == k] for k in p["ks"]}
    sweep(series, out.with_suffix(".png"), f"open-loop rate sweep, {p['output_len']} new tokens")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
