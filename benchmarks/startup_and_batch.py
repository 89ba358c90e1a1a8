"""Plain-model figures of the foundation: time to ready, and greedy tok/s at batch 1 and 16.

One command: ``.venv/bin/python benchmarks/startup_and_batch.py`` starts a server on the default
model, measures how long /health takes to answer, then times batches of 1 and 16 requests
(64 new tokens each, ``ignore_eos``). Writes ``benchmarks/results/startup_and_batch.json``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_util import machine, prompts, start_server, timed_batch

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes to time")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="timed batches per size (best is kept)")
    ap.add_argument("--out", type=Path, default=RESULTS / "startup_and_batch.json")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    started = time.perf_counter()
    server = start_server(workdir, workdir)
    ready_s = time.perf_counter() - started
    rows = []
    try:
        timed_batch(server.url, prompts(2, 16, seed=0), [{}, {}], 8)  # warm-up
        for batch in args.batches:
            best = 0.0
            for r in range(args.rounds):
                seconds, outs = timed_batch(server.url, prompts(batch, 16, seed=100 * batch + r), [{}] * batch,
                                            args.new_tokens)
                best = max(best, sum(map(len, outs)) / seconds)
            rows.append({"batch": batch, "tok_s": best})
            print(f"batch {batch:>3}: {best:7.1f} tok/s", flush=True)
    finally:
        server.stop()
    result = {"benchmark": "startup_and_batch", "time_to_ready_s": ready_s, "new_tokens": args.new_tokens,
              "rows": rows, "machine": machine(), "measured_unix": time.time()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"time to ready {ready_s:.1f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
