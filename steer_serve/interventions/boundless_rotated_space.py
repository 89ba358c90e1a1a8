"""pyvene ``BoundlessRotatedSpaceIntervention`` (Boundless DAS) with a stored source.

``out = ((1 − m) ⊙ h R + m ⊙ s R) Rᵀ`` with the soft boundary mask over rotated coordinates
``m_i = σ(i / T) · σ((clamp(β, 1e-3, 1)·d − i) / T)``. Parameters: ``rotate_layer`` R d×d
(resolved), ``source`` s d, ``intervention_boundaries`` β [1], ``temperature`` T [] (scalar).

Low-rank form, exact without assuming R Rᵀ = I (R comes out of ``matrix_exp`` only orthogonal
to float precision): ``z = 1`` drops h, ``W = (R diag(1 − m))ᵀ``, ``b = (s R) ⊙ m``, ``U = R``
(rank d), so ``h' = (h R ⊙ (1 − m) + s R ⊙ m) Rᵀ`` as pyvene computes it.
"""
from __future__ import annotations

import torch

from .base import LowRankEdit
from .family import ROTATION, SOURCE, Family, Saved, expect_shape, f32


def boundary_mask(params: dict[str, torch.Tensor], width: int) -> torch.Tensor:
    """pyvene's ``sigmoid_boundary`` mask over the ``width`` rotated coordinates."""
    population = torch.arange(0, width)
    temperature = params["temperature"]
    boundaries = torch.clamp(params["intervention_boundaries"], 1e-3, 1)
    upper = boundaries[0] * int(width)
    return torch.sigmoid((population - 0.0) / temperature) * torch.sigmoid((upper - population) / temperature)


class BoundlessRotatedSpace(Family):
    name = "boundless_rotated_space"
    required = ("rotate_layer", "source", "intervention_boundaries", "temperature")
    library_classes = ("BoundlessRotatedSpaceIntervention",)
    saved = {
        "rotate_layer": ROTATION,
        "source": SOURCE,
        "intervention_boundaries": Saved(("intervention_boundaries",)),
        "temperature": Saved(("temperature",)),
    }
    saved_unused = ("intervention_population",)

    def check(self, params, config, width):
        expect_shape(self.name, params, "rotate_layer", (width, width))
        expect_shape(self.name, params, "source", (width,))
        expect_shape(self.name, params, "intervention_boundaries", (1,))
        expect_shape(self.name, params, "temperature", ())

    def check_saved(self, unused, params):
        population = unused.get("intervention_population")
        width = params["rotate_layer"].shape[0]
        if population is not None and not torch.equal(population.long(), torch.arange(width)):
            raise ValueError(f"intervention_population is not arange({width}) as pyvene builds it")

    def forward(self, h, params, config):
        R = params["rotate_layer"]
        rotated_base = torch.matmul(h.to(R.dtype), R)
        rotated_source = torch.matmul(params["source"].to(R.dtype), R)
        mask = boundary_mask(params, R.shape[0]).to(rotated_base.dtype)
        rotated_output = (1.0 - mask) * rotated_base + mask * rotated_source
        return torch.matmul(rotated_output, R.T).to(h.dtype)

    def lowrank(self, params, config):
        R = f32(params["rotate_layer"])
        mask = f32(boundary_mask(params, R.shape[0]))
        return LowRankEdit(W=(R * (1.0 - mask)).T, b=(f32(params["source"]) @ R) * mask, U=R,
                           z=torch.ones(R.shape[0]))


FAMILY = BoundlessRotatedSpace()
