"""DiReFT (pyreft ``DireftIntervention``): ``h + act(h Wᵀ + b) Rᵀ``.

No subtraction of the projected ``h``. Parameters (and their checks) are LoReFT's: ``rotate_layer``
R d×r, ``weight`` W r×d, ``bias`` b r. Config: ``act_fn``. pyreft casts ``h`` to
``learned_source``'s dtype and the activation to R's dtype; so does :meth:`DiReFT.forward`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LowRankEdit
from .family import act_name, activation, f32
from .loreft import LoReFT

class DiReFT(LoReFT):
    name = "direft"
    library_classes = ("DireftIntervention",)

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
