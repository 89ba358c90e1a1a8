"""Throughput of interchange requests (one source each) mixed with plain ones vs all plain (issue 15, item 7).

One server; a low-rank rotated-space interchange (rank 8, layer 15, saved without a source, so every
request gives one) at ``l1``. Batch B requests x N new tokens (greedy, ignore_eos), prompts and sources
``prompt_len`` tokens, for: 100 % plain, 50 % interchange / 50 % plain, 100 % plain again (drift
control). Each interchange request first prefills its source (one token), so the mix should cost
about B/2 extra prefills of ``prompt_len`` tokens. tok/s (generated tokens) is the best of
``--rounds`` timed batches with fresh prompts; the ratio is to the mean of the two plain rows.

    python benchmarks/interchange_throughput.py [--quick] [--url http://127.0.0.1:8000]

Writes benchmarks/results/interchange_throughput[_quick].json and .png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench_util import RESULTS, add_ratios, machine, prompts, register_all, start_server, table, timed_batch
from steer_serve.formats.native import save_native
from steer_serve.interventions.base import Edit, Intervention, Placement

FULL = {"batch": 32, "new_tokens": 32, "prompt_len": 64, "rounds": 3}
QUICK = {"batch": 8, "new_tokens": 8, "prompt_len": 32, "rounds": 2}
SERVER_ARGS = ["--max-interventions", "4", "--max-rank", "8"]
NAME, LAYER, RANK = "bench-das", 15, 8


def das_native(directory: Path, hidden: int = 576) -> Path:
    """A random low-rank rotated-space interchange whose source each request gives."""
    gen = torch.Generator().manual_seed(0)
    rotate = torch.linalg.qr(torch.randn(hidden, RANK, generator=gen))[0].contiguous()
    edit = Edit("low_rank_rotated_space", Placement(LAYER, "block_output"),
                {"rotate_layer": rotate, "source": torch.zeros(hidden)}, {"source": "request"})
    save_native(Intervention([edit], hidden, positions="l1"), directory / NAME)
    return directory / NAME


def measure(url: str, p: dict) -> list[dict]:
    rows = []
    for label, share in (("100% plain", 0.0), ("50% interchange / 50% plain", 0.5), ("100% plain (again)", 0.0)):
        rates = []
        for r in range(p["rounds"] + 1):   # the first batch warms up
            seed = 1000 * len(rows) + r
            batch, sources = prompts(p["batch"], p["prompt_len"], seed), prompts(p["batch"], p["prompt_len"], -seed - 1)
            steering = [{"interventions": [{"id": NAME, "positions": "l1", "source": {"prompt": s, "positions": "l1"}}]}
                        if i < share * p["batch"] else {} for i, s in enumerate(sources)]
            seconds, _ = timed_batch(url, batch, steering, p["new_tokens"])
            if r:
                rates.append(p["batch"] * p["new_tokens"] / seconds)
        rows.append({"config": label, "tok_s": max(rates), "median_tok_s": statistics.median(rates),
                     "source_prefill_tokens": int(share * p["batch"]) * p["prompt_len"]})
        print(f"{label}: {max(rates):.1f} tok/s", flush=True)
    add_ratios(rows, lambda row: "plain (" in row["config"] or row["config"] == "100% plain")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"small version: {QUICK}")
    ap.add_argument("--url", help="use a running server (allowing the temporary directory) instead of starting one")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/interchange_throughput*.json)")
    args = ap.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    out = args.out or RESULTS / f"interchange_throughput{'_quick' if args.quick else ''}.json"
    workdir = Path(tempfile.mkdtemp(prefix="interchange-throughput-"))
    source = das_native(workdir)
    server = None if args.url else start_server(workdir, workdir, *SERVER_ARGS)
    url = args.url or server.url
    try:
        register_all(url, {NAME: source}, upload=bool(args.url))
        rows = measure(url, p)
    finally:
        if server is not None:
            server.stop()
    print(table(rows, [("config", "configuration", ""), ("tok_s", "tok/s", ".1f"), ("ratio", "ratio", ".2f"),
                       ("source_prefill_tokens", "source tokens", "d")]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"params": p, "machine": machine(), "rows": rows}, indent=1) + "\n")
    from steer_loadtest.plots import bars

    bars([r["config"].replace(" / ", "\n") for r in rows], [r["tok_s"] for r in rows], out.with_suffix(".png"),
         "output tok/s", f"batch {p['batch']} x {p['new_tokens']} new tokens, prompts/sources {p['prompt_len']}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
