"""pyvene ``SigmoidMaskIntervention`` with a stored source: ``(1 − m) ⊙ h + m ⊙ s``.

``m = σ(mask / T)`` per hidden column. Parameters: ``mask`` d, ``temperature`` T [] (scalar),
``source`` s d. Low-rank form: ``v = m ⊙ s``, ``z = m`` (rank 0).
"""
from __future__ import annotations

import torch

from .base import LowRankEdit
from .family import SOURCE, Family, Saved, expect_shape, f32


class SigmoidMask(Family):
    name = "sigmoid_mask"
    required = ("mask", "temperature", "source")
    library_classes = ("SigmoidMaskIntervention",)
    saved = {"mask": Saved(("mask",)), "temperature": Saved(("temperature",)), "source": SOURCE}

    def check(self, params, config, width):
        expect_shape(self.name, params, "mask", (width,))
        expect_shape(self.name, params, "temperature", ())
        expect_shape(self.name, params, "source", (width,))

    def forward(self, h, params, config):
        mask = torch.sigmoid(params["mask"] / params["temperature"])
        return ((1.0 - mask) * h + mask * params["source"]).to(h.dtype)

    def lowrank(self, params, config):
        mask = f32(torch.sigmoid(params["mask"] / params["temperature"]))
        return LowRankEdit(v=mask * f32(params["source"]), z=mask)


FAMILY = SigmoidMask()
