"""LobiReFT (pyreft ``LobireftIntervention``): ``h + c Rᵀ``, a learned bias in R's span.

Parameters: ``rotate_layer`` R d×r and ``learned_source`` c r. The edit is a constant vector,
so its low-rank form is rank 0 (``v = c Rᵀ``).
"""
from __future__ import annotations

import torch

from .base import LowRankEdit
from .family import ROTATION, Family, Saved, expect_shape, f32


class LobiReFT(Family):
    name = "lobireft"
    required = ("rotate_layer", "learned_source")
    library_classes = ("LobireftIntervention",)
    saved = {"rotate_layer": ROTATION, "learned_source": Saved(("learned_source",))}

    def check(self, params, config, width):
        rank = params["rotate_layer"].shape[-1]
        expect_shape(self.name, params, "rotate_layer", (width, rank))
        expect_shape(self.name, params, "learned_source", (rank,))

    def forward(self, h, params, config):
        out = h + torch.matmul(params["learned_source"], params["rotate_layer"].T)
        return out.to(h.dtype)

    def lowrank(self, params, config):
        return LowRankEdit(v=f32(torch.matmul(params["learned_source"], params["rotate_layer"].T)))


FAMILY = LobiReFT()
