"""LobiReFT (pyreft ``LobireftIntervention``): ``h + c Rᵀ``, a learned bias in R's span.

Parameters: ``rotate_layer`` R d×r and ``learned_source`` c r. The edit is a constant vector,
so its low-rank form is rank 0 (``v = c Rᵀ``).
"""
from __future__ import annotations

import torch

from .base import LowRankEdit
from .consreft import ConsReFT
from .family import f32


class LobiReFT(ConsReFT):
    """ConsReFT's parameters, checks and saved layout; its own forward."""

    name = "lobireft"
    library_classes = ("LobireftIntervention",)

    def forward(self, h, params, config):
        out = h + torch.matmul(params["learned_source"], params["rotate_layer"].T)
        return out.to(h.dtype)

    def lowrank(self, params, config):
        return LowRankEdit(v=f32(torch.matmul(params["learned_source"], params["rotate_layer"].T)))


FAMILY = LobiReFT()
