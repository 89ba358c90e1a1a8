"""Norm-preserving steering: ``h' = (h + s·v) · ‖h‖ / ‖h + s·v‖`` (vllm-lens' ``norm_match``, repeng's
``normalize=True``).

Parameters: ``vector`` v, d. The request's scale is s. The generic form's ``v`` with ``renorm``: the
kernels rescale each edited row to the norm of the row before the edit, in the same launch.
"""
from __future__ import annotations

from .base import LowRankEdit
from .family import Family, expect_shape, f32, renormalise


class NormPreservingSteering(Family):
    name = "norm_preserving_steering"
    required = ("vector",)

    def check(self, params, config, width):
        expect_shape(self.name, params, "vector", (width,))

    def forward(self, h, params, config):
        x = h.float()
        return renormalise(x + params["vector"].float(), x).to(h.dtype)

    def lowrank(self, params, config):
        return LowRankEdit(v=f32(params["vector"]), renorm=True)


FAMILY = NormPreservingSteering()
