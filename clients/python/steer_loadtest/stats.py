"""Summaries of a run: throughput, TTFT/TPOT/latency percentiles, errors by status, per intervention."""
from __future__ import annotations

import math
from collections import Counter, defaultdict

from steer_loadtest.runner import Result

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile ``q`` (0-100) of ``values``; None when empty."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def distribution(values: list[float]) -> dict:
    """Mean and p50/p90/p99 (seconds), with the sample count."""
    out = {f"p{q}": percentile(values, q) for q in PERCENTILES}
    out["mean"] = sum(values) / len(values) if values else None
    out["count"] = len(values)
    return out


def _latencies(results: list[Result]) -> dict:
    ok = [r for r in results if r.ok]
    return {"ttft_s": distribution([r.ttft for r in ok if r.ttft is not None]),
            "tpot_s": distribution([r.tpot for r in ok if r.tpot is not None]),
            "latency_s": distribution([r.latency for r in ok])}


def summarize(results: list[Result], wall_s: float) -> dict:
    """The JSON-ready summary of one run (``wall_s``: first send to last completion)."""
    ok = [r for r in results if r.ok]
    output_tokens = sum(len(r.token_ids) for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    groups: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        groups[r.intervention or "none"].append(r)
    per_intervention = {}
    for name, items in sorted(groups.items()):
        good = [r for r in items if r.ok]
        per_intervention[name] = {"requests": len(items), "ok": len(good),
                                  "output_tokens": sum(len(r.token_ids) for r in good), **_latencies(items)}
    errors = Counter(r.status for r in results if not r.ok)
    samples = Counter((r.status, r.error) for r in results if not r.ok)
    return {
        "wall_s": wall_s,
        "requests": {"sent": len(results), "ok": len(ok), "failed": len(results) - len(ok)},
        "errors_by_status": dict(sorted(errors.items())),
        "error_samples": [{"status": s, "message": m, "count": n} for (s, m), n in samples.most_common(5)],
        "tokens": {"prompt": prompt_tokens, "output": output_tokens},
        "throughput": {"output_tok_s": output_tokens / wall_s if wall_s > 0 else 0.0,
                       "total_tok_s": (output_tokens + prompt_tokens) / wall_s if wall_s > 0 else 0.0,
                       "requests_s": len(ok) / wall_s if wall_s > 0 else 0.0},
        **_latencies(results),
        "per_intervention": per_intervention,
    }
