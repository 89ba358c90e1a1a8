"""Checks that an :class:`Intervention` is safe and servable on a given base model.

Every loaded intervention passes through :func:`validate_intervention` before it is registered.
Checks run cheapest first (counts and shapes before any tensor is scanned or any family code
runs), so hostile inputs such as 10 000 placements or a rank of 100 000 fail fast. Each error is
an :class:`InterventionFormatError` whose message names the edit, the parameter and the numbers,
and whose ``param`` points at the offending field (``edits[3].rotate_layer``).
"""
from __future__ import annotations

import math

import torch

from .. import interventions
from ..interventions.base import Edit, Intervention
from ..interventions.positions import parse_positions
from .errors import InterventionFormatError

#: Default upper bound on an edit's rank (the ``r`` of its generic low-rank form).
MAX_RANK = 64
#: Default upper bound on the number of edits (placements) in one intervention.
MAX_PLACEMENTS = 1024
#: Largest hidden size accepted (bounds what a family may allocate from config alone).
MAX_HIDDEN_SIZE = 1 << 16
#: Tensor dtypes an edit's parameters may have.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: Values accepted for ``Intervention.dtype`` (the dtype the edit computes in).
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


def _edit_name(i: int, edit: Edit) -> str:
    p = edit.placement
    head = f" head {p.head}" if p.head is not None else ""
    return f"edit {i} ({edit.family} at layer {p.layer} {p.component}{head})"


def _fail(message: str, param: str, code: str = "invalid_intervention"):
    raise InterventionFormatError(message, param=param, code=code)


def _check_header(iv: Intervention, hidden_size, max_placements) -> None:
    if isinstance(iv.hidden_size, bool) or not isinstance(iv.hidden_size, int) or not 0 < iv.hidden_size <= MAX_HIDDEN_SIZE:
        _fail(f"hidden_size must be an integer in [1, {MAX_HIDDEN_SIZE}], got {iv.hidden_size!r}", "hidden_size")
    if hidden_size is not None and iv.hidden_size != hidden_size:
        _fail(f"hidden size mismatch: the intervention was built for hidden size {iv.hidden_size} "
              f"but the base model has hidden size {hidden_size}", "hidden_size", "hidden_size_mismatch")
    if not iv.edits:
        _fail("the intervention has no edits", "edits")
    if len(iv.edits) > max_placements:
        _fail(f"the intervention has {len(iv.edits)} placements, above the limit of {max_placements}",
              "edits", "too_many_placements")
    try:
        parse_positions(iv.positions)
    except ValueError as exc:
        _fail(str(exc), "positions")
    if isinstance(iv.scale, bool) or not isinstance(iv.scale, (int, float)) or not math.isfinite(iv.scale):
        _fail(f"scale must be a finite number, got {iv.scale!r}", "scale")
    if iv.dtype not in COMPUTE_DTYPES:
        _fail(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {iv.dtype!r}", "dtype")


def _check_tensors(i: int, edit: Edit, width: int, num_layers, max_rank: int) -> None:
    where = _edit_name(i, edit)
    if num_layers is not None and edit.placement.layer >= num_layers:
        _fail(f"{where}: layer {edit.placement.layer} is out of range; the base model has {num_layers} layers "
              f"(0..{num_layers - 1})", f"edits[{i}].placement.layer", "layer_out_of_range")
    if not isinstance(edit.params, dict):
        _fail(f"{where}: params must be a dict of named tensors", f"edits[{i}].params")
    if isinstance(edit.width, bool) or not (edit.width is None or isinstance(edit.width, int) and
                                             0 < edit.width <= MAX_HIDDEN_SIZE):
        _fail(f"{where}: width must be an integer in [1, {MAX_HIDDEN_SIZE}] or absent, got {edit.width!r}",
              f"edits[{i}].width")
    widest = max(width, max_rank)
    for name, t in edit.params.items():
        param = f"edits[{i}].{name}"
        if not isinstance(t, torch.Tensor):
            _fail(f"{where}: param {name!r} is a {type(t).__name__}, not a tensor", param, "invalid_dtype")
        if t.dtype not in FLOAT_DTYPES:
            _fail(f"{where}: param {name!r} has dtype {str(t.dtype).removeprefix('torch.')}; expected a floating "
                  "dtype (float32, float16, bfloat16 or float64)", param, "invalid_dtype")
        if any(dim > widest for dim in t.shape):
            _fail(f"{where}: param {name!r} has shape {tuple(t.shape)}: dimension {max(t.shape)} exceeds both the "
                  f"component width {width} and the rank limit {max_rank}", param, "rank_too_large")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            _fail(f"{where}: param {name!r} holds {bad} NaN/Inf value(s)", param, "non_finite")


def _check_family(i: int, edit: Edit, width: int, max_rank: int, allowed_families) -> None:
    where = _edit_name(i, edit)
    if allowed_families is not None and edit.family not in allowed_families:
        _fail(f"{where}: family {edit.family!r} is not allowed on this server "
              f"(allowed: {', '.join(sorted(allowed_families))})", f"edits[{i}].family", "unknown_family")
    if edit.family not in interventions.FAMILIES:
        _fail(f"{where}: unknown family {edit.family!r}; known: {', '.join(sorted(interventions.FAMILIES))}",
              f"edits[{i}].family", "unknown_family")
    family = interventions.get_family(edit.family)
    config = interventions.edit_config(edit)
    try:
        family.validate(edit.params, config, width)
        rank = family.to_lowrank(edit.params, config).rank
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, NotImplementedError) as exc:
        param = getattr(exc, "param", None) or f"edits[{i}]"
        _fail(f"{where}: {exc}", param)
    if rank > max_rank:
        _fail(f"{where}: rank {rank} is above the limit of {max_rank}", f"edits[{i}]", "rank_too_large")


def validate_intervention(iv: Intervention, *, hidden_size: int | None = None, num_layers: int | None = None,
                          max_rank: int = MAX_RANK, max_placements: int = MAX_PLACEMENTS,
                          allowed_families=None) -> Intervention:
    """Raise :class:`InterventionFormatError` unless ``iv`` can be served; returns ``iv``.

    ``hidden_size``/``num_layers`` describe the base model (``None`` skips those checks).
    ``allowed_families`` (names) restricts families further than the registry does.
    """
    _check_header(iv, hidden_size, max_placements)
    for i, edit in enumerate(iv.edits):
        _check_tensors(i, edit, iv.edit_width(edit), num_layers, max_rank)
    for i, edit in enumerate(iv.edits):
        _check_family(i, edit, iv.edit_width(edit), max_rank, allowed_families)
    return iv
