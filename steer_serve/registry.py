"""Intervention registry: id → loaded intervention, device slot pool with LRU, refcounts, persistence.

* Registering compiles an intervention once into per-site low-rank edits (the engine's form) and
  keeps them on the CPU; nothing is written to the device until a request needs it. Edits that
  act on different positions (``Edit.window``: pyreft's two interventions per layer) go into
  separate :class:`Part` s, one slot each; a request applies each part as its own column.
* :meth:`InterventionRegistry.acquire` pins every intervention a request names into a device slot
  (loading on demand, evicting the least recently used idle one) and bumps its refcount; a slot in
  use is never evicted or overwritten. When every slot is pinned, the request waits for one.
* The registry (ids, sources, defaults, and a native copy of the weights) is persisted under the
  cache dir and written atomically, so a restart loses nothing.
"""
from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from steer_serve.engine.config import RequestSteering
from steer_serve.formats.adapters import WeightAdapter, load_weight_adapter
from steer_serve.interventions import edit_config, get_family
from steer_serve.interventions.base import Intervention, LowRankEdit
from steer_serve.interventions.positions import parse_positions, window_part

logger = logging.getLogger(__name__)


def lock_registry_dir(path: Path):
    """Hold ``path`` for this process (an exclusive ``flock`` on ``path/.lock``, released when the
    process ends, even by SIGKILL): a second server on the same directory would overwrite this one's
    ``registry.json`` and delete its weights. Returns the open lock file, to be kept alive."""
    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise SystemExit(f"registry directory {path} is in use by another steer-serve process (pid {holder}); "
                         f"give each server its own --registry-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


class RegistryError(Exception):
    """A registry request that cannot be honoured; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass(eq=False)
class Part:
    """One device slot's worth of an intervention: the site edits of its edits with one ``window``."""

    site_edits: dict[tuple[int, str], LowRankEdit]
    window: str | None = None
    slot: int | None = None


@dataclass(eq=False)  # identity semantics: entries are hashed into sets of pinned interventions
class Entry:
    """One registered intervention, or weight-space adapter (``adapter`` set, ``intervention`` None)."""

    id: str
    intervention: Intervention | None
    parts: list[Part]
    content_hash: str
    source: str
    format: str
    created: int = field(default_factory=lambda: int(time.time()))
    refcount: int = 0
    last_used: float = 0.0
    deleting: bool = False
    adapter: WeightAdapter | None = None
    lora_id: int = 0            # vLLM's LoRA int id (unique per registered adapter content)

    @property
    def slot(self) -> int | None:
        """The (first) slot the intervention is loaded in, or None when it is not loaded."""
        return self.parts[0].slot if self.parts and self.loaded else None

    @property
    def loaded(self) -> bool:
        return all(part.slot is not None for part in self.parts)

    @property
    def positions(self) -> str:
        return self.intervention.positions if self.intervention else "all"

    @property
    def scale(self) -> float:
        return self.intervention.scale if self.intervention else 1.0

    @property
    def kind(self) -> str:
        return "adapter" if self.adapter else "intervention"


@dataclass
class Lease:
    """The slots pinned for one request; give it back with :meth:`InterventionRegistry.release`."""

    entries: list[Entry]
    steering: RequestSteering
    cache_salt: str | None
    lora: tuple[str, int, str] | None = None   # (name, vLLM int id, PEFT dir) of the weight-space adapter


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
            digest.update(f"{layer}/{component}/{edit.act}".encode())
            for name in ("W", "b", "P", "U", "v", "z"):
                tensor = getattr(edit, name)
                digest.update(name.encode())
                if tensor is not None:
                    digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


class InterventionRegistry:
    """Registered interventions and the device slot pool (slots 1..num_slots; 0 is 'none')."""

    def __init__(self, engine, *, persist_dir: Path | None = None):
        self.engine = engine
        geometry = engine.geometry
        self.num_slots = int(geometry.get("num_slots", 0))
        self.max_rank = int(geometry.get("max_rank", 0))
        self.max_columns = int(geometry.get("max_columns", 0))
        self.components = tuple(geometry.get("components", ()))
        self.num_layers = int(geometry.get("num_layers", 0))
        self.hidden_size = int(geometry.get("hidden_size", 0))
        self.widths = {c: int(w) for c, w in geometry.get("widths", {}).items()}
        self.heads = {c: int(n) for c, n in geometry.get("heads", {}).items()}
        self.max_loras = int(engine.settings.max_loras)
        self.max_lora_rank = int(engine.settings.max_lora_rank)
        self._lora_ids = 0
        self._adapters_dir: Path | None = None
        self.entries: dict[str, Entry] = {}
        self.slot_owner: dict[int, str] = {}
        self.persist_dir = persist_dir
        self.evictions = 0
        self.on_load = lambda seconds: None  # metrics hook: called with each slot load's latency
        self._restoring = False  # restore() re-registers without rewriting the file it reads from
        self._changed = asyncio.Condition()
        self._slot_lock = asyncio.Lock()

    # ----- registration -------------------------------------------------------------------
    def require_interventions(self) -> None:
        """Refuse (400, naming the architecture) when the base model is served plain."""
        if not self.num_slots:
            architecture = self.engine.geometry.get("architecture") or "this base model"
            raise RegistryError(f"interventions are not supported on {architecture}: it has no steering table "
                                "(see README, Supported models); the model is served plain", status=400)

    def check_geometry(self, iv: Intervention) -> list[Part]:
        """Validate against what the engine hooks; return the compiled parts."""
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
            if component not in self.engine.geometry.get("architecture_components", self.components):
                raise RegistryError(f"component {component!r} does not exist in {self.engine.geometry['architecture']}"
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

    async def register(self, intervention_id: str, iv: Intervention, *, source: str, format: str,
                       replace: bool = False) -> Entry:
        """Add (or with ``replace``, swap in) an intervention; persists the registry."""
        parts = self.check_geometry(iv)
        return await self._install(Entry(intervention_id, iv, parts, content_hash(parts), source, format), replace)

    async def register_adapter(self, intervention_id: str, adapter: WeightAdapter, *, source: str,
                               replace: bool = False) -> Entry:
        """Add a weight-space adapter (PEFT LoRA / GIFT), served through vLLM's LoRA slots."""
        if not self.max_loras:
            raise RegistryError("this server serves no weight-space adapters; start it with --max-loras N",
                                param="source")
        self._lora_ids += 1
        entry = Entry(intervention_id, None, [], adapter.content_hash, source, adapter.source_format,
                      adapter=adapter, lora_id=self._lora_ids)
        return await self._install(entry, replace)

    async def _install(self, entry: Entry, replace: bool) -> Entry:
        """Put ``entry`` under its id (unloading what it replaces) and persist the registry."""
        async with self._changed:
            self._check_replaceable(entry.id, replace)
            old = self.entries.get(entry.id)
            if old is not None:
                await self._unload(old)
            self._commit(entry.id, entry, old)
            self._changed.notify_all()
        return entry

    def _commit(self, intervention_id: str, entry: Entry, old: Entry | None) -> None:
        """Install ``entry`` and persist; if the registry cannot be written, put back what was there."""
        self.entries[intervention_id] = entry
        try:
            self._persist()
        except Exception as exc:
            if old is None:
                self.entries.pop(intervention_id)
            else:
                self.entries[intervention_id] = old
            raise RegistryError(f"could not write the registry, {intervention_id!r} is not registered: {exc}",
                                status=500, code="registry_write_failed") from exc

    def _check_replaceable(self, intervention_id: str, replace: bool) -> None:
        old = self.entries.get(intervention_id)
        if old is not None and not replace:
            raise RegistryError(f"intervention {intervention_id!r} already exists", status=409,
                                code="conflict", param="id")
        if old is not None and old.refcount:
            raise RegistryError(f"intervention {intervention_id!r} is in use by {old.refcount} request(s)",
                                status=409, code="conflict", param="id")

    async def update_defaults(self, intervention_id: str, *, scale: float | None = None,
                              positions: str | None = None) -> Entry:
        """PATCH: change the default scale/positions (takes effect for new requests)."""
        entry = self.get(intervention_id)
        if entry.adapter is not None:
            raise RegistryError(f"{intervention_id!r} is a weight-space adapter: it has no scale or positions")
        if positions is not None:
            parse_positions(positions)
            entry.intervention.positions = positions
        if scale is not None:
            entry.intervention.scale = float(scale)
        self._persist()
        return entry

    async def unregister(self, intervention_id: str, *, force: bool = False, timeout: float = 60.0) -> None:
        """Remove an intervention; refused while in use unless ``force`` (then waits for it to drain)."""
        entry = self.get(intervention_id)
        async with self._changed:
            if entry.refcount and not force:
                raise RegistryError(f"intervention {intervention_id!r} is in use by {entry.refcount} request(s); "
                                    "retry later or pass force=true to wait for them", status=409, code="conflict")
            entry.deleting = True
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: entry.refcount == 0), timeout)
            except asyncio.TimeoutError:
                entry.deleting = False
                raise RegistryError(f"intervention {intervention_id!r} still in use after {timeout:.0f}s",
                                    status=409, code="conflict") from None
            await self._unload(entry)
            self.entries.pop(intervention_id, None)
            self._persist()
            self._changed.notify_all()

    def get(self, intervention_id: str) -> Entry:
        entry = self.entries.get(intervention_id)
        if entry is None or entry.deleting:
            raise RegistryError(f"The intervention `{intervention_id}` does not exist.", status=404,
                                code="intervention_not_found", param="intervention")
        return entry

    # ----- slot pool ----------------------------------------------------------------------
    async def acquire(self, requested: list[tuple[str, float | None, str | None]]) -> Lease:
        """Pin each (id, scale, positions) into a slot; waits while every slot is busy.

        At most one of the ids may be a weight-space adapter; it rides on vLLM's own LoRA slots.
        """
        if any(i not in self.entries or not self.entries[i].adapter for i, _, _ in requested):
            self.require_interventions()
        named = [(self.get(i), scale, positions) for i, scale, positions in requested]
        adapters = list(dict.fromkeys(e for e, _, _ in named if e.adapter))
        if len(adapters) > 1:
            raise RegistryError("a request may use at most one weight-space adapter (PEFT LoRA / GIFT)",
                                param="interventions")
        named = [item for item in named if not item[0].adapter]
        if sum(len(e.parts) for e, _, _ in named) > self.max_columns:
            raise RegistryError(f"a request may combine at most {self.max_columns} interventions (an intervention "
                                "with edits on different positions counts once per positions)",
                                param="interventions")
        entries = [e for e, _, _ in named]
        distinct = {e.id: len(e.parts) for e in entries}
        if sum(distinct.values()) > self.num_slots:
            raise RegistryError(f"a request names {len(distinct)} distinct interventions needing "
                                f"{sum(distinct.values())} slots but the server has {self.num_slots}",
                                param="interventions")
        columns = []  # (entry, scale, positions) with the defaults filled in
        for entry, scale, positions in named:
            pos = entry.positions if positions is None else positions
            parse_positions(pos)
            columns.append((entry, entry.scale if scale is None else float(scale), pos))
        unique = list(dict.fromkeys(entries + adapters))
        async with self._changed:
            for entry in unique:
                entry.refcount += 1  # pinned from now on: never chosen for eviction
            try:
                # Load all missing ones at once or none (waiting), so two requests can never each
                # hold half of the slots the other needs.
                while True:
                    missing = [e for e in unique if not e.loaded and not e.adapter]
                    # a force-DELETE waits for pinned requests (waiting ones too); only an entry
                    # deleted before this request pinned it is gone
                    gone = next((e for e in unique if self.entries.get(e.id) is not e), None)
                    if gone is not None:
                        raise RegistryError(f"The intervention `{gone.id}` does not exist.", status=404,
                                            code="intervention_not_found", param="intervention")
                    if sum(len(e.parts) for e in missing) <= self._available_slots():
                        for entry in missing:
                            await self._load(entry)
                        break
                    await self._changed.wait()
            except BaseException:
                for entry in unique:
                    entry.refcount -= 1
                self._changed.notify_all()
                raise
            now = time.monotonic()
            for entry in unique:
                entry.last_used = now
        steering = RequestSteering()
        for entry, scale, positions in columns:
            for part in entry.parts:
                steering.slots.append(part.slot)
                steering.scales.append(scale)
                steering.positions.append(window_part(positions, part.window))
        salt_source = json.dumps([[e.content_hash for e in adapters]] + [[e.content_hash, s, p] for e, s, p in columns])
        salt = hashlib.sha256(salt_source.encode()).hexdigest()[:32]
        lora = (adapters[0].id, adapters[0].lora_id, str(adapters[0].adapter.path)) if adapters else None
        return Lease(unique, steering, salt, lora)

    async def release(self, lease: Lease) -> None:
        async with self._changed:
            for entry in dict.fromkeys(lease.entries):
                entry.refcount -= 1
            self._changed.notify_all()

    def _available_slots(self) -> int:
        """Free slots plus slots held by idle (unpinned) interventions."""
        idle = sum(1 for owner in self.slot_owner.values() if self.entries[owner].refcount == 0)
        return self.num_slots - len(self.slot_owner) + idle

    def _free_slot(self) -> int:
        """A free slot, evicting (all slots of) the least recently used idle intervention if none is."""
        free = [s for s in range(1, self.num_slots + 1) if s not in self.slot_owner]
        if not free:
            victim = min({self.entries[o] for o in self.slot_owner.values() if self.entries[o].refcount == 0},
                         key=lambda e: e.last_used)
            free = [part.slot for part in victim.parts]
            for part in victim.parts:
                self.slot_owner.pop(part.slot, None)
                part.slot = None
            self.evictions += 1
        return free[0]

    async def _load(self, entry: Entry) -> None:
        """Give every part of ``entry`` a slot (see :meth:`_free_slot`); all of them or none."""
        started = time.perf_counter()
        try:
            for part in entry.parts:
                slot = self._free_slot()
                self.slot_owner[slot] = entry.id
                try:
                    async with self._slot_lock:
                        await self.engine.write_slot(slot, part.site_edits)
                except BaseException:
                    self.slot_owner.pop(slot, None)
                    raise
                part.slot = slot
        except BaseException:
            await self._unload(entry)
            raise
        seconds = time.perf_counter() - started
        self.on_load(seconds)
        logger.info("loaded %s into slot(s) %s in %.1f ms", entry.id, [p.slot for p in entry.parts], 1e3 * seconds)

    async def _unload(self, entry: Entry) -> None:
        for part in entry.parts:
            if part.slot is not None:
                slot, part.slot = part.slot, None
                self.slot_owner.pop(slot, None)
                async with self._slot_lock:
                    await self.engine.clear_slot(slot)

    def occupancy(self) -> dict:
        return {"slots": self.num_slots, "loaded": len(self.slot_owner),
                "pinned": sum(1 for o in self.slot_owner.values() if self.entries[o].refcount),
                "evictions": self.evictions}

    # ----- persistence --------------------------------------------------------------------
    def _persist(self) -> None:
        if self.persist_dir is None or self._restoring:
            return
        from steer_serve.formats.native import save_native

        self.persist_dir.mkdir(parents=True, exist_ok=True)
        weights_dir = self.persist_dir / "weights"
        weights_dir.mkdir(exist_ok=True)
        records = []
        for entry in self.entries.values():
            target = weights_dir / entry.content_hash
            if entry.intervention is not None and not target.exists():
                save_native(entry.intervention, target)
            records.append({"id": entry.id, "kind": entry.kind, "source": entry.source, "format": entry.format,
                            "created": entry.created, "weights": entry.content_hash,
                            "positions": entry.positions, "scale": entry.scale})
        _atomic_write_json(self.persist_dir / "registry.json", {"version": 1, "interventions": records})
        live = {r["weights"] for r in records}
        for directory in (weights_dir, self.adapters_dir):
            for stale in directory.iterdir():
                if stale.name not in live and not stale.name.startswith("."):
                    shutil.rmtree(stale, ignore_errors=True)

    @property
    def adapters_dir(self) -> Path:
        """Where the server keeps its own copies of weight-space adapters (PEFT LoRA dirs)."""
        if self._adapters_dir is None:
            root = self.persist_dir or Path(tempfile.mkdtemp(prefix="steer-adapters-"))
            self._adapters_dir = root / "adapters"
            self._adapters_dir.mkdir(parents=True, exist_ok=True)
        return self._adapters_dir

    async def restore(self) -> list[str]:
        """Re-register what the persisted registry holds; returns the ids restored."""
        if self.persist_dir is None:
            return []
        self._remove_crash_leftovers()
        if not (self.persist_dir / "registry.json").is_file():
            return []
        data = json.loads((self.persist_dir / "registry.json").read_text())
        self._restoring = True  # the file on disk already says all this: no rewrite, no weights cleanup
        try:
            return await self._restore_records(data.get("interventions", []))
        finally:
            self._restoring = False

    def _remove_crash_leftovers(self) -> None:
        """Half-written weights (``.<name>.tmp-*`` dirs) and registry files (``.registry.json.*``) of a
        process that crashed mid-write; safe at start-up, under the directory's lock."""
        for directory, pattern in ((self.persist_dir / "weights", ".*.tmp-*"), (self.adapters_dir, ".*.tmp-*"),
                                   (self.persist_dir, ".registry.json.*")):
            for leftover in directory.glob(pattern) if directory.is_dir() else ():
                logger.warning("removing %s, left by a write that did not finish", leftover)
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)

    async def _restore_records(self, records: list[dict]) -> list[str]:
        from steer_serve.formats.native import read_native

        restored = []
        for record in records:
            try:
                if record.get("kind") == "adapter":
                    adapter = load_weight_adapter(self.adapters_dir / record["weights"], self.adapters_dir,
                                                  base_model_dir=self.engine.settings.model,
                                                  max_rank=self.max_lora_rank)
                    adapter.source_format = record["format"]
                    entry = await self.register_adapter(record["id"], adapter, source=record["source"],
                                                        replace=True)
                else:
                    iv = read_native(self.persist_dir / "weights" / record["weights"])
                    iv.positions, iv.scale = record["positions"], record["scale"]
                    entry = await self.register(record["id"], iv, source=record["source"],
                                                format=record["format"], replace=True)
                entry.created = record.get("created", entry.created)
                restored.append(record["id"])
            except Exception as exc:  # a broken record must not stop the server from starting
                logger.error("could not restore intervention %s: %s", record.get("id"), exc)
        return restored


def _atomic_write_json(path: Path, data) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
