"""Cross-talk detector: re-run a sample of finished requests one at a time and compare greedy tokens."""
from __future__ import annotations

import random
from collections import defaultdict

from steer_client import AsyncClient
from steer_loadtest.runner import Result, request_fields
from steer_loadtest.workload import RequestSpec


def pick_sample(results: list[Result], n: int, seed: int = 0) -> list[Result]:
    """Up to ``n`` successful results, taken round-robin across interventions (``none`` included)."""
    rng = random.Random(seed)
    groups: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        if r.ok:
            groups[r.intervention or "none"].append(r)
    pools = [rng.sample(items, len(items)) for _, items in sorted(groups.items())]
    sample: list[Result] = []
    while len(sample) < n and any(pools):
        for pool in pools:
            if pool and len(sample) < n:
                sample.append(pool.pop())
    return sorted(sample, key=lambda r: r.index)


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


async def verify(client: AsyncClient, specs: dict[int, RequestSpec], results: list[Result], n: int,
                 ignore_eos: bool = True, seed: int = 0) -> dict:
    """Re-send ``n`` sampled requests solo (sequentially, greedy) and report those whose tokens differ."""
    sample = pick_sample(results, n, seed)
    mismatches = []
    for result in sample:
        spec = specs[result.index]
        solo = await client.complete(spec.prompt, **request_fields(spec, ignore_eos))
        solo_ids = solo.choices[0].token_ids or []
        if solo_ids != result.token_ids:
            at = _first_difference(result.token_ids, solo_ids)
            mismatches.append({"index": result.index, "intervention": result.intervention, "first_difference": at,
                               "batched_tokens": len(result.token_ids), "solo_tokens": len(solo_ids),
                               "batched_ids": result.token_ids[at:at + 8], "solo_ids": solo_ids[at:at + 8]})
    return {"checked": len(sample), "mismatched": len(mismatches), "mismatches": mismatches,
            "checked_interventions": sorted({r.intervention or "none" for r in sample})}
