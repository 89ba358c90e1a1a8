"""lm-evaluation-harness through steer-serve and through vLLM's own OpenAI server, side by side.

lm-eval scores multiple-choice tasks from prompt log-probabilities (``local-completions``:
``echo: true, logprobs: 1``). This runs the real lm-eval (its own venv, ``.lmeval-venv``, built on
first use) on a local 20-question multiple-choice task against:

* ``vllm``: vLLM's own server on the default model;
* ``steer``: steer-serve on the same model and engine settings, unsteered;
* ``steer + LoReFT``: the same server, ``model: <intervention id>`` (a random LoReFT at layer 15,
  positions ``all``), so every scored prompt token runs through the intervention.

Reported: acc / acc_norm of each, the largest difference of any choice's loglikelihood between
``steer`` and ``vllm`` (should be float noise), and how many choices the intervention moved.

    python benchmarks/lm_eval_side_by_side.py

Writes benchmarks/results/lm_eval_side_by_side.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_util import REPO, RESULTS, machine, random_loreft_native, register_all, start_server, table
from live_server import VllmServerProcess

sys.path.insert(0, str(REPO / "tests" / "fixtures"))
from make_fixtures import isolated_venv  # noqa: E402  (one venv builder for every isolated tool)

VENV = REPO / ".lmeval-venv"
RECIPE = [["torch==2.13.0"], ["lm_eval[api]==0.4.13", "transformers==5.25.0"]]
MODEL_NAME = "SmolLM2-135M-Instruct"
ENGINE_ARGS = ["--max-model-len", "2048"]
TASK = "steer_local_mc"

QUESTIONS = [
    ("The capital of France is", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("The largest planet in the solar system is", ["Mars", "Jupiter", "Venus", "Mercury"], 1),
    ("Water freezes at a temperature of", ["100 degrees Celsius", "50 degrees Celsius", "0 degrees Celsius",
                                           "20 degrees Celsius"], 2),
    ("The opposite of hot is", ["warm", "loud", "tall", "cold"], 3),
    ("A baby cat is called a", ["kitten", "puppy", "calf", "foal"], 0),
    ("The colour of a clear daytime sky is", ["green", "blue", "red", "black"], 1),
    ("Two plus two equals", ["three", "five", "four", "six"], 2),
    ("The animal known as the king of the jungle is the", ["mouse", "cow", "sheep", "lion"], 3),
    ("Bees make", ["honey", "milk", "silk", "wool"], 0),
    ("The capital of Japan is", ["Beijing", "Tokyo", "Seoul", "Bangkok"], 1),
    ("The day after Monday is", ["Sunday", "Friday", "Tuesday", "Thursday"], 2),
    ("People read books in a", ["garage", "swimming pool", "kitchen sink", "library"], 3),
    ("The Sun rises in the", ["east", "west", "north", "south"], 0),
    ("Ice is the solid form of", ["air", "water", "sand", "oil"], 1),
    ("A week has", ["five days", "ten days", "seven days", "three days"], 2),
    ("The capital of Italy is", ["Paris", "Vienna", "Lisbon", "Rome"], 3),
    ("Fish live in", ["water", "trees", "deserts", "clouds"], 0),
    ("The number of legs a spider has is", ["six", "eight", "four", "ten"], 1),
    ("Snow is usually", ["green", "purple", "white", "orange"], 2),
    ("To see, people use their", ["ears", "feet", "hands", "eyes"], 3),
]


def write_task(directory: Path) -> None:
    """The local multiple-choice task: a JSONL file and lm-eval's YAML for it."""
    data = directory / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (directory / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
""")


def lm_eval(python: Path, url: str, model: str, tokenizer: str, task_dir: Path, out: Path) -> dict:
    subprocess.run([python, REPO / "benchmarks" / "_lm_eval_worker.py", "--base-url", url, "--model", model,
                    "--tokenizer", tokenizer, "--task-dir", task_dir, "--task", TASK, "--out", out],
                   check=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    return json.loads(out.read_text())


def run(workdir: Path) -> dict:
    from steer_serve.model import resolve_model

    python = isolated_venv(VENV, RECIPE)
    model_dir = resolve_model(None)
    write_task(workdir)
    loreft = random_loreft_native(workdir / "ivs" / "lm-eval-loreft", seed=7, layers=[15], strength=6.0)
    reference = VllmServerProcess(model_dir, "--served-model-name", MODEL_NAME, "--dtype", "float32",
                                  "--enforce-eager", *ENGINE_ARGS, log_path=workdir / "vllm.log").start()
    try:
        rows = {"vllm": lm_eval(python, reference.url, MODEL_NAME, model_dir, workdir, workdir / "vllm.json")}
    finally:
        reference.stop()
    steer = start_server(workdir / "steer", workdir / "ivs", *ENGINE_ARGS)
    try:
        register_all(steer.url, {"lm-eval-loreft": loreft})
        rows["steer"] = lm_eval(python, steer.url, MODEL_NAME, model_dir, workdir, workdir / "steer.json")
        rows["steer + LoReFT"] = lm_eval(python, steer.url, "lm-eval-loreft", model_dir, workdir,
                                         workdir / "steered.json")
    finally:
        steer.stop()

    def max_diff(a: str, b: str) -> float:
        return max(abs(x - y) for da, db in zip(rows[a]["loglikelihoods"], rows[b]["loglikelihoods"])
                   for x, y in zip(da, db))

    moved = sum(abs(x - y) > 1e-3 for da, db in zip(rows["steer"]["loglikelihoods"],
                                                   rows["steer + LoReFT"]["loglikelihoods"]) for x, y in zip(da, db))
    summary = [{"row": name, "acc": r["acc"], "acc_norm": r["acc_norm"],
                "max_abs_loglik_diff_vs_vllm": max_diff(name, "vllm")} for name, r in rows.items()]
    return {"lm_eval": rows["vllm"]["lm_eval"], "questions": len(QUESTIONS), "summary": summary,
            "choices_moved_by_loreft": moved, "choices": sum(len(c) for _, c, _ in QUESTIONS), "rows": rows}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = {"machine": machine(), **run(Path(tmp))}
    (RESULTS / "lm_eval_side_by_side.json").write_text(json.dumps(result, indent=2))
    print(table(result["summary"], [("row", "row", ""), ("acc", "acc", ".3f"), ("acc_norm", "acc_norm", ".3f"),
                                    ("max_abs_loglik_diff_vs_vllm", "max |Δ loglik| vs vLLM", ".2e")]))
    print(f"choices whose loglikelihood the LoReFT moved: {result['choices_moved_by_loreft']} of {result['choices']}")


if __name__ == "__main__":
    main()
