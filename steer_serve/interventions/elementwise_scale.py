"""An elementwise rescaling of a component: ``h ⊙ s`` — what PEFT's IA3 (``ia3_l``) does at a site.

Parameters: ``scaling`` s, one factor per column. Low-rank form: ``z = 1 − s``, so ``h − h ⊙ z = h ⊙ s``;
a request-time scale c gives ``h ⊙ (1 − c·(1 − s))`` (c = 1 is the saved adapter, c = 0 the base model).
"""
from __future__ import annotations

from .base import LowRankEdit
from .family import Family, expect_shape, f32


class ElementwiseScale(Family):
    name = "elementwise_scale"
    required = ("scaling",)

    def check(self, params, config, width):
        expect_shape(self.name, params, "scaling", (width,))

    def forward(self, h, params, config):
        return (h * params["scaling"].to(h.dtype)).to(h.dtype)

    def lowrank(self, params, config):
        return LowRankEdit(z=1.0 - f32(params["scaling"]))


FAMILY = ElementwiseScale()
