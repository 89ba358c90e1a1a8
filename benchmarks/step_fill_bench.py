"""Microbenchmark of the engine's per-step host work: the token → (slot, coef) fill and the per-layer apply.

Fill: ``StepState.prepare`` at 1, 32, 128 and 256 requests (a quarter prefill chunks of 8-96
tokens, the rest decode tokens; 1-4 columns of every position kind; a fifth of the requests
after the first unsteered), "before" the per-request, per-column loop copied below as the
labelled baseline, "after" the vectorised fill the engine runs. Both fill the same batch in the
same run, with the parsed steering already cached (the steady state), and must write identical
buffers.

Apply: one hooked layer (d=576 fp32, rank 4, 16 slots, 32 decode tokens and a 224-token mixed
batch) with 1, 2 and 4 columns: "before" one ``apply_interventions`` call per column (the old
``LayerSteering.steer``), "after" one call for all columns with the step's plan. The plan is built
once per step; its cost is reported separately (``plan_us``) and shared by every hooked layer.

    python benchmarks/step_fill_bench.py [--repeats N] [--out PATH]

Times are the best of N (the 2-core machine is shared; the minimum is the least disturbed estimate).
Writes JSON to ``results/step_fill_bench.json`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from steer_serve.engine.config import RequestSteering, SteerConfig
from steer_serve.engine.step_state import StepState
from steer_serve.interventions.base import LowRankEdit
from steer_serve.interventions.positions import parse_positions
from steer_serve.kernels import SlotTables, StepPlan, apply_interventions

DEFAULT_OUT = Path(__file__).parent / "results" / "step_fill_bench.json"
REQUESTS = [1, 32, 128, 256]
COLUMNS = [1, 2, 4]
MAX_COLUMNS, MAX_TOKENS, NUM_SLOTS = 4, 8192, 16
SPECS = ["f1", "l1", "f3+l3", "l5", "prompt", "generated", "all"]


class LoopFill:
    """Baseline ("before"): the per-request, per-column fill StepState ran before it was vectorised."""

    def __init__(self, slots: torch.Tensor, coef: torch.Tensor):
        self.slots, self.coef = slots, coef
        self._requests = {}
        self._filled_tokens = 0
        self._slots_np = np.zeros(tuple(slots.shape), dtype=np.int64)
        self._coef_np = np.zeros(tuple(coef.shape), dtype=np.float32)

    def _steering_of(self, req_id, extra_args_of):
        if req_id not in self._requests:
            steering = RequestSteering.from_extra_args(extra_args_of(req_id))
            self._requests[req_id] = None if steering is None else ([
                (slot, scale, parse_positions(pos))
                for slot, scale, pos in zip(steering.slots, steering.scales, steering.positions)],
                steering.prompt_len)
        return self._requests[req_id]

    def prepare(self, req_ids, num_scheduled, num_computed, num_prompt, extra_args_of):
        total = int(num_scheduled.sum())
        width = max(total, self._filled_tokens)
        slots_np, coef_np = self._slots_np, self._coef_np
        slots_np[:, :width] = 0
        coef_np[:, :width] = 0.0
        columns, present = 0, set()
        offset = 0
        for i, req_id in enumerate(req_ids):
            n = int(num_scheduled[i])
            steering = self._steering_of(req_id, extra_args_of)
            if steering:
                columns_of_request, prompt_len = steering
                prompt_len = int(num_prompt[i]) if prompt_len is None else prompt_len
                positions = np.arange(num_computed[i], num_computed[i] + n)
                for m, (slot, scale, spec) in enumerate(columns_of_request):
                    mask = spec.mask(positions, prompt_len)
                    if mask.any():
                        slots_np[m, offset:offset + n] = np.where(mask, slot, 0)
                        coef_np[m, offset:offset + n] = np.where(mask, scale, 0.0)
                        columns = max(columns, m + 1)
                        present.add(slot)
            offset += n
        if columns or self._filled_tokens:
            self.slots[:, :width].copy_(torch.from_numpy(slots_np[:, :width]))
            self.coef[:, :width].copy_(torch.from_numpy(coef_np[:, :width]))
            self._filled_tokens = total if columns else 0
        return columns, present


def best_of(fn, repeats: int) -> float:
    """Minimum seconds per call over ``repeats`` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def make_batch(num_requests: int, seed: int = 0):
    """A scheduled batch: a quarter prefill chunks, the rest decode tokens; per request 1-4 columns."""
    rng = np.random.default_rng(seed)
    extra, n, computed, prompt = {}, [], [], []
    for i in range(num_requests):
        p = int(rng.integers(16, 200))
        if rng.random() < 0.25:
            chunk = int(rng.integers(8, 97))
            start = int(rng.integers(0, max(1, p - chunk)))
            n.append(min(chunk, p - start))
            computed.append(start)
        else:
            n.append(1)
            computed.append(p + int(rng.integers(0, 64)))
        prompt.append(p)
        columns = int(rng.integers(1, MAX_COLUMNS + 1))
        steering = None if i and rng.random() < 0.2 else RequestSteering(
            [int(s) for s in rng.integers(1, NUM_SLOTS + 1, size=columns)], [1.0] * columns,
            [str(rng.choice(SPECS)) for _ in range(columns)])
        extra[f"r{i}"] = None if steering is None else steering.to_extra_args()
    req_ids = list(extra)
    return req_ids, np.array(n, dtype=np.int32), np.array(computed, dtype=np.int32), np.array(prompt, dtype=np.int32), \
        extra.__getitem__


