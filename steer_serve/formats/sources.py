"""Reading untrusted intervention files safely.

Every loader goes through these helpers, so the rules hold for all formats:

* a local source must lie inside one of the allowed directories once symlinks and ``..`` are
  resolved, and so must every file inside a source directory;
* files have size limits (weights, JSON);
* pickled checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain
  containers only, never arbitrary Python objects;
* every failure is an :class:`InterventionFormatError` naming the file.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import InterventionFormatError

#: Largest weight file (safetensors or torch checkpoint) a loader will open.
MAX_WEIGHTS_BYTES = 2 << 30
#: Largest JSON file (configs, metadata) a loader will parse.
MAX_JSON_BYTES = 4 << 20
#: Most entries a source directory may hold (files and sub-directories together).
MAX_TREE_ENTRIES = 4096


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def resolve_local_source(path: str | os.PathLike, allowed_dirs: Iterable[str | os.PathLike]) -> Path:
    """Resolve ``path`` and check that it, and everything under it, lies inside ``allowed_dirs``.

    Relative paths are looked up under each allowed directory in turn. Symlinks are resolved
    before the check, so a link (or a file inside a source directory) that points outside the
    allowed directories is rejected, as is any ``..`` that climbs out of them.
    """
    roots = [Path(d).expanduser().resolve() for d in allowed_dirs]
    if not roots:
        raise InterventionFormatError("no directories are allowed for local intervention sources",
                                      param="source", code="source_not_allowed")
    raw = Path(path).expanduser()
    candidates = [raw] if raw.is_absolute() else [root / raw for root in roots]
    found = next((c for c in candidates if os.path.lexists(c)), None)
    if found is None:
        raise InterventionFormatError(f"intervention source {str(path)!r} does not exist",
                                      param="source", code="source_not_found")
    try:
        resolved = found.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise InterventionFormatError(f"intervention source {str(path)!r} cannot be resolved ({exc.__class__.__name__}: "
                                      "a dangling or looping symlink?)", param="source",
                                      code="source_not_found") from exc
    if not _inside(resolved, roots):
        raise InterventionFormatError(f"intervention source {str(path)!r} is outside the allowed directories "
                                      "(symlinks and '..' are resolved before this check)",
                                      param="source", code="source_not_allowed")
    if resolved.is_dir():
        _check_tree(resolved, roots, str(path))
    return resolved


def _check_tree(directory: Path, roots: list[Path], shown: str) -> None:
    count = 0
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        for name in dirnames + filenames:
            count += 1
            if count > MAX_TREE_ENTRIES:
                raise InterventionFormatError(f"intervention source {shown!r} holds more than {MAX_TREE_ENTRIES} "
                                              "entries", param="source", code="source_too_large")
            entry = Path(dirpath) / name
            try:
                target = entry.resolve(strict=True)
            except (OSError, RuntimeError) as exc:
                raise InterventionFormatError(f"{entry.relative_to(directory)} in intervention source {shown!r} "
                                              "is a dangling or looping symlink", param="source",
                                              code="source_not_allowed") from exc
            if not _inside(target, roots):
                raise InterventionFormatError(f"{entry.relative_to(directory)} in intervention source {shown!r} "
                                              "points outside the allowed directories", param="source",
                                              code="source_not_allowed")


def check_file_size(path: str | os.PathLike, max_bytes: int) -> int:
    """Return the size of the regular file ``path``; raise if it is missing or above ``max_bytes``."""
    path = Path(path)
    if not path.is_file():
        raise InterventionFormatError(f"missing file {path.name}", param=path.name, code="missing_file")
    size = path.stat().st_size
    if size > max_bytes:
        raise InterventionFormatError(f"{path.name} is {size} bytes, above the limit of {max_bytes} bytes",
                                      param=path.name, code="file_too_large")
    return size


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES):
    """Parse a JSON file after checking its size; errors name the file."""
    path = Path(path)
    check_file_size(path, max_bytes)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InterventionFormatError(f"{path.name} is not valid JSON: {exc}", param=path.name,
                                      code="invalid_json") from exc


def safe_torch_load(path: str | os.PathLike, *, max_bytes: int = MAX_WEIGHTS_BYTES):
    """Load a torch checkpoint (``.bin``/``.pt``) on CPU, tensors and plain containers only.

    Uses ``torch.load(weights_only=True)``: a pickle that would build any other Python object
    (the way malicious checkpoints run code) is refused before anything executes.
    """
    path = Path(path)
    check_file_size(path, max_bytes)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
        raise InterventionFormatError(f"refusing to unpickle {path.name}: it holds Python objects other than "
                                      f"tensors and plain containers ({reason})", param=path.name,
                                      code="unsafe_pickle") from exc
    except Exception as exc:  # the unpickler fails in many ways on malformed files (struct.error, ...)
        raise InterventionFormatError(f"cannot read {path.name} as a torch checkpoint "
                                      f"({exc.__class__.__name__}: {str(exc)[:200]})", param=path.name,
                                      code="invalid_checkpoint") from exc


def load_safetensors(path: str | os.PathLike, *, max_bytes: int = MAX_WEIGHTS_BYTES) -> dict[str, torch.Tensor]:
    """Load a safetensors file on CPU; truncated or malformed files raise with the file named."""
    path = Path(path)
    check_file_size(path, max_bytes)
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise InterventionFormatError(f"cannot read {path.name} as safetensors ({str(exc)[:200]})",
                                      param=path.name, code="invalid_safetensors") from exc
