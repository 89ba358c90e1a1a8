"""Steered vs unsteered decode throughput per residual convention (issue 14, item 6).

For the default model and one seeded tiny model of each residual convention —
``LlamaForCausalLM`` (vLLM's fused residual), ``GPT2LMHeadModel`` (plain outputs),
``GPTNeoXForCausalLM`` (parallel residual, vLLM's Transformers backend) — one server each, in one
run: K distinct random LoReFT rank-4 interventions at one middle layer (``block_output``,
positions ``all``), batch B requests x N new tokens (greedy, ignore_eos), rows unsteered, K
distinct, unsteered again, interleaved round by round. tok/s is the best of the rounds; the ratio
is to the mean of the two unsteered rows (their spread is the noise).

    python benchmarks/architectures_throughput.py [--quick]

Writes benchmarks/results/architectures_throughput[_quick].json and .png.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_util import (RESULTS, add_ratios, machine, prompts,
                        random_loreft_native, register_all, start_server, table, timed_batch)
from steer_client import Client

FULL = {"batch": 32, "new_tokens": 32, "prompt_len": 32, "k": 64, "rounds": 5}
QUICK = {"batch": 8, "new_tokens": 8, "prompt_len": 16, "k": 8, "rounds": 1}
MODELS = ("default", "LlamaForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM")
CONVENTION = {"default": "fused residual (SmolLM2)", "LlamaForCausalLM": "fused residual",
              "GPT2LMHeadModel": "plain outputs", "GPTNeoXForCausalLM": "parallel residual (Transformers backend)"}


def model_dir(name: str, workdir: Path) -> Path | None:
    """The served model: ``None`` for the default, else the tiny model built into ``workdir``."""
    if name == "default":
        return None
    from fixtures.tiny_models import build_tiny_model
    from steer_serve.model import prepare_default_model

    target = workdir / name
    build_tiny_model(name, target, prepare_default_model())
    return target


def measure_model(name: str, workdir: Path, p: dict) -> list[dict]:
    """Start a server on ``name``, register K LoReFTs at its middle layer, time the three rows."""
    directory = model_dir(name, workdir)
    # no prefix caching: every row runs the same prompts, so "changed" shows the interventions were applied
    args = ["--max-interventions", str(p["k"]), "--max-rank", "4", "--max-model-len", "512", "--no-prefix-caching"]
    server = start_server(workdir / f"server-{name}", workdir, *args, *(["--model", str(directory)] if directory else []))
    try:
        with Client(server.url) as client:
            root = client.models()[0].root
        config = json.loads((Path(root) / "config.json").read_text())
        hidden = config.get("hidden_size") or config["n_embd"]
        layer = (config.get("num_hidden_layers") or config["n_layer"]) // 2
        ids = {f"arch-{name}-{i}": random_loreft_native(workdir / f"{name}-{i}", 3000 + i, [layer], hidden=hidden)
               for i in range(p["k"])}
        register_all(server.url, ids, positions="all", upload=True)
        configs = [("unsteered", [None] * p["batch"]),
                   (f"K={p['k']} one layer", [f"arch-{name}-{i % p['k']}" for i in range(p["batch"])]),
                   ("unsteered (again)", [None] * p["batch"])]
        steering = {label: [{"intervention": n} if n else {} for n in names] for label, names in configs}
        for c, label in enumerate(steering):  # warm-up: loads the slots
            timed_batch(server.url, prompts(p["batch"], p["prompt_len"], 10_000 + c), steering[label], 4)
        tok_s, first = {label: [] for label in steering}, {}
        for r in range(p["rounds"]):  # rows interleaved round by round, so a noisy moment hits all of them
            for label in steering:
                seconds, out = timed_batch(server.url, prompts(p["batch"], p["prompt_len"], r), steering[label],
                                           p["new_tokens"])
                tok_s[label].append(p["batch"] * p["new_tokens"] / seconds)
                first.setdefault(label, out)
        rows = [{"model": name, "convention": CONVENTION[name], "config": label, "tok_s": max(rounds),
                 "tok_s_rounds": rounds, "layer": layer,
                 "changed_vs_unsteered": sum(a != b for a, b in zip(first[label], first["unsteered"])) / p["batch"]}
                for label, rounds in tok_s.items()]
        for row in rows:
            print(f"  {name:<20} {row['config']:<20} {row['tok_s']:8.1f} tok/s", flush=True)
    finally:
        server.stop()
    add_ratios(rows)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    from steer_loadtest.plots import bars

    steered = [r for r in rows if r["config"].startswith("K=")]
    bars([r["model"].replace("ForCausalLM", "").replace("LMHeadModel", "") for r in steered],
         [r["ratio"] for r in steered], path, "steered / unsteered tok/s", "K distinct LoReFTs, one layer",
         reference=0.95)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"small version: {QUICK}")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/architectures_throughput*.json)")
    args = ap.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    out = args.out or RESULTS / f"architectures_throughput{'_quick' if args.quick else ''}.json"
    workdir = Path(tempfile.mkdtemp(prefix="architectures-throughput-"))
    rows = [row for name in args.models for row in measure_model(name, workdir, p)]
    print(table(rows, [("model", "model", ""), ("config", "configuration", ""), ("tok_s", "tok/s", ".1f"),
                       ("ratio", "ratio", ".3f"), ("changed_vs_unsteered", "changed", ".2f")]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "architectures_throughput", "quick": args.quick, "params": p,
                               "machine": machine(), "measured_unix": time.time(), "rows": rows}, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