def bench_fill(repeats: int) -> list[dict]:
    rows = []
    for num_requests in REQUESTS:
        req_ids, n, computed, prompt, extra_args_of = make_batch(num_requests)
        buffers = lambda: (torch.zeros(MAX_COLUMNS, MAX_TOKENS, dtype=torch.int64),  # noqa: E731
                           torch.zeros(MAX_COLUMNS, MAX_TOKENS, dtype=torch.float32))
        before = LoopFill(*buffers())
        after = StepState(SteerConfig(num_slots=NUM_SLOTS, max_columns=MAX_COLUMNS), *buffers())
        for slot in range(1, NUM_SLOTS + 1):
            after.set_slot_sites(slot, [(slot, "block_output")])
        live = set(req_ids)
        before_s = best_of(lambda: before.prepare(req_ids, n, computed, prompt, extra_args_of), repeats)
        after_s = best_of(lambda: after.prepare(req_ids, n, computed, prompt, extra_args_of, live), repeats)
        columns, _ = before.prepare(req_ids, n, computed, prompt, extra_args_of)
        if not (torch.equal(before.slots, after.slots) and torch.equal(before.coef, after.coef)
                and columns == after.num_columns):
            raise AssertionError(f"fills differ at {num_requests} requests")
        rows.append({"requests": num_requests, "tokens": int(n.sum()), "prefill_chunks": int((n > 1).sum()),
                     "columns": columns, "before_us": before_s * 1e6, "after_us": after_s * 1e6,
                     "speedup": before_s / after_s})
        print(f"fill  R={num_requests:4d} T={int(n.sum()):5d}  before {before_s * 1e6:9.1f} us  "
              f"after {after_s * 1e6:8.1f} us", flush=True)
    return rows


def make_tables(hidden: int = 576, rank: int = 4) -> SlotTables:
    tables = SlotTables.allocate(NUM_SLOTS + 1, rank, hidden)
    g = torch.Generator().manual_seed(0)
    for slot in range(1, NUM_SLOTS + 1):
        q = torch.linalg.qr(torch.randn(hidden, rank, generator=g))[0]
        tables.write(slot, LowRankEdit(W=torch.randn(rank, hidden, generator=g) * hidden ** -0.5,
                                       b=torch.randn(rank, generator=g), P=q, U=q))
    return tables


def apply_columns(tokens: int, columns: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``[columns, T]``: runs of slots as the engine lays them out; later columns cover fewer tokens."""
    g = torch.Generator().manual_seed(seed)
    run = 1 if tokens <= 32 else 16
    slots = torch.randint(1, NUM_SLOTS + 1, (columns, -(-tokens // run)), generator=g).repeat_interleave(run, 1)
    slots = slots[:, :tokens].contiguous()
    coef = torch.ones(columns, tokens)
    for m in range(1, columns):
        off = torch.rand(tokens, generator=g) < m / (columns + 1)
        slots[m, off], coef[m, off] = 0, 0.0
    return slots, coef


def bench_apply(repeats: int) -> list[dict]:
    tables = make_tables()
    rows = []
    for tokens in (32, 224):
        x = torch.randn(tokens, tables.hidden)
        for columns in COLUMNS:
            slots, coef = apply_columns(tokens, columns)

            def per_column():
                y = x
                for m in range(columns):
                    y = apply_interventions(y, slots[m], coef[m], tables)
                return y

            plan = StepPlan(slots, coef, slots.numpy(), coef.numpy())
            if not torch.equal(per_column(), apply_interventions(x, slots, coef, tables, plan=plan)):
                raise AssertionError("one call differs from per-column calls")
            before_s = best_of(per_column, repeats)
            after_s = best_of(lambda: apply_interventions(x, slots, coef, tables, plan=plan), repeats)
            plan_s = best_of(lambda: apply_interventions(x, slots, coef, tables, plan=StepPlan(
                slots, coef, slots.numpy(), coef.numpy())), repeats) - after_s
            rows.append({"tokens": tokens, "columns": columns, "before_us": before_s * 1e6, "after_us": after_s * 1e6,
                         "plan_us": max(plan_s, 0.0) * 1e6, "speedup": before_s / after_s})
            print(f"apply T={tokens:4d} columns={columns}  before {before_s * 1e6:8.1f} us  "
                  f"after {after_s * 1e6:8.1f} us  (+{max(plan_s, 0) * 1e6:.1f} us plan per step)", flush=True)
    return rows


def table(result: dict) -> str:
    lines = ["| fill: requests | tokens | prefill chunks | columns | before µs | after µs | speed-up |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['requests']} | {r['tokens']} | {r['prefill_chunks']} | {r['columns']} | {r['before_us']:.1f} | "
              f"{r['after_us']:.1f} | {r['speedup']:.1f}x |" for r in result["fill"]]
    lines += ["", "| apply: tokens | columns | before µs (per column) | after µs (one call) | plan µs per step "
              "| speed-up |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['tokens']} | {r['columns']} | {r['before_us']:.1f} | {r['after_us']:.1f} | {r['plan_us']:.1f} | "
              f"{r['speedup']:.2f}x |" for r in result["apply"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200, help="best of this many calls per row")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    meta = {"torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "repeats": args.repeats, "loadavg_before": os.getloadavg()}
    result = {"meta": meta, "fill": bench_fill(args.repeats), "apply": bench_apply(args.repeats)}
    meta["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
