"""Projection clamp: the coefficient of h along r̂ clamped to ``[lo, hi]``: ``h + (clamp(h·r̂) − h·r̂) r̂``.

Parameters: ``direction`` r, d (any non-zero norm). Config: ``lo`` and/or ``hi`` (finite, lo ≤ hi; a
missing bound is open). In the generic form with ``act = relu``, since ``clamp(a) − a = relu(lo − a) −
relu(a − hi)``: one rank per bound, ``W = [−r̂; r̂]``, ``b = [lo; −hi]``, ``U = [r̂, −r̂]``.
"""
from __future__ import annotations

import math

import torch

from .base import LowRankEdit
from .family import Family, expect_shape, unit


def _bounds(config: dict) -> tuple[float | None, float | None]:
    lo, hi = config.get("lo"), config.get("hi")
    for name, value in (("lo", lo), ("hi", hi)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ValueError(f"projection_clamp: {name} must be a finite number, got {value!r}")
    if lo is None and hi is None:
        raise ValueError("projection_clamp: config needs lo and/or hi (the bounds of the coefficient along the "
                         "direction)")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"projection_clamp: lo {lo} is above hi {hi}")
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


class ProjectionClamp(Family):
    name = "projection_clamp"
    required = ("direction",)

    def check(self, params, config, width):
        expect_shape(self.name, params, "direction", (width,))
        unit(self.name, params["direction"])
        _bounds(config)

    def forward(self, h, params, config):
        lo, hi = _bounds(config)
        r = unit(self.name, params["direction"]).to(h.dtype)
        a = h @ r
        return (h + (a.clamp(lo, hi) - a)[..., None] * r).to(h.dtype)

    def lowrank(self, params, config):
        lo, hi = _bounds(config)
        r = unit(self.name, params["direction"])
        rows = ([(-r, lo, r)] if lo is not None else []) + ([(r, -hi, -r)] if hi is not None else [])
        return LowRankEdit(W=torch.stack([w for w, _, _ in rows]), b=torch.tensor([b for _, b, _ in rows]),
                           U=torch.stack([u for _, _, u in rows], dim=1), act="relu")


FAMILY = ProjectionClamp()
