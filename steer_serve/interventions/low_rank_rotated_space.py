"""pyvene ``LowRankRotatedSpaceIntervention`` with a stored source: ``h + (s R − h R) Rᵀ``.

Parameters: ``rotate_layer`` R d×r (orthonormal columns, resolved), ``source`` s d. pyvene's
per-example ``subspaces`` selection is a training-time feature and is not supported.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LowRankEdit
from .family import Family, expect_shape, f32


@dataclass(frozen=True)
class LowRankRotatedSpaceSpec:
    width: int
    rank: int


class LowRankRotatedSpace(Family):
    name = "low_rank_rotated_space"
    required = ("rotate_layer", "source")

    def check(self, params, config, width):
        rank = params["rotate_layer"].shape[-1]
        expect_shape(self.name, params, "rotate_layer", (width, rank))
        expect_shape(self.name, params, "source", (width,))
        return LowRankRotatedSpaceSpec(width, rank)

    def forward(self, h, params, config):
        R = params["rotate_layer"]
        rotated_base = torch.matmul(h.to(R.dtype), R)
        rotated_source = torch.matmul(params["source"].to(R.dtype), R)
        out = h + torch.matmul(rotated_source - rotated_base, R.T)
        return out.to(h.dtype)

    def lowrank(self, params, config):
        R = f32(params["rotate_layer"])
        return LowRankEdit(b=f32(params["source"]) @ R, P=R, U=R)


FAMILY = LowRankRotatedSpace()
