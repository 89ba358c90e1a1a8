"""ConsReFT (pyreft ``ConsreftIntervention``): ``h + (c − h R) Rᵀ`` with a learned constant c.

Parameters: ``rotate_layer`` R d×r and ``learned_source`` c r. No activation, no dropout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LowRankEdit
from .family import Family, expect_shape, f32


@dataclass(frozen=True)
class ConsReFTSpec:
    width: int
    rank: int


class ConsReFT(Family):
    name = "consreft"
    required = ("rotate_layer", "learned_source")

    def check(self, params, config, width):
        rank = params["rotate_layer"].shape[-1]
        expect_shape(self.name, params, "rotate_layer", (width, rank))
        expect_shape(self.name, params, "learned_source", (rank,))
        return ConsReFTSpec(width, rank)

    def forward(self, h, params, config):
        R = params["rotate_layer"]
        rotated = torch.matmul(h.to(R.dtype), R)
        out = h + torch.matmul(params["learned_source"] - rotated, R.T)
        return out.to(h.dtype)

    def lowrank(self, params, config):
        R = f32(params["rotate_layer"])
        return LowRankEdit(b=f32(params["learned_source"]), P=R, U=R)


FAMILY = ConsReFT()
