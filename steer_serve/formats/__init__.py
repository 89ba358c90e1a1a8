"""Reading interventions from any supported source, and describing them.

``load_intervention`` is the one entry point the CLI, the registry and the API use: it finds
the source (a local directory or file, or a hub id ``org/name[@revision]``), detects its
format, dispatches to the format's reader, applies overrides and validates the result.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..interventions import get_family
from ..interventions.base import Intervention
from .errors import InterventionFormatError
from .caa import read_caa
from .control_vectors import SUFFIXES as VECTOR_SUFFIXES, check_operator
from .gguf_control import read_gguf_control_vector
from .hub import download_from_hub, looks_like_hub_id, split_hub_id
from .native import CONFIG_FILE as NATIVE_CONFIG, dtype_name, read_native
from .peft_ia3 import SOURCE_FORMAT as PEFT_IA3, read_peft_ia3_dir
from .pyreft import read_pyreft_dir
from .pyvene import read_pyvene_dir
from .sources import read_json, resolve_local_source
from .steering_vectors_file import SavedSteeringVector, load_torch_file, read_steering_vector
from .validation import MAX_PLACEMENTS, MAX_RANK, validate_intervention

FORMATS = ("native", "pyreft", "pyvene", "gift", PEFT_IA3, "gguf", "steering_vectors", "caa")
#: Formats that are one control-vector file rather than a directory.
VECTOR_FORMATS = ("gguf", "steering_vectors", "caa")
_CONFIG_NAMES = (NATIVE_CONFIG, "config.json", "adapter_config.json")

__all__ = ["FORMATS", "InterventionFormatError", "describe_intervention", "detect_format", "load_intervention",
           "locate_source", "validate_intervention"]


def _directory(path: Path) -> Path:
    if path.is_file() and path.name in _CONFIG_NAMES:
        return path.parent
    if path.is_file() and path.suffix in VECTOR_SUFFIXES:
        return path
    if not path.is_dir():
        raise InterventionFormatError(f"{path.name!r} is not an intervention directory (or its "
                                      f"{' / '.join(_CONFIG_NAMES)}) nor a control-vector file "
                                      f"({' / '.join(VECTOR_SUFFIXES)})", param="source", code="unknown_format")
    return path


def _file_format(path: Path) -> str:
    if path.suffix == ".gguf":
        return "gguf"
    if path.suffix == ".safetensors":
        return "caa"
    return "steering_vectors" if isinstance(load_torch_file(path), SavedSteeringVector) else "caa"


def detect_format(path: str | os.PathLike) -> str:
    """The format of an intervention directory (``"native"``, ``"pyreft"``, ``"pyvene"``, ``"gift"``,
    ``"peft_ia3"``) or control-vector file (``"gguf"``, ``"steering_vectors"``, ``"caa"``)."""
    directory = _directory(Path(path))
    if directory.is_file():
        return _file_format(directory)
    if (directory / NATIVE_CONFIG).is_file():
        return "native"
    if (directory / "adapter_config.json").is_file():
        cfg = read_json(directory / "adapter_config.json")
        peft_type = str(cfg.get("peft_type", "")) if isinstance(cfg, dict) else ""
        if peft_type.upper() in ("WEGEFT", "GIFT"):
            return "gift"
        if peft_type.upper() == "IA3":
            return PEFT_IA3
        raise InterventionFormatError(f"{directory.name} is a PEFT {peft_type or 'adapter'} directory, which changes "
                                      "weights rather than hidden states; it is not an intervention",
                                      param="source", code="unknown_format")
    if (directory / "config.json").is_file():
        cfg = read_json(directory / "config.json")
        types = (cfg.get("intervention_types") or cfg.get("intervenable_interventions_type")) \
            if isinstance(cfg, dict) else None
        if isinstance(types, list) and types:
            return "pyreft" if any("pyreft" in str(t) for t in types) else "pyvene"
        if isinstance(cfg, dict) and "representations" in cfg:
            return "pyvene"
    raise InterventionFormatError(f"cannot tell the format of {directory.name!r}: expected {NATIVE_CONFIG} (native), "
                                  "config.json + intkey_*.bin (pyreft/pyvene) or adapter_config.json (GIFT, PEFT IA3)",
                                  param="source", code="unknown_format")


def _is_local(source: str, allowed_dirs) -> bool:
    path = Path(source).expanduser()
    if path.is_absolute() or allowed_dirs is None:
        return path.is_absolute() or os.path.lexists(path)
    return any(os.path.lexists(Path(d).expanduser() / path) for d in allowed_dirs)


def _locate(source, allowed_dirs, allow_hub: bool, hub_cache_dir) -> Path:
    text = os.fspath(source)
    if _is_local(text, allowed_dirs) or not looks_like_hub_id(text):
        if allowed_dirs is None:
            path = Path(text).expanduser()
            if not path.exists():
                raise InterventionFormatError(f"intervention source {text!r} does not exist", param="source",
                                              code="source_not_found")
            return _directory(path.resolve())
        path = resolve_local_source(text, allowed_dirs)
        directory = _directory(path)
        return directory if directory == path else resolve_local_source(directory, allowed_dirs)
    if not allow_hub:
        raise InterventionFormatError(f"intervention source {text!r} is not a local path and hub downloads are "
                                      "disabled on this server", param="source", code="source_not_found")
    repo_id, revision = split_hub_id(text)
    return download_from_hub(repo_id, revision, cache_dir=hub_cache_dir)


def locate_source(source: str | os.PathLike, *, allowed_dirs=None, allow_hub: bool = True, hub_cache_dir=None) -> Path:
    """The local directory behind ``source`` (checked against ``allowed_dirs``; hub ids downloaded)."""
    return _locate(source, allowed_dirs, allow_hub, hub_cache_dir)


def _read_vectors(path: Path, fmt: str, operator) -> Intervention:
    if not path.is_file():
        raise InterventionFormatError(f"format {fmt!r} is one control-vector file, but {path.name!r} is a directory",
                                      param="format", code="unknown_format")
    if fmt == "gguf":
        return read_gguf_control_vector(path, operator=operator)
    if path.suffix == ".safetensors":
        if fmt == "steering_vectors":
            raise InterventionFormatError(f"{path.name}: a steering-vectors file is a torch.save'd .pt, not "
                                          "safetensors", param="format", code="unknown_format")
        return read_caa(path, operator=operator)
    loaded = load_torch_file(path)
    reader = read_steering_vector if fmt == "steering_vectors" else read_caa
    return reader(path, operator=operator, loaded=loaded)


def _read(directory: Path, fmt: str, positions, act_fn, hidden_size, head, num_heads, widths, heads,
          operator) -> Intervention:
    if fmt in VECTOR_FORMATS:
        if act_fn is not None:
            raise InterventionFormatError(f"act_fn applies to pyreft and native sources, not to a {fmt} control "
                                          "vector", param="act_fn", code="invalid_intervention")
        return _read_vectors(directory, fmt, operator)
    if operator is not None:
        raise InterventionFormatError(f"operator applies to control-vector files ({', '.join(VECTOR_FORMATS)}), "
                                      f"not to a {fmt} source", param="operator", code="unknown_operator")
    if directory.is_file():
        raise InterventionFormatError(f"format {fmt!r} is a directory, but {directory.name!r} is a file",
                                      param="format", code="unknown_format")
    if fmt == "native":
        iv = read_native(directory)
        if act_fn is not None:
            for edit in iv.edits:
                if "act_fn" in get_family(edit.family).saved_config:
                    edit.config["act_fn"] = act_fn
        return iv
    if fmt == "pyreft":
        return read_pyreft_dir(directory, positions=positions, act_fn=act_fn, hidden_size=hidden_size, head=head,
                               num_heads=num_heads, widths=widths, heads=heads)
    if fmt == "pyvene":
        return read_pyvene_dir(directory, positions=positions, hidden_size=hidden_size, head=head,
                               num_heads=num_heads, widths=widths, heads=heads)
    if fmt == PEFT_IA3:
        return read_peft_ia3_dir(directory, hidden_size=hidden_size)
    if fmt == "gift":
        raise InterventionFormatError("GIFT checkpoints change weights, not hidden states: convert them to a PEFT "
                                      "LoRA directory with steer_serve.formats.gift.convert_gift_dir (it needs the "
                                      "base model's weights) and serve that through the LoRA path",
                                      param="source", code="weight_delta_format")
    raise InterventionFormatError(f"unknown format {fmt!r}; expected auto or one of {', '.join(FORMATS)}",
                                  param="format", code="unknown_format")


def load_intervention(source: str | os.PathLike, *, format: str = "auto", allowed_dirs=None, positions=None,
                      act_fn=None, scale=None, hidden_size=None, num_layers=None, head=None, num_heads=None,
                      widths=None, heads=None, operator=None,
                      max_rank: int = MAX_RANK, max_placements: int = MAX_PLACEMENTS, allowed_families=None,
                      allow_hub: bool = True, hub_cache_dir=None) -> Intervention:
    """Load, override and validate an intervention from a local path or a hub id.

    With ``allowed_dirs`` a local source must lie inside them (see ``resolve_local_source``).
    ``positions``/``scale``/``act_fn`` override what the source says; ``hidden_size`` and
    ``num_layers`` describe the base model and are checked against the intervention.
    ``head``/``num_heads`` place pyreft/pyvene per-head interventions, whose save dirs do not
    record the head. ``widths``/``heads`` give the base model's width and head count per component
    (``engine.architectures.component_geometry``) for components not ``hidden_size`` wide.
    ``operator`` (control-vector files only) is steering-vectors' operator (``control_vectors``).
    """
    directory = _locate(source, allowed_dirs, allow_hub, hub_cache_dir)
    fmt = detect_format(directory) if format == "auto" else format
    if operator is not None:
        check_operator(operator)
    iv = _read(directory, fmt, positions, act_fn, hidden_size, head, num_heads, widths, heads, operator)
    if positions is not None:
        iv.positions = str(positions)
    if scale is not None:
        iv.scale = float(scale)
    return validate_intervention(iv, hidden_size=hidden_size, num_layers=num_layers, max_rank=max_rank,
                                 max_placements=max_placements, allowed_families=allowed_families)


def describe_intervention(iv: Intervention) -> dict:
    """A JSON-ready summary: families, placements, parameter shapes and count, positions, scale."""
    edits = []
    for edit in iv.edits:
        p = edit.placement
        edits.append({
            "family": edit.family,
            "placement": {"layer": p.layer, "component": p.component, "head": p.head},
            "params": {name: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for name, t in edit.params.items()},
            "num_parameters": sum(t.numel() for t in edit.params.values()),
            "config": edit.config,
            "window": edit.window,
            "width": iv.edit_width(edit),
        })
    return {
        "families": sorted({e.family for e in iv.edits}),
        "num_edits": len(iv.edits),
        "layers": sorted({e.placement.layer for e in iv.edits}),
        "num_parameters": iv.num_parameters(),
        "positions": iv.positions,
        "scale": iv.scale,
        "hidden_size": iv.hidden_size,
        "dtype": iv.dtype,
        "base_model": iv.base_model,
        "source_format": iv.source_format,
        "edits": edits,
    }
