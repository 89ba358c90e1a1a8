"""LobiReFT (pyreft ``LobireftIntervention``): ``h + c Rᵀ``, a learned bias in R's span.

Parameters: ``rotate_layer`` R d×r and ``learned_source`` c r. The edit is a constant vector,
so its low-rank form is rank 0 (``v = c Rᵀ``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LowRankEdit
from .family import Family, expect_shape, f32


@dataclass(frozen=True)
class LobiReFTSpec:
    width: int
    rank: int


class LobiReFT(Family):
    name = "lobireft"
    required = ("rotate_layer", "learned_source")

    def check(self, params, config, width):
        rank = params["rotate_layer"].shape[-1]
        expect_shape(self.name, params, "rotate_layer", (width, rank))
        expect_shape(self.name, params, "learned_source", (rank,))
        return LobiReFTSpec(width, rank)

    def forward(self, h, params, config):
        out = h + torch.matmul(params["learned_source"], params["rotate_layer"].T)
        return out.to(h.dtype)

    def lowrank(self, params, config):
        return LowRankEdit(v=f32(torch.matmul(params["learned_source"], params["rotate_layer"].T)))


FAMILY = LobiReFT()
