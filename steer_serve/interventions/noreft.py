"""NoReFT (pyreft ``NoreftIntervention``): ``h + (act(h Wᵀ + b) − (h W₂ᵀ + b₂)) W₂``.

Like LoReFT with a plain (non-orthogonal) projection W₂ = ``proj_layer``. Parameters:
``weight`` W r×d, ``bias`` b r (``learned_source``), ``proj_weight`` W₂ r×d and the optional
``proj_bias`` b₂ r (pyreft's ``add_bias``). Config: ``act_fn``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LowRankEdit
from .family import Family, Saved, act_name, activation, expect_shape, f32


class NoReFT(Family):
    name = "noreft"
    required = ("weight", "bias", "proj_weight")
    optional = ("proj_bias",)
    library_classes = ("NoreftIntervention",)
    saved = {
        "weight": Saved(("learned_source.weight", "weight")),
        "bias": Saved(("learned_source.bias", "bias")),
        "proj_weight": Saved(("proj_layer.weight",)),
        "proj_bias": Saved(("proj_layer.bias",), optional=True),
    }
    saved_config = ("act_fn",)

    def check(self, params, config, width):
        rank = params["weight"].shape[0]
        expect_shape(self.name, params, "weight", (rank, width))
        expect_shape(self.name, params, "bias", (rank,))
        expect_shape(self.name, params, "proj_weight", (rank, width))
        if "proj_bias" in params:
            expect_shape(self.name, params, "proj_bias", (rank,))
        act_name(config)

    def forward(self, h, params, config):
        W2 = params["proj_weight"]
        act = activation(act_name(config))
        proj = F.linear(h.to(W2.dtype), W2, params.get("proj_bias"))
        source = F.linear(h.to(params["weight"].dtype), params["weight"], params["bias"])
        out = h + torch.matmul(act(source) - proj, W2)
        return out.to(h.dtype)

    def lowrank(self, params, config):
        W2 = f32(params["proj_weight"])
        b2 = params.get("proj_bias")
        v = None if b2 is None else -(f32(b2) @ W2)
        return LowRankEdit(W=f32(params["weight"]), b=f32(params["bias"]), P=W2.T, U=W2.T, v=v,
                           act=act_name(config))


FAMILY = NoReFT()
