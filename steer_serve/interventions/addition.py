"""pyvene ``AdditionIntervention`` with a stored source: ``h[:k] += source[:k]``.

Parameters: ``source`` d (pyvene's ``source_representation``). Config: ``interchange_dim`` k
(default d: the whole vector is added). This is how activation-addition steering vectors and
ITI head shifts are saved by pyvene.
"""
from __future__ import annotations

import torch

from .base import LowRankEdit
from .family import SOURCE, Family, expect_shape, f32, interchange_dim


class Addition(Family):
    name = "addition"
    required = ("source",)
    library_classes = ("AdditionIntervention",)
    saved = {"source": SOURCE}
    saved_config = ("interchange_dim",)
    sign = 1.0

    def check(self, params, config, width):
        expect_shape(self.name, params, "source", (width,))
        interchange_dim(self.name, config, width)

    def forward(self, h, params, config):
        k = interchange_dim(self.name, config, h.shape[-1])
        out = h.clone()
        if self.sign > 0:
            out[..., :k] += params["source"][..., :k]
        else:
            out[..., :k] -= params["source"][..., :k]
        return out

    def lowrank(self, params, config):
        source = f32(params["source"])
        k = interchange_dim(self.name, config, source.shape[-1])
        v = torch.zeros_like(source)
        v[:k] = self.sign * source[:k]
        return LowRankEdit(v=v)


FAMILY = Addition()
