"""steer-serve's own format: ``intervention.json`` + ``weights.safetensors`` in one directory.

``intervention.json`` holds everything but the tensors::

    {"format": "steer-serve-intervention", "format_version": 1,
     "base_model": "...", "hidden_size": 576, "dtype": "float32",
     "positions": "f1+l1", "scale": 1.0, "source_format": "pyreft",
     "edits": [{"family": "loreft",
                "placement": {"layer": 15, "component": "block_output", "head": null},
                "config": {...},
                "params": {"rotate_layer": {"shape": [576, 4], "dtype": "float32"}, ...},
                "window": "first"}]}      # optional: half of an f<n>+l<n> window (Edit.window)

``weights.safetensors`` holds tensor ``edits.<i>.<param>`` for every edit ``i``. Tensors keep
their dtype (pyreft's bf16 next to fp32 included), so a round trip is bit-exact. Directories
are written to a temporary sibling and renamed into place, so readers never see a partial one.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..interventions.base import Edit, Intervention, Placement
from ..interventions.positions import WINDOWS
from .atomic import write_directory
from .errors import InterventionFormatError
from .sources import MAX_JSON_BYTES, load_safetensors, read_json

FORMAT_NAME = "steer-serve-intervention"
FORMAT_VERSION = 1
CONFIG_FILE = "intervention.json"
WEIGHTS_FILE = "weights.safetensors"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; any dtype outside :data:`DTYPES` gives its torch name."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _metadata(iv: Intervention) -> dict:
    edits = []
    for i, edit in enumerate(iv.edits):
        for name, tensor in edit.params.items():
            if not isinstance(tensor, torch.Tensor):
                raise InterventionFormatError(f"edit {i} ({edit.family}): param {name!r} is a "
                                              f"{type(tensor).__name__}, not a tensor", param=f"edits[{i}].{name}")
        p = edit.placement
        edits.append({
            "family": edit.family,
            "placement": {"layer": p.layer, "component": p.component, "head": p.head},
            "config": edit.config,
            "params": {name: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for name, t in edit.params.items()},
            **({"window": edit.window} if edit.window else {}),
            **({"width": edit.width} if edit.width else {}),
        })
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "base_model": iv.base_model, "hidden_size": iv.hidden_size, "dtype": iv.dtype,
        "positions": iv.positions, "scale": iv.scale, "source_format": iv.source_format,
        "edits": edits,
    }


def save_native(intervention: Intervention, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``intervention`` as a native directory, atomically; returns the directory.

    An existing directory is replaced only with ``overwrite=True``; if writing fails, whatever
    was there before is left intact and no temporary files remain.
    """
    try:
        text = json.dumps(_metadata(intervention), indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InterventionFormatError(f"intervention metadata is not JSON-serialisable: {exc}",
                                      param="config") from exc
    tensors = {f"edits.{i}.{name}": t.detach().to("cpu").contiguous().clone()
               for i, edit in enumerate(intervention.edits) for name, t in edit.params.items()}

    def fill(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(text, encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})

    return write_directory(directory, fill, overwrite=overwrite)


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}


def _require(obj: dict, key: str, kinds, where: str):
    value = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = " or ".join(_KIND_NAMES[k] for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise InterventionFormatError(f"{CONFIG_FILE}: {where}{key} is missing or not {names}",
                                      param=f"{where}{key}")
    return value


def read_native(directory: str | os.PathLike) -> Intervention:
    """Read a native directory written by :func:`save_native`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InterventionFormatError(f"{directory.name} is not a directory", param="source", code="missing_file")
    meta = read_json(directory / CONFIG_FILE, max_bytes=MAX_JSON_BYTES)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise InterventionFormatError(f"{CONFIG_FILE} is not a steer-serve intervention (format != {FORMAT_NAME!r})",
                                      param="format")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise InterventionFormatError(f"{CONFIG_FILE}: unsupported format_version {version!r} "
                                      f"(this steer-serve reads up to {FORMAT_VERSION})", param="format_version")
    hidden_size = _require(meta, "hidden_size", int, "")
    scale = _require(meta, "scale", (int, float), "")
    if not math.isfinite(scale):
        raise InterventionFormatError(f"{CONFIG_FILE}: scale must be finite, got {scale}", param="scale")
    edits_meta = _require(meta, "edits", list, "")
    tensors = load_safetensors(directory / WEIGHTS_FILE)
    edits, used = [], set()
    for i, em in enumerate(edits_meta):
        where = f"edits[{i}]."
        family = _require(em, "family", str, where)
        pm = _require(em, "placement", dict, where)
        try:
            placement = Placement(layer=_require(pm, "layer", int, where + "placement."),
                                  component=_require(pm, "component", str, where + "placement."),
                                  head=pm.get("head"))
            if placement.head is not None and (isinstance(placement.head, bool) or not isinstance(placement.head, int)):
                raise ValueError(f"head must be an integer or null, got {placement.head!r}")
        except (TypeError, ValueError) as exc:
            raise InterventionFormatError(f"{CONFIG_FILE}: {where}placement: {exc}", param=where + "placement") from exc
        config = em.get("config") or {}
        if not isinstance(config, dict):
            raise InterventionFormatError(f"{CONFIG_FILE}: {where}config must be an object", param=where + "config")
        params = {}
        for name, spec in _require(em, "params", dict, where).items():
            key = f"edits.{i}.{name}"
            if key not in tensors:
                raise InterventionFormatError(f"{WEIGHTS_FILE} lacks tensor {key!r} declared in {CONFIG_FILE}",
                                              param=f"{where}{name}")
            t = tensors[key]
            if isinstance(spec, dict) and (list(t.shape) != spec.get("shape") or dtype_name(t.dtype) != spec.get("dtype")):
                raise InterventionFormatError(f"{key}: stored as {dtype_name(t.dtype)} {list(t.shape)} but "
                                              f"{CONFIG_FILE} declares {spec.get('dtype')} {spec.get('shape')}",
                                              param=f"{where}{name}")
            params[name] = t
            used.add(key)
        window = em.get("window")
        if window is not None and window not in WINDOWS:
            raise InterventionFormatError(f"{CONFIG_FILE}: {where}window must be one of {WINDOWS} or absent, got "
                                          f"{window!r}", param=where + "window")
        width = em.get("width")
        if width is not None and (isinstance(width, bool) or not isinstance(width, int)):
            raise InterventionFormatError(f"{CONFIG_FILE}: {where}width must be an integer or absent, got {width!r}",
                                          param=where + "width")
        edits.append(Edit(family=family, placement=placement, params=params, config=config, window=window,
                          width=width))
    extra = sorted(set(tensors) - used)
    if extra:
        raise InterventionFormatError(f"{WEIGHTS_FILE} holds tensors no edit declares: {', '.join(extra[:5])}",
                                      param="weights")
    return Intervention(edits=edits, hidden_size=hidden_size, positions=str(meta.get("positions", "all")),
                        scale=float(scale), base_model=meta.get("base_model"), dtype=str(meta.get("dtype", "float32")),
                        source_format=str(meta.get("source_format", "native")))
