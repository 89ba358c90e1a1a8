"""Per-layer control vectors (repeng/llama.cpp GGUF, steering-vectors, CAA tensors) as interventions.

Every control-vector file is one vector per decoder layer, added to that layer's output (the
residual stream, ``block_output``) at every position, scaled by the request's scale (repeng's
``coeff``, steering-vectors' ``multiplier``). ``operator`` picks steering-vectors' operators:

* ``addition`` (default): ``h + s·v`` (family ``steering_vector``);
* ``ablation``: ``h − s·(h·v̂)v̂`` (family ``directional_ablation``; the library ignores its
  multiplier here, so scale 1 is the library's edit);
* ``ablation_then_addition``: ``h + s·(−(h·v̂)v̂ + v)`` (``directional_ablation`` with the vector's
  norm added back along v̂; the library's edit at scale 1).
"""
from __future__ import annotations

import torch

from ..interventions.base import Edit, Intervention, Placement
from .errors import InterventionFormatError

OPERATORS = ("addition", "ablation", "ablation_then_addition")
#: File suffixes read as control vectors (a single file, not a directory).
SUFFIXES = (".gguf", ".safetensors", ".pt", ".pth")


def check_operator(operator: str | None) -> str:
    """``operator`` or the default; an unknown one is an error naming the known ones."""
    if operator is None:
        return "addition"
    if operator not in OPERATORS:
        raise InterventionFormatError(f"unknown operator {operator!r}; expected one of {', '.join(OPERATORS)}",
                                      param="operator", code="unknown_operator")
    return operator


def _edit(layer: int, vector: torch.Tensor, operator: str, component: str) -> Edit:
    placement = Placement(layer, component)
    if operator == "addition":
        return Edit("steering_vector", placement, {"vector": vector})
    norm = float(vector.double().norm())
    if norm == 0.0:
        raise InterventionFormatError(f"operator {operator!r} needs a direction, but the vector of layer {layer} is "
                                      "zero", param="operator", code="invalid_intervention")
    config = {"mean": norm} if operator == "ablation_then_addition" else {}
    return Edit("directional_ablation", placement, {"direction": vector}, config)


def per_layer_intervention(vectors: dict[int, torch.Tensor], *, source_format: str, operator: str | None,
                           file_name: str, component: str = "block_output") -> Intervention:
    """One edit per layer from ``{layer: vector}`` (checked: 1-D, one width, non-negative layers)."""
    operator = check_operator(operator)
    if not vectors:
        raise InterventionFormatError(f"{file_name} holds no vectors", param="source", code="invalid_intervention")
    widths = set()
    for layer, vector in vectors.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise InterventionFormatError(f"{file_name}: layer {layer!r} is not a non-negative integer",
                                          param="source", code="invalid_intervention")
        if not isinstance(vector, torch.Tensor) or vector.dim() != 1 or not vector.is_floating_point():
            shape = list(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
            raise InterventionFormatError(f"{file_name}: the vector of layer {layer} must be a 1-D float tensor, "
                                          f"got {shape}", param="source", code="invalid_intervention")
        widths.add(vector.shape[0])
    if len(widths) != 1:
        raise InterventionFormatError(f"{file_name}: the layers' vectors have different widths {sorted(widths)}",
                                      param="source", code="invalid_intervention")
    edits = [_edit(layer, vectors[layer], operator, component) for layer in sorted(vectors)]
    return Intervention(edits=edits, hidden_size=widths.pop(), positions="all", source_format=source_format)
