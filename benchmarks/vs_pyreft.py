"""The same steered workload through pyreft's own ``generate`` and through steer-serve, side by side.

R requests (random prompts of one length), K distinct LoReFT rank-4 interventions (layer 15,
positions ``l1``, ``intervene_on_prompt``), N new tokens, greedy fp32 without EOS stop. pyreft
cannot batch different interventions, so it runs one ``generate`` call per intervention over that
intervention's requests (the fair baseline), in the isolated venv of tests/fixtures/make_fixtures.py.
steer-serve gets the very save directories pyreft wrote and all R requests at once. Reports tok/s,
the speed-up, and how many requests produced exactly pyreft's tokens.

    python benchmarks/vs_pyreft.py [--quick]

Writes benchmarks/results/vs_pyreft[_quick].json and .png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_util import REPO, RESULTS, machine, prompts, register_all, start_server, table, timed_batch

sys.path.insert(0, str(REPO / "tests" / "fixtures"))
from make_fixtures import default_model, fixtures_venv  # noqa: E402  (reuses the pyreft venv recipe)

FULL = {"requests": 64, "new_tokens": 64, "prompt_len": 16, "ks": [1, 8, 64]}
QUICK = {"requests": 16, "new_tokens": 16, "prompt_len": 16, "ks": [1, 16]}
SERVER_ARGS = ["--max-interventions", "64", "--max-rank", "4"]


def run_pyreft(python: Path, model_dir: Path, work: Path, p: dict) -> dict:
    """The pyreft side, in its own venv; returns {K: {seconds, tokens}}."""
    cmd = [str(python), str(Path(__file__).with_name("_pyreft_worker.py")), "--model-dir", str(model_dir),
           "--work", str(work), "--ks", *map(str, p["ks"]), "--new-tokens", str(p["new_tokens"])]
    subprocess.run(cmd, check=True)
    return json.loads((work / "pyreft.json").read_text())


def run_steer(url: str, work: Path, batch: list[list[int]], p: dict) -> dict:
    """The steer-serve side: every request at once per K; returns {K: {seconds, tokens}}."""
    register_all(url, {f"pyreft-{i}": work / f"iv-{i}" for i in range(max(p["ks"]))}, positions="l1")
    out = {}
    for k in p["ks"]:
        steering = [{"intervention": f"pyreft-{j % k}"} for j in range(len(batch))]
        timed_batch(url, prompts(len(batch), p["prompt_len"], 99), steering, 4)  # warm-up: load the slots
        seconds, tokens = timed_batch(url, batch, steering, p["new_tokens"])
        out[str(k)] = {"seconds": seconds, "tokens": tokens}
        print(f"steer-serve K={k}: {seconds:.1f}s, {sum(map(len, tokens)) / seconds:.1f} tok/s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"small version: {QUICK}")
    ap.add_argument("--ks", type=int, nargs="+", help="numbers of distinct interventions")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/vs_pyreft*.json)")
    args = ap.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    p["ks"] = args.ks or p["ks"]
    out = args.out or RESULTS / f"vs_pyreft{'_quick' if args.quick else ''}.json"
    work = Path(tempfile.mkdtemp(prefix="vs-pyreft-"))
    batch = prompts(p["requests"], p["prompt_len"], 0)
    (work / "prompts.json").write_text(json.dumps(batch))
    python, model_dir = fixtures_venv(), default_model()
    reference = run_pyreft(python, model_dir, work, p)
    server = start_server(work / "server", work, *SERVER_ARGS)
    try:
        steer = run_steer(server.url, work, batch, p)
    finally:
        server.stop()
    rows = []
    for k in p["ks"]:
        ref, got = reference["results"][str(k)], steer[str(k)]
        tokens = p["requests"] * p["new_tokens"]
        rows.append({"config": f"K={k}", "k": k, "pyreft_s": ref["seconds"], "steer_s": got["seconds"],
                     "pyreft_tok_s": tokens / ref["seconds"], "steer_tok_s": tokens / got["seconds"],
                     "speedup": ref["seconds"] / got["seconds"],
                     "same_tokens": sum(a == b for a, b in zip(ref["tokens"], got["tokens"]))})
    print(table(rows, [("config", "workload", ""), ("pyreft_tok_s", "pyreft tok/s", ".1f"),
                       ("steer_tok_s", "steer tok/s", ".1f"), ("speedup", "speed-up", ".1f"),
                       ("same_tokens", f"same/{p['requests']}", "d")]))
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "vs_pyreft", "quick": args.quick, "params": p, "server_args": SERVER_ARGS,
           "pyreft_env": {k: v for k, v in reference.items() if k != "results"}, "machine": machine(),
           "measured_unix": time.time(), "rows": rows}
    out.write_text(json.dumps(doc, indent=2))
    from steer_loadtest.plots import bars

    labels = [f"{who}\n{r['config']}" for r in rows for who in ("pyreft", "steer-serve")]
    values = [v for r in rows for v in (r["pyreft_tok_s"], r["steer_tok_s"])]
    bars(labels, values, out.with_suffix(".png"), "output tok/s",
         f"{p['requests']} requests x {p['new_tokens']} tokens, K distinct LoReFT")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
