"""pyvene ``RotatedSpaceIntervention`` (DAS) with a stored source representation.

``out = swap_k(h R, s R) Rᵀ`` where R d×d is orthogonal and ``swap_k`` takes the first k rotated
coordinates from the source s. Parameters: ``rotate_layer`` R d×d (the parametrization already
resolved), ``source`` s d. Config: ``interchange_dim`` k (default d).

Low-rank form, rank k instead of pyvene's d (DAS subspaces are small), using R Rᵀ = I:
``delta = (s R_k − h R_k) R_kᵀ`` with R_k the first k columns. R is orthogonal to float
precision only, so this differs from pyvene by about ``|h|·‖R Rᵀ − I‖`` (~1e-6 for d = 64).
For k = d the output no longer depends on h: ``z = 1``, ``v = (s R) Rᵀ``. pyvene's ``subspaces`` pick
rotated coordinates instead of the first k (``subspace_axes``: R's columns; see ``api/interchange.py``).
"""
from __future__ import annotations

import torch

from .base import LowRankEdit
from .family import ROTATION, SOURCE, Family, expect_shape, f32, interchange_dim


class RotatedSpace(Family):
    name = "rotated_space"
    required = ("rotate_layer", "source")
    library_classes = ("RotatedSpaceIntervention",)
    saved = {"rotate_layer": ROTATION, "source": SOURCE}
    saved_config = ("interchange_dim",)
    takes_subspaces = True

    def check(self, params, config, width):
        expect_shape(self.name, params, "rotate_layer", (width, width))
        expect_shape(self.name, params, "source", (width,))
        interchange_dim(self.name, config, width)

    def forward(self, h, params, config):
        R = params["rotate_layer"]
        k = interchange_dim(self.name, config, h.shape[-1])
        rotated_base = torch.matmul(h.to(R.dtype), R)
        rotated_source = torch.matmul(params["source"].to(R.dtype), R)
        rotated_base[..., :k] = rotated_source[..., :k]
        return torch.matmul(rotated_base, R.T).to(h.dtype)

    def lowrank(self, params, config):
        R, source = f32(params["rotate_layer"]), f32(params["source"])
        width = R.shape[0]
        k = interchange_dim(self.name, config, width)
        rotated_source = source @ R
        if k == width:
            return LowRankEdit(v=rotated_source @ R.T, z=torch.ones(width))
        Rk = R[:, :k]
        return LowRankEdit(b=rotated_source[:k], P=Rk, U=Rk)

    def subspace_axes(self, params):
        return f32(params["rotate_layer"])


FAMILY = RotatedSpace()
