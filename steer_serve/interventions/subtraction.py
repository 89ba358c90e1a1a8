"""pyvene ``SubtractionIntervention`` with a stored source: ``h[:k] -= source[:k]``.

Parameters: ``source`` d. Config: ``interchange_dim`` k (default d).
"""
from __future__ import annotations

from .addition import Addition


class Subtraction(Addition):
    name = "subtraction"
    library_classes = ("SubtractionIntervention",)
    sign = -1.0


FAMILY = Subtraction()
