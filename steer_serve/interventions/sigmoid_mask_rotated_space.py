"""pyvene ``SigmoidMaskRotatedSpaceIntervention`` with a stored source.

``out = ((1 − m) ⊙ h R + m ⊙ s R) Rᵀ`` with ``m = σ(masks / T)`` over rotated coordinates.
Parameters: ``rotate_layer`` R d×d (resolved), ``masks`` d, ``temperature`` T [], ``source`` s d.
Low-rank form as Boundless DAS (exact, rank d): ``z = 1``, ``W = (R diag(1 − m))ᵀ``,
``b = (s R) ⊙ m``, ``U = R``.
"""
from __future__ import annotations

import torch

from .base import LowRankEdit
from .family import ROTATION, SOURCE, Family, Saved, expect_shape, f32


class SigmoidMaskRotatedSpace(Family):
    name = "sigmoid_mask_rotated_space"
    required = ("rotate_layer", "masks", "temperature", "source")
    library_classes = ("SigmoidMaskRotatedSpaceIntervention",)
    saved = {
        "rotate_layer": ROTATION,
        "masks": Saved(("masks",)),
        "temperature": Saved(("temperature",)),
        "source": SOURCE,
    }

    def check(self, params, config, width):
        expect_shape(self.name, params, "rotate_layer", (width, width))
        expect_shape(self.name, params, "masks", (width,))
        expect_shape(self.name, params, "temperature", ())
        expect_shape(self.name, params, "source", (width,))

    def forward(self, h, params, config):
        R = params["rotate_layer"]
        rotated_base = torch.matmul(h.to(R.dtype), R)
        rotated_source = torch.matmul(params["source"].to(R.dtype), R)
        mask = torch.sigmoid(params["masks"] / params["temperature"]).to(rotated_base.dtype)
        rotated_output = (1.0 - mask) * rotated_base + mask * rotated_source
        return torch.matmul(rotated_output, R.T).to(h.dtype)

    def lowrank(self, params, config):
        R = f32(params["rotate_layer"])
        mask = f32(torch.sigmoid(params["masks"] / params["temperature"]))
        return LowRankEdit(W=(R * (1.0 - mask)).T, b=(f32(params["source"]) @ R) * mask, U=R,
                           z=torch.ones(R.shape[0]))


FAMILY = SigmoidMaskRotatedSpace()
