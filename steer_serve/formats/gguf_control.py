"""GGUF control vectors as repeng's ``ControlVector.export_gguf`` and llama.cpp write them.

``general.architecture = "controlvector"``, ``controlvector.layer_count``, and one F32 tensor
``direction.L`` per layer: L is the 0-based decoder block whose output gets ``coeff · direction.L``
at every position (repeng's ``ControlModel``; llama.cpp's ``--control-vector-scaled`` for L ≥ 1).
Read with the ``gguf`` package; nothing else in the file is interpreted.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..interventions.base import Intervention
from .control_vectors import per_layer_intervention
from .errors import InterventionFormatError
from .sources import MAX_WEIGHTS_BYTES, check_file_size

ARCHITECTURE = "controlvector"
_DIRECTION = re.compile(r"direction\.(\d{1,6})")


def _fail(path: Path, message: str, code: str = "invalid_gguf"):
    raise InterventionFormatError(f"{path.name}: {message}", param="source", code=code)


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def read_gguf_vectors(path: str | Path) -> dict[int, torch.Tensor]:
    """``{layer: direction}`` of a control-vector GGUF file (float32), checked."""
    import gguf

    path = Path(path)
    check_file_size(path, MAX_WEIGHTS_BYTES)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            _fail(path, "not a GGUF file (no GGUF magic)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader fails in many ways on truncated or malformed files
        _fail(path, f"cannot read it as GGUF ({exc.__class__.__name__}: {str(exc)[:200]})")
    arch = _field(reader, "general.architecture")
    if arch != ARCHITECTURE:
        _fail(path, f"general.architecture is {arch!r}, not {ARCHITECTURE!r}: not a control vector")
    vectors: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        match = _DIRECTION.fullmatch(tensor.name)
        if match is None:
            _fail(path, f"unexpected tensor {tensor.name!r}; a control vector holds only direction.<layer>")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            _fail(path, f"tensor {tensor.name} has type {tensor.tensor_type.name}; control vectors are F32")
        data = np.asarray(tensor.data)
        if data.ndim != 1:
            _fail(path, f"tensor {tensor.name} has shape {list(data.shape)}; expected one vector")
        vectors[int(match.group(1))] = torch.from_numpy(data.astype(np.float32, copy=True))
    count = _field(reader, f"{ARCHITECTURE}.layer_count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count != len(vectors)):
        _fail(path, f"{ARCHITECTURE}.layer_count is {count} but the file holds {len(vectors)} direction tensors")
    return vectors


def read_gguf_control_vector(path: str | Path, *, operator: str | None = None) -> Intervention:
    """An intervention adding each ``direction.L`` to block L's output (scale = repeng's ``coeff``)."""
    path = Path(path)
    return per_layer_intervention(read_gguf_vectors(path), source_format="gguf", operator=operator,
                                  file_name=path.name)
