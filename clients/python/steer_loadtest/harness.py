"""One load test end to end: pick interventions, run the workload, summarise, optionally verify."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field

from steer_client import AsyncClient
from steer_loadtest import runner, stats, verify
from steer_loadtest.workload import LengthDist, workload


@dataclass
class LoadConfig:
    """Everything a run depends on (also written into the results JSON)."""

    base_url: str
    rate: float | None = None
    concurrency: int | None = None
    num_requests: int | None = None
    duration: float | None = None
    interventions: list[str] = field(default_factory=list)
    num_interventions: int | None = None
    mix: str = "uniform"
    zipf_s: float = 1.1
    none_fraction: float = 0.0
    prompt_len: str = "32"
    output_len: str = "32"
    ignore_eos: bool = True
    verify: int = 0
    seed: int = 0
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 600.0


async def pick_interventions(client: AsyncClient, cfg: LoadConfig) -> list[str]:
    """The explicit ids, or the first ``num_interventions`` registered ones (sorted by id)."""
    if cfg.interventions or not cfg.num_interventions:
        return list(cfg.interventions)
    names = sorted(i.id for i in await client.interventions.list())
    if len(names) < cfg.num_interventions:
        raise ValueError(f"asked for {cfg.num_interventions} interventions, the server has {len(names)} registered")
    return names[:cfg.num_interventions]


async def run_loadtest(cfg: LoadConfig, transport=None, progress_stream=sys.stderr) -> tuple[dict, list]:
    """Run ``cfg``; returns (JSON-ready report, per-request results). ``transport`` is for tests."""
    prompt_len, output_len = LengthDist.parse(cfg.prompt_len), LengthDist.parse(cfg.output_len)
    async with AsyncClient(cfg.base_url, api_key=cfg.api_key, timeout=cfg.timeout, max_retries=0,
                           transport=transport, max_connections=None) as client:
        names = await pick_interventions(client, cfg)
        sent: dict = {}

        def recorded():
            for spec in workload(names, prompt_len, output_len, mix=cfg.mix, zipf_s=cfg.zipf_s,
                                 none_fraction=cfg.none_fraction, seed=cfg.seed):
                sent[spec.index] = spec
                yield spec

        started = time.time()
        results, wall = await runner.run(client, recorded(), rate=cfg.rate, concurrency=cfg.concurrency,
                                         num_requests=cfg.num_requests, duration=cfg.duration,
                                         ignore_eos=cfg.ignore_eos, seed=cfg.seed, progress_stream=progress_stream)
        report = {"config": {k: v for k, v in asdict(cfg).items() if k != "api_key"}, "interventions": names,
                  "started_unix": started, **stats.summarize(results, wall)}
        if cfg.verify:
            report["verify"] = await verify.verify(client, sent, results, cfg.verify, cfg.ignore_eos, cfg.seed)
    return report, results
