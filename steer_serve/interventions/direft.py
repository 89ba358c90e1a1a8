"""DiReFT (pyreft ``DireftIntervention``): ``h + act(h Wᵀ + b) Rᵀ``.

No subtraction of the projected ``h``. Parameters: ``rotate_layer`` R d×r, ``weight`` W r×d,
``bias`` b r. Config: ``act_fn``. pyreft casts ``h`` to ``learned_source``'s dtype and the
activation to R's dtype; so does :meth:`DiReFT.forward`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import LowRankEdit
from .family import Family, act_name, activation, expect_shape, f32


@dataclass(frozen=True)
class DiReFTSpec:
    width: int
    rank: int
    act_fn: str = "linear"


class DiReFT(Family):
    name = "direft"
    required = ("rotate_layer", "weight", "bias")

    def check(self, params, config, width):
        rank = params["rotate_layer"].shape[-1]
        expect_shape(self.name, params, "rotate_layer", (width, rank))
        expect_shape(self.name, params, "weight", (rank, width))
        expect_shape(self.name, params, "bias", (rank,))
        return DiReFTSpec(width, rank, act_name(config))

    def forward(self, h, params, config):
        R, W, b = params["rotate_layer"], params["weight"], params["bias"]
        act = activation(act_name(config))
        source = act(F.linear(h.to(W.dtype), W, b))
        out = h + torch.matmul(source.to(R.dtype), R.T)
        return out.to(h.dtype)

    def lowrank(self, params, config):
        return LowRankEdit(W=f32(params["weight"]), b=f32(params["bias"]), U=f32(params["rotate_layer"]),
                           act=act_name(config))


FAMILY = DiReFT()
