"""A plain steering vector: ``h + scale · v``.

Parameters: ``vector`` v d. Config: ``scale`` (default 1.0), applied on top of the
intervention's own request-time scale.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import LowRankEdit
from .family import Family, expect_shape, f32


@dataclass(frozen=True)
class SteeringVectorSpec:
    width: int
    scale: float = 1.0


def _scale(config: dict) -> float:
    scale = config.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"steering_vector: scale must be a number, got {scale!r}")
    return float(scale)


class SteeringVector(Family):
    name = "steering_vector"
    required = ("vector",)

    def check(self, params, config, width):
        expect_shape(self.name, params, "vector", (width,))
        return SteeringVectorSpec(width, _scale(config))

    def forward(self, h, params, config):
        return (h + _scale(config) * params["vector"]).to(h.dtype)

    def lowrank(self, params, config):
        return LowRankEdit(v=_scale(config) * f32(params["vector"]))


FAMILY = SteeringVector()
