"""Runs INSIDE the isolated pyreft venv (pyreft 0.1.0, transformers 4.45): the pyreft side of vs_pyreft.py.

Builds K random LoReFT rank-4 interventions (fp32, layer 15, block_output), saves each with
pyreft's own ``ReftModel.save``, then for every K in the list generates the workload the fair way
pyreft allows: one ``ReftModel.generate`` call per intervention over that intervention's requests
(equal-length prompts, so no padding), greedy, no EOS stop. Writes seconds and tokens as JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyreft
import torch
from transformers import LlamaForCausalLM

LAYER, RANK, WEIGHT_SCALE = 15, 4, 16.0


def build(seed: int, hidden: int):
    torch.manual_seed(seed)
    iv = pyreft.LoreftIntervention(embed_dim=hidden, low_rank_dimension=RANK, dtype=torch.float32)
    original = iv.rotate_layer.parametrizations.weight.original
    with torch.no_grad():  # move R off its initial point (strict lower triangle: the signs stay, docs/architecture.md)
        original.add_(0.3 * torch.randn_like(original).tril(-1))
        iv.learned_source.weight.mul_(WEIGHT_SCALE)
        iv.learned_source.bias.add_(0.5 * torch.randn_like(iv.learned_source.bias)).mul_(WEIGHT_SCALE)
    return iv.eval()


def reft_model(model, iv):
    rep = {"layer": LAYER, "component": "block_output", "low_rank_dimension": RANK, "intervention": iv}
    return pyreft.get_reft_model(model, pyreft.ReftConfig(representations=[rep]), set_device=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="prompts.json in, iv-<i>/ and pyreft.json out")
    ap.add_argument("--ks", type=int, nargs="+", required=True)
    ap.add_argument("--new-tokens", type=int, required=True)
    args = ap.parse_args()
    prompts = json.loads((args.work / "prompts.json").read_text())
    model = LlamaForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32).eval()
    models = []
    for i in range(max(args.ks)):
        rm = reft_model(model, build(7000 + i, model.config.hidden_size))
        rm.save(save_directory=str(args.work / f"iv-{i}"))
        models.append(rm)
    results = {}
    for k in args.ks:
        tokens: list = [None] * len(prompts)
        started = time.perf_counter()
        for g in range(k):
            members = list(range(g, len(prompts), k))
            x = torch.tensor([prompts[j] for j in members])
            last = [[[x.shape[1] - 1]] * len(members)]
            with torch.no_grad():
                _, out = models[g].generate({"input_ids": x, "attention_mask": torch.ones_like(x)},
                                            unit_locations={"sources->base": (None, last)}, intervene_on_prompt=True,
                                            max_new_tokens=args.new_tokens,
                                            do_sample=False, eos_token_id=None, pad_token_id=0)
            for row, j in enumerate(members):
                tokens[j] = out[row, x.shape[1]:].tolist()
        seconds = time.perf_counter() - started
        results[str(k)] = {"seconds": seconds, "tokens": tokens}
        print(f"pyreft K={k}: {seconds:.1f}s, {sum(map(len, tokens)) / seconds:.1f} tok/s", flush=True)
    (args.work / "pyreft.json").write_text(json.dumps({"transformers": __import__("transformers").__version__,
                                                      "pyreft": "0.1.0", "results": results}))


if __name__ == "__main__":
    main()
