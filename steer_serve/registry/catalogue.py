"""The catalogue: registered ids and their compiled edits, with the one geometry check.

An entry is one of three kinds behind one small interface: an :class:`InterventionEntry` (compiled
once into per-site low-rank edits, kept on the CPU, one :class:`Part` per device slot; edits acting
on different positions, pyreft's two interventions per layer, are separate parts), an
:class:`AdapterEntry` (a weight-space adapter riding on vLLM's LoRA slots; a DoRA's output scales are
its one part) or a
:class:`PromptEntry` (virtual tokens prepended to the prompt's embeddings, no parts).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from steer_serve.formats.adapters import WeightAdapter
from steer_serve.formats.peft_prompt import PromptAdapter
from steer_serve.interventions import edit_config, get_family
from steer_serve.interventions.base import Intervention, LowRankEdit
from steer_serve.interventions.positions import parse_positions
from steer_serve.registry.errors import RegistryError, not_found

Site = tuple[int, str]
#: Entry kinds whose weights are a directory the server owns (under the store's ``adapters/``).
DIRECTORY_KINDS = ("adapter", "prompt")


@dataclass(eq=False)
class Part:
    """One device slot's worth of an intervention: the site edits of its edits with one ``window``."""

    site_edits: dict[Site, LowRankEdit]
    window: str | None = None
    slot: int | None = None


@dataclass(eq=False)  # identity semantics: entries are hashed into sets of pinned entries
class Entry:
    """What the catalogue, the slot pool and the store need of any registered kind."""

    kind: ClassVar[str]
    id: str
    content_hash: str
    source: str
    format: str
    created: int = field(default_factory=lambda: int(time.time()), kw_only=True)
    refcount: int = field(default=0, kw_only=True)
    last_used: float = field(default=0.0, kw_only=True)
    deleting: bool = field(default=False, kw_only=True)

    @property
    def parts(self) -> list[Part]:
        return []

    @property
    def loaded(self) -> bool:
        return all(part.slot is not None for part in self.parts)

    @property
    def slot(self) -> int | None:
        """The (first) slot the entry is loaded in, or None."""
        return self.parts[0].slot if self.parts and self.loaded else None

    def record(self) -> dict:
        """What the store persists (the weights are stored under ``content_hash``)."""
        return {"id": self.id, "kind": self.kind, "source": self.source, "format": self.format,
                "created": self.created, "weights": self.content_hash}


@dataclass(eq=False)
class InterventionEntry(Entry):
    kind: ClassVar[str] = "intervention"
    intervention: Intervention = field(kw_only=True)
    compiled: list[Part] = field(kw_only=True)

    @property
    def parts(self) -> list[Part]:
        return self.compiled

    @property
    def positions(self) -> str:
        return self.intervention.positions

    @property
    def scale(self) -> float:
        return self.intervention.scale

    def set_defaults(self, *, scale: float | None, positions: str | None) -> None:
        if positions is not None:
            parse_positions(positions)
            self.intervention.positions = positions
        if scale is not None:
            self.intervention.scale = float(scale)

    def details(self) -> dict:
        from steer_serve.formats import describe_intervention

        return describe_intervention(self.intervention)

    def status(self) -> str:
        return "loaded" if self.slot is not None else "cached"

    def record(self) -> dict:
        return {**super().record(), "positions": self.positions, "scale": self.scale}


@dataclass(eq=False)
class AdapterEntry(Entry):
    kind: ClassVar[str] = "adapter"
    adapter: WeightAdapter = field(kw_only=True)
    lora_id: int = field(kw_only=True)     # vLLM's LoRA int id (unique per registered adapter content)
    #: DoRA's output scales, compiled: applied at every position, scale 1, beside the LoRA
    compiled: list[Part] = field(default_factory=list, kw_only=True)
    scale: ClassVar[float] = 1.0
    positions: ClassVar[str] = "all"

    @property
    def parts(self) -> list[Part]:
        return self.compiled

    @property
    def directory(self) -> Path:
        return self.adapter.path

    @property
    def lora(self) -> tuple[str, int, str]:
        """(name, vLLM int id, PEFT dir) for vLLM's LoRA request."""
        return self.id, self.lora_id, str(self.adapter.path)

    def set_defaults(self, *, scale: float | None, positions: str | None) -> None:
        raise RegistryError(f"{self.id!r} is a weight-space adapter: it has no scale or positions")

    def details(self) -> dict:
        return self.adapter.describe()

    def status(self) -> str:
        return "adapter"


@dataclass(eq=False)
class PromptEntry(Entry):
    kind: ClassVar[str] = "prompt"
    prompt: PromptAdapter = field(kw_only=True)

    @property
    def directory(self) -> Path:
        return self.prompt.path

    def set_defaults(self, *, scale: float | None, positions: str | None) -> None:
        raise RegistryError(f"{self.id!r} is a prompt-space adapter (virtual tokens): it has no scale or positions")

    def details(self) -> dict:
        return self.prompt.describe()

    def status(self) -> str:
        return "prompt"


