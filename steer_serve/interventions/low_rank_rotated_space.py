"""pyvene ``LowRankRotatedSpaceIntervention`` with a stored source: ``h + (s R − h R) Rᵀ``.

Parameters: ``rotate_layer`` R d×r (orthonormal columns, resolved), ``source`` s d. pyvene's
``subspaces`` pick columns of R (``subspace_axes``; served per request, see ``api/interchange.py``).
"""
from __future__ import annotations

import torch

from .base import LowRankEdit
from .family import ROTATION, SOURCE, Family, expect_shape, f32


class LowRankRotatedSpace(Family):
    name = "low_rank_rotated_space"
    required = ("rotate_layer", "source")
    library_classes = ("LowRankRotatedSpaceIntervention",)
    saved = {"rotate_layer": ROTATION, "source": SOURCE}
    takes_subspaces = True

    def check(self, params, config, width):
        rank = params["rotate_layer"].shape[-1]
        expect_shape(self.name, params, "rotate_layer", (width, rank))
        expect_shape(self.name, params, "source", (width,))

    def forward(self, h, params, config):
        R = params["rotate_layer"]
        rotated_base = torch.matmul(h.to(R.dtype), R)
        rotated_source = torch.matmul(params["source"].to(R.dtype), R)
        out = h + torch.matmul(rotated_source - rotated_base, R.T)
        return out.to(h.dtype)

    def lowrank(self, params, config):
        R = f32(params["rotate_layer"])
        return LowRankEdit(b=f32(params["source"]) @ R, P=R, U=R)

    def subspace_axes(self, params):
        return f32(params["rotate_layer"])


FAMILY = LowRankRotatedSpace()
