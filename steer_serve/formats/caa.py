"""A plain CAA tensor file: mean differences saved as ``vectors`` (layers × hidden) + ``layers``.

``.safetensors`` (tensors ``vectors`` and ``layers``, integer) or ``.pt`` (a dict with the same keys,
``layers`` a tensor or a list of ints; read with ``torch.load(weights_only=True)``). Row i is added to
the output of decoder block ``layers[i]`` at every position, scaled by the request's scale.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..interventions.base import Intervention
from .control_vectors import per_layer_intervention
from .errors import InterventionFormatError
from .sources import load_safetensors

KEYS = ("vectors", "layers")


def _fail(path: Path, message: str):
    raise InterventionFormatError(f"{path.name}: {message}", param="source", code="invalid_intervention")


def caa_vectors(path: Path, content) -> dict[int, torch.Tensor]:
    """``{layer: row}`` from a loaded CAA file's content, checked."""
    if not isinstance(content, dict) or set(content) != set(KEYS):
        keys = sorted(map(str, content)) if isinstance(content, dict) else type(content).__name__
        _fail(path, f"a CAA tensor file holds exactly {' and '.join(KEYS)}; got {keys}")
    vectors, layers = content["vectors"], content["layers"]
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or not vectors.is_floating_point():
        _fail(path, "vectors must be a 2-D float tensor (layers × hidden)")
    if isinstance(layers, torch.Tensor):
        if layers.dim() != 1 or layers.is_floating_point() or layers.is_complex():
            _fail(path, "layers must be a 1-D integer tensor or a list of ints")
        layers = layers.tolist()
    if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        _fail(path, "layers must be a 1-D integer tensor or a list of ints")
    if len(layers) != vectors.shape[0]:
        _fail(path, f"vectors has {vectors.shape[0]} rows but layers lists {len(layers)} layers")
    if len(set(layers)) != len(layers):
        _fail(path, f"layers {layers} repeats a layer")
    return {layer: vectors[i].clone() for i, layer in enumerate(layers)}


def read_caa(path: str | Path, *, operator: str | None = None, loaded=None) -> Intervention:
    """An intervention adding each row to its layer's block output."""
    path = Path(path)
    content = load_safetensors(path) if loaded is None else loaded
    return per_layer_intervention(caa_vectors(path, content), source_format="caa", operator=operator,
                                  file_name=path.name)