def compile_parts(iv: Intervention, *, widths: dict[str, int], heads: dict[str, int]) -> list[Part]:
    """Turn every edit into the generic low-rank form at its (layer, component) site, one part per window.

    Per-head edits are widened by the family to the component's full width (``widths``; head_dim =
    width / ``heads``), unless the edit's config already says its head layout.
    """
    parts: dict[str | None, Part] = {}
    for edit in iv.edits:
        placement = edit.placement
        config = edit_config(edit)
        if placement.head is not None:
            base = placement.base_component
            width, count = widths.get(base, iv.edit_width(edit)), heads.get(base, 1)
            config = {"head_dim": width // count, "num_heads": count, **config}
        lowrank = get_family(edit.family).to_lowrank(edit.params, config)
        site = (placement.layer, placement.base_component)
        sites = parts.setdefault(edit.window, Part({}, edit.window)).site_edits
        if site in sites:
            raise RegistryError(f"two edits of one intervention act at layer {site[0]} {site[1]} on the same "
                                "positions; register them as separate interventions and combine them per request",
                                param="source")
        sites[site] = lowrank
    return list(parts.values())


def content_hash(parts: list[Part]) -> str:
    """Hash of the weights as the engine sees them (identity for prefix-cache salting)."""
    digest = hashlib.sha256()
    for part in parts:
        if part.window:
            digest.update(f"window/{part.window}".encode())
        for (layer, component), edit in sorted(part.site_edits.items()):
            digest.update(f"{layer}/{component}/{edit.act}{'/renorm' if edit.renorm else ''}".encode())
            for name in ("W", "b", "P", "U", "v", "z"):
                tensor = getattr(edit, name)
                digest.update(name.encode())
                if tensor is not None:
                    digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class Geometry:
    """What the engine hooks (from its start-up report): the one place an intervention is checked against."""

    num_slots: int = 0
    max_rank: int = 0
    max_columns: int = 0
    components: tuple[str, ...] = ()
    architecture_components: tuple[str, ...] = ()
    architecture: str = ""
    num_layers: int = 0
    hidden_size: int = 0
    widths: dict[str, int] = field(default_factory=dict)
    heads: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, engine_geometry: dict) -> "Geometry":
        g = engine_geometry
        components = tuple(g.get("components", ()))
        return cls(int(g.get("num_slots", 0)), int(g.get("max_rank", 0)), int(g.get("max_columns", 0)), components,
                   tuple(g.get("architecture_components", components)), str(g.get("architecture") or ""),
                   int(g.get("num_layers", 0)), int(g.get("hidden_size", 0)),
                   {c: int(w) for c, w in g.get("widths", {}).items()},
                   {c: int(n) for c, n in g.get("heads", {}).items()})

    def require_interventions(self) -> None:
        """Refuse (naming the architecture) when the base model is served plain."""
        if not self.num_slots:
            raise RegistryError(f"interventions are not supported on {self.architecture or 'this base model'}: it "
                                "has no steering table (see README, Supported models); the model is served plain")

    def compile(self, iv: Intervention) -> list[Part]:
        """Validate ``iv`` against what the engine hooks; return its compiled parts."""
        self.require_interventions()
        if self.hidden_size and iv.hidden_size != self.hidden_size:
            raise RegistryError(f"intervention hidden size {iv.hidden_size} does not match the base model's "
                                f"{self.hidden_size}", param="source")
        parse_positions(iv.positions)
        parts = compile_parts(iv, widths=self.widths, heads=self.heads)
        if len(parts) > self.num_slots:
            raise RegistryError(f"the intervention needs {len(parts)} slots but the server has {self.num_slots}",
                                param="source")
        for (layer, component), edit in (item for part in parts for item in part.site_edits.items()):
            if layer >= self.num_layers:
                raise RegistryError(f"layer {layer} does not exist (the base model has {self.num_layers})",
                                    param="source")
            if component not in self.architecture_components:
                raise RegistryError(f"component {component!r} does not exist in {self.architecture}"
                                    " (see README, Supported models)", param="source")
            if component not in self.components:
                raise RegistryError(f"component {component!r} is not hooked by this server "
                                    f"(hooked: {', '.join(self.components)}); see --intervention-components",
                                    param="source")
            width = self.widths.get(component, self.hidden_size)
            if edit.width is not None and width and edit.width != width:
                raise RegistryError(f"the edit at layer {layer} {component} acts on {edit.width} columns but the "
                                    f"base model's {component} is {width} wide", param="source")
            if edit.rank > self.max_rank:
                raise RegistryError(f"rank {edit.rank} at layer {layer} {component} exceeds this server's "
                                    f"--max-rank {self.max_rank}", param="source")
        return parts


class Catalogue:
    """id → entry. Changes are checked here; persisting and slots are the other modules' business."""

    def __init__(self):
        self.entries: dict[str, Entry] = {}

    def get(self, intervention_id: str) -> Entry:
        """The live entry (404 for an unknown id, or one being deleted)."""
        entry = self.entries.get(intervention_id)
        if entry is None or entry.deleting:
            raise not_found(intervention_id)
        return entry

    def is_current(self, entry: Entry) -> bool:
        """Whether ``entry`` is still the one registered under its id (not deleted or replaced)."""
        return self.entries.get(entry.id) is entry

    def check_replaceable(self, intervention_id: str, replace: bool) -> Entry | None:
        """The entry ``intervention_id`` would replace (None if new); 409 if it exists and may not be."""
        old = self.entries.get(intervention_id)
        if old is not None and not replace:
            raise RegistryError(f"intervention {intervention_id!r} already exists", code="conflict", param="id")
        if old is not None and old.refcount:
            raise RegistryError(f"intervention {intervention_id!r} is in use by {old.refcount} request(s)",
                                code="conflict", param="id")
        return old
