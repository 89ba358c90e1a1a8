"""PNG plots (matplotlib, an optional dependency: ``pip install steer-client[plots]``)."""
from __future__ import annotations

from pathlib import Path

from steer_loadtest.runner import Result


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values: list[float], label: str) -> None:
    if values:
        data = sorted(values)
        ax.step([v * 1e3 for v in data], [(i + 1) / len(data) for i in range(len(data))], where="post", label=label)


def latency_cdf(results: list[Result], path: str | Path, title: str = "") -> Path:
    """TTFT, TPOT and end-to-end latency CDFs, split into steered / unsteered / all requests."""
    plt = _pyplot()
    ok = [r for r in results if r.ok]
    groups = {"all": ok, "steered": [r for r in ok if r.intervention], "unsteered": [r for r in ok if not r.intervention]}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, metric) in zip(axes, (("TTFT", "ttft"), ("TPOT", "tpot"), ("latency", "latency"))):
        for label, items in groups.items():
            if items and (label == "all" or len(items) < len(ok)):
                _cdf(ax, [v for v in (getattr(r, metric) for r in items) if v is not None], f"{label} ({len(items)})")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "steer-loadtest latency CDF")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def bars(labels: list[str], values: list[float], path: str | Path, ylabel: str, title: str,
         reference: float | None = None) -> Path:
    """A bar chart (benchmarks: tok/s per configuration), with an optional dashed reference line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(labels)), 3.8))
    ax.bar(labels, values, color="#4c72b0")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    if reference is not None:
        ax.axhline(reference, ls="--", color="grey", lw=1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def sweep(series: dict[str, list[tuple[float, float, float]]], path: str | Path, title: str) -> Path:
    """Rate sweep: per series (e.g. ``K=8``) points (rate, output tok/s, p99 TTFT s), two panels."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, points in series.items():
        rates = [p[0] for p in points]
        left.plot(rates, [p[1] for p in points], marker="o", label=name)
        right.plot(rates, [p[2] * 1e3 if p[2] is not None else float("nan") for p in points], marker="o", label=name)
    left.set_xlabel("offered rate (req/s)")
    left.set_ylabel("output tok/s")
    right.set_xlabel("offered rate (req/s)")
    right.set_ylabel("p99 TTFT (ms)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
