"""Runs INSIDE the lm-eval venv (``lm_eval_side_by_side.py`` builds it): one lm-eval run of the local
multiple-choice task against one OpenAI-compatible server, through lm-eval's own ``local-completions``
model (the loglikelihood form: ``echo``, ``logprobs``, prompt token scores). Writes acc and every
choice's loglikelihood as JSON."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True, help="the request's `model`: served name or intervention id")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--task-dir", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model_args = (f"model={args.model},base_url={args.base_url}/v1/completions,tokenizer={args.tokenizer},"
                  "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=4,max_retries=1")
    results = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=[args.task],
                                      task_manager=TaskManager(include_path=args.task_dir), log_samples=True,
                                      batch_size=1)
    metrics = results["results"][args.task]
    samples = sorted(results["samples"][args.task], key=lambda s: s["doc_id"])
    doc = {"lm_eval": lm_eval.__version__, "acc": metrics["acc,none"], "acc_norm": metrics.get("acc_norm,none"),
           "loglikelihoods": [[float(r[0]) for r in s["filtered_resps"]] for s in samples]}
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
