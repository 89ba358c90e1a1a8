"""pyvene save directories (``IntervenableModel.save``): ``config.json`` + ``intkey_<key>.bin``.

pyreft saves through the same code, so this module holds the shared reader and
:mod:`.pyreft` only adds pyreft's defaults. What a directory holds:

* ``config.json``: ``representations`` (pyvene ``RepresentationConfig`` tuples, written as JSON
  lists or dicts: layer, component, unit, max_number_of_units, low_rank_dimension, ...),
  ``intervention_types`` (``"<class 'pyreft.interventions.LoreftIntervention'>"``),
  ``intervention_dimensions`` (each intervention's ``interchange_dim``) and ``sorted_keys``. A
  representation's ``subspace_partition`` is kept, expanded as pyvene expands it, in the edit's config:
  a request's ``subspaces`` then index its groups, as they do in pyvene.
* ``intkey_<key>.bin`` per intervention (``torch.save`` of its ``state_dict``), absent for
  interventions with nothing to save (``ZeroIntervention``). Keys are
  ``layer_<L>_comp_<component>_unit_<unit>_nunit_<n>#<i>`` since pyvene 0.1.8 and
  ``layer.<L>.comp.<component>.unit.<unit>.nunit.<n>#<i>`` before; both are read, and the
  placement (layer, component) is parsed from the key. A string-addressed component
  (``"component": "model.layers[15].mlp.output"``, key ``comp_model_layers[15]_mlp_output_...``)
  is resolved to the same placement by :mod:`.module_paths`.

Checkpoints are opened with ``torch.load(weights_only=True)`` only. Orthogonally parametrized
weights (``rotate_layer.parametrizations.weight.original`` + ``...0.base``) are resolved with
torch's own ``orthogonal`` parametrization, the very code pyreft/pyvene run. Tensors keep their
saved dtypes (pyreft's bf16 ``learned_source`` next to an fp32 ``rotate_layer``).

pyvene does not store which head a ``head_*`` intervention acts on (heads are chosen per call):
pass ``head=``. Its width ``head_dim`` is the intervention's ``embed_dim``. ``widths`` / ``heads``
(per component, from the base model's config: ``engine.architectures.component_geometry``) give
each component's width and head count; without them every component is assumed ``hidden_size``
wide with ``num_heads`` heads (Llama's multi-head layout).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..interventions import LIBRARY_CLASSES, edit_config, get_family
from ..interventions.family import Family
from ..interventions.base import COMPONENTS, HEAD_COMPONENTS, RESIDUAL_COMPONENTS, Edit, Intervention, Placement
from .errors import InterventionFormatError
from .module_paths import is_module_path, resolve_module_path
from .sources import read_json, safe_torch_load

_NEW_KEY = re.compile(r"^layer_(?P<layer>\d+)_comp_(?P<comp>.+?)_unit_(?P<unit>.+)_nunit_(?P<n>\d+)#(?P<i>\d+)$")
_OLD_KEY = re.compile(r"^layer\.(?P<layer>\d+)\.comp\.(?P<comp>.+?)\.unit\.(?P<unit>.+)\.nunit\.(?P<n>\d+)#(?P<i>\d+)$")
_REPR_FIELDS = ("layer", "component", "unit", "max_number_of_units", "low_rank_dimension", "intervention_type",
                "intervention", "subspace_partition")

#: State-dict entries that describe, rather than parametrize, an intervention.
_BOOKKEEPING = ("embed_dim", "interchange_dim")


def _fail(message: str, param: str | None = None, code: str = "invalid_pyvene_dir"):
    raise InterventionFormatError(message, param=param, code=code)


def _plain_key(key) -> bool:
    """A key that names a file inside the save directory (no separators, no '..')."""
    return isinstance(key, str) and "/" not in key and "\\" not in key and ".." not in key


def _state_dict(path: Path) -> dict:
    """A saved intervention's entries: tensors, plus integer bookkeeping such as ``embed_dim``."""
    sd = safe_torch_load(path)
    if not isinstance(sd, dict):
        _fail(f"{path.name} holds a {type(sd).__name__}, not a state dict", param=path.name)
    bad = sorted(str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor) and k not in _BOOKKEEPING)
    if bad:
        _fail(f"{path.name}: entries {bad[:5]} are not tensors", param=path.name)
    return dict(sd)


def parse_key(key: str) -> tuple[int, str, str]:
    """``(layer, component, unit)`` of an intervention key in either pyvene scheme."""
    m = isinstance(key, str) and (_NEW_KEY.match(key) or _OLD_KEY.match(key))
    if not m:
        _fail(f"cannot parse intervention key {key!r}: expected layer_<L>_comp_<component>_unit_<unit>_nunit_<n>#<i> "
              "(or the older layer.<L>.comp.<component>... form)", param="sorted_keys")
    return int(m["layer"]), m["comp"], m["unit"].replace("_", ".")


