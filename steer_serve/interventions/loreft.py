"""LoReFT (pyreft ``LoreftIntervention``): ``h + (act(h Wᵀ + b) − h R) Rᵀ``.

Parameters, under pyreft's saved names: ``rotate_layer`` R d×r (orthonormal columns),
``weight`` W r×d and ``bias`` b r (pyreft's ``learned_source``). Config: ``act_fn`` (default
linear, as pyreft). Dropout is the identity at inference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LowRankEdit
from .family import ROTATION, Family, Saved, act_name, activation, expect_shape, f32


class LoReFT(Family):
    name = "loreft"
    required = ("rotate_layer", "weight", "bias")
    library_classes = ("LoreftIntervention",)
    saved = {
        "rotate_layer": ROTATION,
        "weight": Saved(("learned_source.weight", "weight")),
        "bias": Saved(("learned_source.bias", "bias")),
    }
    saved_config = ("act_fn",)

    def check(self, params, config, width):
        rank = params["rotate_layer"].shape[-1]
        expect_shape(self.name, params, "rotate_layer", (width, rank))
        expect_shape(self.name, params, "weight", (rank, width))
        expect_shape(self.name, params, "bias", (rank,))
        act_name(config)

    def forward(self, h, params, config):
        R, W, b = params["rotate_layer"], params["weight"], params["bias"]
        act = activation(act_name(config))
        rotated = torch.matmul(h.to(R.dtype), R)  # LowRankRotateLayer casts to its own dtype
        source = F.linear(h.to(W.dtype), W, b)  # pyreft needs h already in learned_source's dtype
        out = h + torch.matmul(act(source) - rotated, R.T)
        return out.to(h.dtype)

    def lowrank(self, params, config):
        R = f32(params["rotate_layer"])
        return LowRankEdit(W=f32(params["weight"]), b=f32(params["bias"]), P=R, U=R, act=act_name(config))


FAMILY = LoReFT()
