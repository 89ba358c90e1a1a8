"""pyvene ``ZeroIntervention``: ``h[:k] = 0`` (ablation).

No parameters. Config: ``width`` (required: the columns the edit acts on, d or the head's
``head_dim``; there is no tensor to read it from) and ``interchange_dim`` k (default d).
Low-rank form: ``z`` = 1 on the first k columns, so ``h − h ⊙ z`` zeroes them.
"""
from __future__ import annotations

import torch

from .base import LowRankEdit
from .family import Family, interchange_dim


class Zero(Family):
    name = "zero"
    library_classes = ("ZeroIntervention",)
    saved_config = ("interchange_dim", "width")

    def check(self, params, config, width):
        if config.get("width") != width:
            raise ValueError(f"zero: config 'width' must equal the component width {width}, got {config.get('width')!r}")
        interchange_dim(self.name, config, width)

    def forward(self, h, params, config):
        k = interchange_dim(self.name, config, h.shape[-1])
        out = h.clone()
        out[..., :k] = 0
        return out

    def lowrank(self, params, config):
        width = config["width"]
        z = torch.zeros(width)
        z[:interchange_dim(self.name, config, width)] = 1.0
        return LowRankEdit(z=z)


FAMILY = Zero()