def resolve_orthogonal(original: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The weight torch's ``orthogonal`` parametrization computes from its saved internals.

    Builds a throw-away module with the same parametrization (default map for the shape, as
    pyreft/pyvene use it) and loads ``original``/``base`` into it, so the result is bit-for-bit
    what the library saw. The module's own initialization draws random numbers: the global RNG
    is left untouched.
    """
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(torch.eye(*original.shape, dtype=original.dtype))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.nn.utils.parametrizations.orthogonal(holder)
        holder.load_state_dict({"parametrizations.weight.original": original, "parametrizations.weight.0.base": base})
        return holder.weight.detach().clone()


def _rotate(sd: dict, name: str, where: str) -> torch.Tensor:
    """``name``'s weight from any of the ways pyreft/pyvene save a rotation (entries are popped)."""
    if name in sd:  # LoReFT's own state_dict: already resolved
        return sd.pop(name)
    if f"{name}.weight" in sd:  # an unparametrized layer
        return sd.pop(f"{name}.weight")
    original = sd.pop(f"{name}.parametrizations.weight.original", None)
    base = sd.pop(f"{name}.parametrizations.weight.0.base", None)
    if original is None or base is None:
        _fail(f"{where}: no {name} weight (expected {name!r} or the orthogonal parametrization's "
              f"'{name}.parametrizations.weight.original' and '...weight.0.base')", param=where)
    n = max(original.shape, default=0)
    if original.ndim != 2 or tuple(base.shape) != (n, n) or not original.is_floating_point():
        _fail(f"{where}: orthogonal parametrization shapes {list(original.shape)} / base {list(base.shape)} "
              f"do not fit (a floating {n}x{n} base for a 2-d original)", param=where)
    try:
        return resolve_orthogonal(original, base)
    except (RuntimeError, TypeError, ValueError) as exc:
        _fail(f"{where}: cannot resolve the orthogonal parametrization: {exc}", param=where)


def _vector(t: torch.Tensor, where: str) -> torch.Tensor:
    """A stored source representation as one ``[d]`` vector (pyvene broadcasts it over tokens)."""
    if t.ndim > 1 and all(s == 1 for s in t.shape[:-1]):
        t = t.reshape(t.shape[-1])
    if t.ndim != 1:
        _fail(f"{where}: the stored source_representation has shape {list(t.shape)}; only one vector "
              "broadcast over every token can be served", param=where)
    return t


def _params(family: Family, sd: dict, where: str, source: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Map a state dict onto the family's parameter names, as the family declares (``Family.saved``);
    entries used are removed from ``sd``."""
    params: dict[str, torch.Tensor] = {}
    for name, saved in family.saved.items():
        key = next((k for k in saved.keys if k in sd), None)
        if saved.kind == "rotation":
            params[name] = _rotate(sd, saved.keys[0], where)
        elif saved.kind == "source":
            stored = sd.pop(key) if key else source
            if stored is not None:   # else: an interchange whose source each request gives (see _source_from_request)
                params[name] = _vector(stored, where)
        elif key is not None:
            params[name] = sd.pop(key)
        elif not saved.optional:
            _fail(f"{where}: missing tensor {saved.keys[0]!r} (found {sorted(sd)})", param=where)
    unused = {k: sd.pop(k) for k in family.saved_unused if k in sd}
    try:
        family.check_saved(unused, params)
    except ValueError as exc:
        _fail(f"{where}: {exc}", param=where)
    return params


def _source_from_request(family: Family, params: dict, width: int) -> dict:
    """An interchange saved without a source representation (as pyvene saves a trained DAS): its source
    is a zero vector here, and ``config["source"] = "request"`` makes every request give one (the source
    run's representation at the same site)."""
    missing = [name for name, saved in family.saved.items() if saved.kind == "source" and name not in params]
    for name in missing:
        params[name] = torch.zeros(width)
    return {"source": "request"} if missing else {}


def _representations(cfg: dict) -> list[dict]:
    reps = cfg.get("representations", cfg.get("intervenable_representations"))
    if not isinstance(reps, list) or not reps:
        _fail("config.json has no 'representations' list", param="config.json")
    out = []
    for i, rep in enumerate(reps):
        if isinstance(rep, list):
            rep = dict(zip(_REPR_FIELDS, rep))
        if not isinstance(rep, dict):
            _fail(f"config.json: representations[{i}] is neither a list nor an object", param="config.json")
        out.append(rep)
    return out


def _family_of(type_str, i: int) -> Family:
    name = str(type_str).replace("<class '", "").replace("'>", "").rsplit(".", 1)[-1]
    if name not in LIBRARY_CLASSES:
        _fail(f"intervention {i} is a {name!r}, which steer-serve cannot serve; supported: "
              f"{', '.join(LIBRARY_CLASSES)}", param=f"intervention_types[{i}]", code="unsupported_family")
    return LIBRARY_CLASSES[name]


def _candidate_keys(rep: dict, counters: dict) -> list[str]:
    """The keys pyvene (new and old scheme) gives this representation, in config order."""
    layer, comp = rep.get("layer", 0), rep.get("component", "block_output")
    unit, n = rep.get("unit", "pos"), rep.get("max_number_of_units", 1)
    new = f"comp_{comp}_unit_{unit}_nunit_{n}".replace(".", "_")
    old = f"comp.{comp}.unit.{unit}.nunit.{n}"
    if not is_module_path(comp):  # pyvene prefixes the layer only for named components
        new, old = f"layer_{layer}_{new}", f"layer.{layer}.{old}"
    i = counters[new] = counters.get(new, -1) + 1
    return [f"{new}#{i}", f"{old}#{i}"]


def read_intervention_dir(path: str | os.PathLike, *, source_format: str, positions: str, act_fn: str | None = None,
                          hidden_size: int | None = None, head: int | None = None, num_heads: int | None = None,
                          widths: dict | None = None, heads: dict | None = None,
                          source: torch.Tensor | None = None) -> Intervention:
    """Read a pyvene/pyreft save directory into an :class:`Intervention` (see the module docstring)."""
    directory = Path(path)
    cfg = read_json(directory / "config.json")
    if not isinstance(cfg, dict):
        _fail("config.json is not a JSON object", param="config.json")
    reps = _representations(cfg)
    types = cfg.get("intervention_types", cfg.get("intervenable_interventions_type"))
    if not isinstance(types, list) or len(types) != len(reps):
        _fail(f"config.json: intervention_types must list one class per representation ({len(reps)})",
              param="config.json")
    dims = cfg.get("intervention_dimensions") or [None] * len(reps)
    sorted_keys = cfg.get("sorted_keys") or []
    if not isinstance(dims, list) or not isinstance(sorted_keys, list):
        _fail("config.json: intervention_dimensions and sorted_keys must be lists", param="config.json")
    counters: dict = {}
    edits, edit_widths = [], []
    for i, (rep, type_str) in enumerate(zip(reps, types)):
        fam = _family_of(type_str, i)
        family = fam.name
        keys = ([sorted_keys[i]] if i < len(sorted_keys) else []) + _candidate_keys(rep, counters)
        found = next((k for k in keys if _plain_key(k) and (directory / f"intkey_{k}.bin").is_file()), None)
        if found is None and any(saved.kind != "source" for saved in fam.saved.values()):
            _fail(f"missing weights of intervention {i} ({family}): none of "
                  f"{', '.join(f'intkey_{k}.bin' for k in dict.fromkeys(keys))}", param=f"intkey_{keys[0]}.bin",
                  code="missing_file")
        key = found or keys[0]
        where = f"intkey_{key}.bin"
        sd = _state_dict(directory / where) if found else {}
        component = rep.get("component")
        layer, component = resolve_module_path(component, param=f"representations[{i}].component") \
            if is_module_path(component) else parse_key(key)[:2]
        base = component.removeprefix("head_")
        if base not in COMPONENTS or (base != component and base not in HEAD_COMPONENTS):
            _fail(f"{where}: component {component!r} is not servable; supported: {', '.join(COMPONENTS)} "
                  f"(and head_ forms of {', '.join(HEAD_COMPONENTS)})", param=where, code="unsupported_component")
        model_width = (widths or {}).get(base, hidden_size)
        params = _params(fam, sd, where, source)
        embed_dim = sd.pop("embed_dim", None)
        leftover = sorted(str(k) for k in sd if k not in _BOOKKEEPING)
        if leftover:
            _fail(f"{where}: unexpected tensors {leftover} for a {family} intervention", param=where)
        model_heads = (heads or {}).get(base, num_heads)
        width = _width(params, embed_dim, model_width, component, model_heads, where)
        config: dict = _source_from_request(fam, params, width)
        if "act_fn" in fam.saved_config and act_fn:
            config["act_fn"] = act_fn
        if "interchange_dim" in fam.saved_config and i < len(dims) and dims[i] is not None:
            if not isinstance(dims[i], int):
                _fail(f"intervention_dimensions[{i}] = {dims[i]!r}: only an integer interchange_dim can be served",
                      param="config.json")
            if dims[i] != width:
                config["interchange_dim"] = dims[i]
        if rep.get("subspace_partition") is not None:
            config["subspace_partition"] = _partition(rep["subspace_partition"], fam, i)
        if "width" in fam.saved_config:
            config["width"] = width
        component_width, placement_head = width, None
        if component.startswith("head_"):
            if head is None:
                _fail(f"{where}: a {component} intervention acts on heads chosen at call time; pass head=",
                      param="head", code="missing_head")
            count = model_width // width if model_width else model_heads
            if not count:
                _fail(f"{where}: placing a per-head intervention needs hidden_size= or num_heads=",
                      param="hidden_size", code="missing_hidden_size")
            placement_head, component_width = head, width * count
            config.update(head_dim=width, num_heads=count)
        if model_width and component_width != model_width:
            _fail(f"{where}: hidden size mismatch: the intervention acts on {component_width} columns but "
                  f"the base model's {base} is {model_width} wide", param="hidden_size", code="hidden_size_mismatch")
        try:
            edit = Edit(family, Placement(layer, component, placement_head), params, config)
            get_family(family).validate(params, edit_config(edit), component_width)
        except (ValueError, TypeError, IndexError, RuntimeError) as exc:
            _fail(f"{where}: {exc}", param=f"edits[{i}]")
        edits.append(edit)
        edit_widths.append(component_width)
    return _with_widths(edits, edit_widths, hidden_size, positions, source_format)


def _partition(partition, family: Family, i: int) -> list[list[int]]:
    """pyvene's expansion of ``subspace_partition``: a pair of integers ``[a, b]`` is ``range(a, b)``, any other
    group lists its dimensions."""
    param = f"representations[{i}].subspace_partition"
    if not family.takes_subspaces:
        _fail(f"config.json: {param} is set, but pyvene ignores subspaces on {family.name}", param=param)
    if not isinstance(partition, list) or not all(isinstance(g, list) and g and all(type(d) is int for d in g)
                                                  for g in partition):
        _fail(f"config.json: {param} must list groups of integer dimensions", param=param)
    return [list(range(g[0], g[1])) if len(g) == 2 else g for g in partition]


def _with_widths(edits: list[Edit], edit_widths: list[int], hidden_size: int | None, positions: str,
                 source_format: str) -> Intervention:
    """The intervention, ``hidden_size`` wide (the model's, else a residual edit's, else the first edit's);
    edits on components of another width record theirs."""
    residual = [w for e, w in zip(edits, edit_widths) if e.placement.component in RESIDUAL_COMPONENTS]
    hidden = hidden_size or (residual or edit_widths)[0]
    for edit, width in zip(edits, edit_widths):
        edit.width = width if width != hidden else None
    return Intervention(edits=edits, hidden_size=hidden, positions=positions, source_format=source_format)


#: Which dimension of a parameter is the width the intervention acts on.
_WIDTH_DIM = {"rotate_layer": 0, "source": 0, "mask": 0, "masks": 0, "weight": 1, "proj_weight": 1}


def _width(params: dict, embed_dim, model_width, component: str, num_heads, where: str) -> int:
    """How many columns the intervention's tensors span (head_dim for per-head components)."""
    for name, dim in _WIDTH_DIM.items():
        if name in params:
            if params[name].ndim <= dim:
                _fail(f"{where}: {name} has shape {list(params[name].shape)}; expected at least {dim + 1} dimensions",
                      param=where)
            return params[name].shape[dim]
    if embed_dim is not None:
        try:
            return int(embed_dim)
        except (TypeError, ValueError, RuntimeError):
            _fail(f"{where}: embed_dim {embed_dim!r} is not an integer", param=where)
    if model_width and not component.startswith("head_"):
        return model_width
    if model_width and num_heads:
        return model_width // num_heads
    _fail(f"{where}: the intervention stores no tensor to tell its width; pass hidden_size=", param="hidden_size",
          code="missing_hidden_size")


def read_pyvene_dir(path: str | os.PathLike, *, positions: str | None = None, hidden_size: int | None = None,
                    head: int | None = None, num_heads: int | None = None, widths: dict | None = None,
                    heads: dict | None = None, source: torch.Tensor | None = None) -> Intervention:
    """Read a pyvene ``IntervenableModel.save`` directory.

    ``positions`` defaults to ``"all"`` (pyvene's generate, without ``intervene_on_prompt``,
    intervenes on every token). ``source`` supplies the source representation for interchange
    interventions saved without one. ``head`` (and ``num_heads`` when ``hidden_size`` is not
    given) place ``head_*`` interventions.
    """
    return read_intervention_dir(path, source_format="pyvene", positions=positions or "all", hidden_size=hidden_size,
                                 head=head, num_heads=num_heads, widths=widths, heads=heads, source=source)
