"""Intervention families: the registry, and the two reference forwards every test compares.

Adding a family = one new module in this package defining ``FAMILY`` (a :class:`~.family.Family`,
with its library classes and saved layout declared on it); it is found by scanning the package.
"""
from __future__ import annotations

import importlib
import pkgutil

import torch

from .base import Edit, Intervention, LowRankEdit, Placement
from .family import Family, activation, renormalise


def _discover() -> dict[str, Family]:
    families = {}
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        family = getattr(importlib.import_module(f".{module.name}", __name__), "FAMILY", None)
        if isinstance(family, Family):
            families[family.name] = family
    return families


#: Family name -> family object.
FAMILIES: dict[str, Family] = _discover()
#: pyvene/pyreft class name -> family (what a save directory's ``intervention_types`` name).
LIBRARY_CLASSES: dict[str, Family] = {cls: fam for fam in FAMILIES.values() for cls in fam.library_classes}


def get_family(name: str) -> Family:
    """The family registered under ``name``; ValueError listing the known names otherwise."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown intervention family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def edit_config(edit: Edit) -> dict:
    """The config a family sees for ``edit``: its own config plus the placement's head index."""
    if edit.placement.head is None:
        return edit.config
    return {**edit.config, "head": edit.placement.head}


def apply_edit_lowrank(h: torch.Tensor, lowrank: LowRankEdit, coef: float = 1.0) -> torch.Tensor:
    """Reference of the generic form: ``h + coef·((act(h Wᵀ + b) − h P) Uᵀ + v − h ⊙ z)``, rescaled to
    ``‖h‖`` row by row when ``lowrank.renorm``.

    Computed in float32 and cast back to ``h``'s dtype. None tensors count as zero (so with
    W and b both None the activation sees zeros).
    """
    x = h.to(torch.float32)
    delta = torch.zeros_like(x)
    if lowrank.U is not None:
        pre = x.new_zeros(*x.shape[:-1], lowrank.U.shape[1])
        if lowrank.W is not None:
            pre = pre + x @ lowrank.W.T
        if lowrank.b is not None:
            pre = pre + lowrank.b
        low = activation(lowrank.act)(pre)
        if lowrank.P is not None:
            low = low - x @ lowrank.P
        delta = delta + low @ lowrank.U.T
    if lowrank.v is not None:
        delta = delta + lowrank.v
    if lowrank.z is not None:
        delta = delta - x * lowrank.z
    out = x + coef * delta
    if lowrank.renorm and coef != 0:
        out = renormalise(out, x)
    return out.to(h.dtype)



def _apply_edit(edit: Edit, h: torch.Tensor) -> torch.Tensor:
    return get_family(edit.family).apply(h, edit.params, edit_config(edit))


def reference_apply(intervention_or_edit: Intervention | Edit, h):
    """The library-exact forward of an edit, or of an intervention at its default scale.

    For an :class:`Edit`, ``h`` is the ``[tokens, width]`` activation of its component. For an
    :class:`Intervention`, ``h`` is either one tensor (all edits must share one placement; they
    are applied in order, as pyvene runs hooks on one module in order) or a dict
    ``{Placement: tensor}`` giving each placement's activation; the result has the same shape.
    A scale ``s`` other than 1 gives ``h + s·(forward(h) − h)``, the generic form's coefficient.
    Positions are not applied here: every row of ``h`` is edited.
    """
    if isinstance(intervention_or_edit, Edit):
        return _apply_edit(intervention_or_edit, h)
    iv = intervention_or_edit
    if isinstance(h, dict):
        out = dict(h)
        for edit in iv.edits:
            if edit.placement not in out:
                raise ValueError(f"no activation given for placement {edit.placement}")
            out[edit.placement] = _apply_edit(edit, out[edit.placement])
        return {p: _scaled(h[p], out[p], iv.scale) for p in out}
    placements = {e.placement for e in iv.edits}
    if len(placements) > 1:
        raise ValueError(f"the intervention has {len(placements)} placements; pass h as a dict {{Placement: tensor}}")
    out = h
    for edit in iv.edits:
        out = _apply_edit(edit, out)
    return _scaled(h, out, iv.scale)


def _scaled(h: torch.Tensor, out: torch.Tensor, scale: float) -> torch.Tensor:
    return out if scale == 1.0 else (h + scale * (out - h)).to(h.dtype)


__all__ = ["FAMILIES", "Family", "Edit", "Intervention", "LowRankEdit", "Placement", "apply_edit_lowrank",
           "edit_config", "get_family", "reference_apply", "renormalise"]
