"""ConsReFT (pyreft ``ConsreftIntervention``): ``h + (c − h R) Rᵀ`` with a learned constant c.

Parameters: ``rotate_layer`` R d×r and ``learned_source`` c r. No activation, no dropout.
"""
from __future__ import annotations

import torch

from .base import LowRankEdit
from .family import ROTATION, Family, Saved, expect_shape, f32


class ConsReFT(Family):
    name = "consreft"
    required = ("rotate_layer", "learned_source")
    library_classes = ("ConsreftIntervention",)
    saved = {"rotate_layer": ROTATION, "learned_source": Saved(("learned_source",))}

    def check(self, params, config, width):
        rank = params["rotate_layer"].shape[-1]
        expect_shape(self.name, params, "rotate_layer", (width, rank))
        expect_shape(self.name, params, "learned_source", (rank,))

    def forward(self, h, params, config):
        R = params["rotate_layer"]
        rotated = torch.matmul(h.to(R.dtype), R)
        out = h + torch.matmul(params["learned_source"] - rotated, R.T)
        return out.to(h.dtype)

    def lowrank(self, params, config):
        R = f32(params["rotate_layer"])
        return LowRankEdit(b=f32(params["learned_source"]), P=R, U=R)


FAMILY = ConsReFT()
