"""Shared pieces of the serving benchmarks: random LoReFTs, one live server, a timed batch of requests."""
from __future__ import annotations

import asyncio
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "tests"))

from live_server import ServerProcess  # noqa: E402  (tests/ is not a package)
from steer_client import AsyncClient, Client  # noqa: E402

TOKEN_RANGE = (1000, 30000)


def random_loreft_native(directory: Path, seed: int, layers: list[int], rank: int = 4, hidden: int = 576,
                         strength: float = 3.0, positions: str = "all") -> Path:
    """Save a random LoReFT (orthonormal R, one edit per layer in ``layers``) as a native directory."""
    import torch

    from steer_serve.formats.native import save_native
    from steer_serve.interventions.base import Edit, Intervention, Placement

    gen = torch.Generator().manual_seed(seed)
    edits = []
    for layer in layers:
        rotate, _ = torch.linalg.qr(torch.randn(hidden, rank, generator=gen))
        params = {"rotate_layer": rotate.contiguous(),
                  "weight": torch.randn(rank, hidden, generator=gen) * strength / hidden ** 0.5,
                  "bias": torch.randn(rank, generator=gen) * strength}
        edits.append(Edit("loreft", Placement(layer, "block_output"), params))
    if not directory.exists():
        save_native(Intervention(edits, hidden, positions=positions), directory)
    return directory


def start_server(workdir: Path, allowed_dir: Path, *args: str, env: dict | None = None) -> ServerProcess:
    """One ``steer-serve serve`` subprocess on a free loopback port (log in ``workdir/server.log``); ``env``
    adds to the environment it inherits."""
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"starting server (log {workdir / 'server.log'}) ...", flush=True)
    started = time.perf_counter()
    server = ServerProcess("--allowed-intervention-dir", str(allowed_dir), *args, registry_dir=workdir / "registry",
                           log_path=workdir / "server.log", env=env).start()
    print(f"server ready at {server.url} after {time.perf_counter() - started:.0f}s", flush=True)
    return server


def register_all(url: str, sources: dict[str, Path], positions: str | None = None, upload: bool = False) -> None:
    """Register every ``id -> directory`` (replacing an id that exists): by server-side path, or by
    multipart upload of native directories (works with any server, whatever its allowed dirs)."""
    with Client(url, timeout=600) as client:
        for name, path in sources.items():
            if upload:
                client.interventions.upload(name, path, positions=positions, replace=True)
            else:
                client.interventions.register(name, str(path), positions=positions, replace=True)


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` random token-id prompts of ``length`` tokens (distinct per seed, so no prefix-cache hits)."""
    rng = random.Random(seed)
    return [[rng.randrange(*TOKEN_RANGE) for _ in range(length)] for _ in range(n)]


async def _batch(url: str, batch: list[list[int]], steering: list[dict], max_tokens: int) -> tuple[float, list]:
    async with AsyncClient(url, timeout=600, max_retries=0) as client:
        started = time.perf_counter()
        outs = await asyncio.gather(*(client.complete(p, max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                                      return_token_ids=True, **s) for p, s in zip(batch, steering)))
        return time.perf_counter() - started, [o.choices[0].token_ids for o in outs]


def timed_batch(url: str, batch: list[list[int]], steering: list[dict], max_tokens: int) -> tuple[float, list]:
    """Send every request at once (greedy, ``ignore_eos``); (seconds until the last answer, token ids)."""
    return asyncio.run(_batch(url, batch, steering, max_tokens))


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.machine())


def machine() -> dict:
    """Where a result was measured."""
    return {"platform": platform.platform(), "processor": _cpu_model(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def add_ratios(rows: list[dict], is_baseline=lambda row: row["config"].startswith("unsteered")) -> float:
    """Give every row its ``ratio`` of tok/s to the mean of the baseline rows (the unsteered ones, run
    before and after the others, so their spread shows the noise); returns that mean."""
    import statistics

    base = statistics.mean(row["tok_s"] for row in rows if is_baseline(row))
    for row in rows:
        row["ratio"] = row["tok_s"] / base
    return base


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A fixed-width text table; ``columns`` are (key, header, format spec)."""
    head = "  ".join(f"{h:>14}" if i else f"{h:<28}" for i, (_, h, _) in enumerate(columns))
    lines = [head, "-" * len(head)]
    for row in rows:
        cells = []
        for i, (key, _, spec) in enumerate(columns):
            value = row.get(key)
            text = "-" if value is None else format(value, spec)
            cells.append(f"{text:>14}" if i else f"{text:<28}")
        lines.append("  ".join(cells))
    return "\n".join(lines)
