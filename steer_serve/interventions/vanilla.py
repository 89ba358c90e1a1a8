"""pyvene ``VanillaIntervention``: interchange, ``h[:k] = s[:k]`` (the source's first k dims copied in).

Parameters: ``source`` s d (a stored source, or the source run of each request: see the API's
interchange). Config: ``interchange_dim`` k (default d: the whole representation is copied).
Low-rank form: ``z`` = 1 and ``v`` = s on the first k columns, so ``h − h ⊙ z + v`` takes them from s.
pyvene's ``subspaces`` pick the copied dims instead of the first k (``subspace_axes``: the identity).
"""
from __future__ import annotations

import torch

from .base import LowRankEdit
from .family import SOURCE, Family, expect_shape, f32, interchange_dim


class Vanilla(Family):
    name = "vanilla"
    required = ("source",)
    library_classes = ("VanillaIntervention",)
    saved = {"source": SOURCE}
    saved_config = ("interchange_dim",)
    takes_subspaces = True

    def check(self, params, config, width):
        expect_shape(self.name, params, "source", (width,))
        interchange_dim(self.name, config, width)

    def forward(self, h, params, config):
        k = interchange_dim(self.name, config, h.shape[-1])
        out = h.clone()
        out[..., :k] = params["source"][..., :k].to(h.dtype)
        return out

    def lowrank(self, params, config):
        source = f32(params["source"])
        k = interchange_dim(self.name, config, source.shape[-1])
        z = torch.zeros_like(source)
        z[:k] = 1.0
        return LowRankEdit(v=source * z, z=z)

    def subspace_axes(self, params):
        return torch.eye(params["source"].shape[-1])


FAMILY = Vanilla()
