"""NodiReFT (pyreft ``NodireftIntervention``): ``h + act(h Wᵀ + b) W₂``.

Parameters: ``weight`` W r×d, ``bias`` b r (``learned_source``) and ``proj_weight`` W₂ r×d.
pyreft's forward never uses ``proj_layer.bias``, so readers drop it. Config: ``act_fn``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LowRankEdit
from .family import Family, Saved, act_name, activation, expect_shape, f32


class NodiReFT(Family):
    name = "nodireft"
    required = ("weight", "bias", "proj_weight")
    library_classes = ("NodireftIntervention",)
    saved = {
        "weight": Saved(("learned_source.weight", "weight")),
        "bias": Saved(("learned_source.bias", "bias")),
        "proj_weight": Saved(("proj_layer.weight",)),
    }
    saved_unused = ("proj_layer.bias",)  # its forward never reads it
    saved_config = ("act_fn",)

    def check(self, params, config, width):
        rank = params["weight"].shape[0]
        expect_shape(self.name, params, "weight", (rank, width))
        expect_shape(self.name, params, "bias", (rank,))
        expect_shape(self.name, params, "proj_weight", (rank, width))
        act_name(config)

    def forward(self, h, params, config):
        W, W2 = params["weight"], params["proj_weight"]
        act = activation(act_name(config))
        source = act(F.linear(h.to(W.dtype), W, params["bias"]))
        out = h + torch.matmul(source, W2.to(source.dtype))
        return out.to(h.dtype)

    def lowrank(self, params, config):
        return LowRankEdit(W=f32(params["weight"]), b=f32(params["bias"]), U=f32(params["proj_weight"]).T,
                           act=act_name(config))


FAMILY = NodiReFT()
