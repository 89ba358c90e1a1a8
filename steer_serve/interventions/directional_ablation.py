"""Directional ablation: ``h − (h·r̂)r̂ + mean·r̂`` (r̂ = direction / ‖direction‖).

Parameters: ``direction`` r, d (any non-zero norm). Config: ``mean`` (default 0: the component along
r̂ is removed; otherwise it is set to ``mean``, e.g. the mean projection added back). It is the
generic low-rank form with rank 1: ``P = U = r̂``, ``v = mean·r̂``.
"""
from __future__ import annotations

import math

from .base import LowRankEdit
from .family import Family, expect_shape, unit


def _mean(config: dict) -> float:
    mean = config.get("mean", 0.0)
    if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not math.isfinite(mean):
        raise ValueError(f"directional_ablation: mean must be a finite number, got {mean!r}")
    return float(mean)


class DirectionalAblation(Family):
    name = "directional_ablation"
    required = ("direction",)

    def check(self, params, config, width):
        expect_shape(self.name, params, "direction", (width,))
        unit(self.name, params["direction"])
        _mean(config)

    def forward(self, h, params, config):
        r = unit(self.name, params["direction"]).to(h.dtype)
        return (h - (h @ r)[..., None] * r + _mean(config) * r).to(h.dtype)

    def lowrank(self, params, config):
        r = unit(self.name, params["direction"])
        return LowRankEdit(P=r[:, None], U=r[:, None], v=_mean(config) * r)


FAMILY = DirectionalAblation()
