"""The intervention registry, split as vLLM splits its LoRA manager:

* :mod:`.catalogue` — ids and their compiled edits (two kinds of entry behind one interface), the
  one geometry check;
* :mod:`.slot_pool` — device slots: LRU, refcounts, loads outside the lock;
* :mod:`.store` — persistence under ``--registry-dir``, one atomic writer off the event loop.

:class:`InterventionRegistry` composes them into what the API calls: register, patch, delete,
acquire (pin a request's interventions and build its steering), release, restore.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from steer_serve.engine.config import RequestSteering
from steer_serve.formats.adapters import WeightAdapter, load_weight_adapter
from steer_serve.interventions.base import Intervention
from steer_serve.interventions.positions import parse_positions, window_part
from steer_serve.registry.catalogue import AdapterEntry, Catalogue, Entry, Geometry, InterventionEntry, content_hash
from steer_serve.registry.errors import RegistryError
from steer_serve.registry.slot_pool import SlotPool
from steer_serve.registry.store import RegistryStore, lock_registry_dir

__all__ = ["InterventionRegistry", "Lease", "RegistryError", "lock_registry_dir"]
logger = logging.getLogger(__name__)


@dataclass
class Lease:
    """The entries pinned for one request; give it back with :meth:`InterventionRegistry.release`."""

    entries: list[Entry]
    steering: RequestSteering
    cache_salt: str | None
    lora: tuple[str, int, str] | None = None   # (name, vLLM int id, PEFT dir) of the weight-space adapter


class InterventionRegistry:
    def __init__(self, engine, *, persist_dir: Path | None = None):
        self.engine = engine
        self.geometry = Geometry.of(engine.geometry)
        self.max_loras = int(engine.settings.max_loras)
        self.max_lora_rank = int(engine.settings.max_lora_rank)
        self.catalogue = Catalogue()
        self.slots = SlotPool(engine, self.geometry.num_slots)
        self.store = RegistryStore(persist_dir) if persist_dir is not None else None
        self._temp_adapters: Path | None = None
        self._lora_ids = 0
        self._restoring = False            # restore() re-registers without rewriting the file it reads
        self._changes = asyncio.Lock()     # one catalogue change (and its write) at a time

    @property
    def entries(self) -> dict[str, Entry]:
        return self.catalogue.entries

    def get(self, intervention_id: str) -> Entry:
        return self.catalogue.get(intervention_id)

    def occupancy(self) -> dict:
        return self.slots.occupancy()

    @property
    def adapters_dir(self) -> Path:
        """Where the server keeps its own copies of weight-space adapters (PEFT LoRA dirs)."""
        if self.store is not None:
            path = self.store.adapters_dir
        else:
            self._temp_adapters = self._temp_adapters or Path(tempfile.mkdtemp(prefix="steer-adapters-")) / "adapters"
            path = self._temp_adapters
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ----- changes ------------------------------------------------------------------------
    async def register(self, intervention_id: str, iv: Intervention, *, source: str, format: str,
                       replace: bool = False) -> Entry:
        """Add (or with ``replace``, swap in) an intervention; persisted before it is served."""
        parts = self.geometry.compile(iv)
        return await self._install(InterventionEntry(intervention_id, content_hash(parts), source, format,
                                                     intervention=iv, compiled=parts), replace)

    async def register_adapter(self, intervention_id: str, adapter: WeightAdapter, *, source: str,
                               replace: bool = False) -> Entry:
        """Add a weight-space adapter (PEFT LoRA / GIFT), served through vLLM's LoRA slots."""
        if not self.max_loras:
            raise RegistryError("this server serves no weight-space adapters; start it with --max-loras N",
                                param="source")
        self._lora_ids += 1
        return await self._install(AdapterEntry(intervention_id, adapter.content_hash, source, adapter.source_format,
                                                adapter=adapter, lora_id=self._lora_ids), replace)

    async def _install(self, entry: Entry, replace: bool) -> Entry:
        async with self._changes:
            old = self.catalogue.check_replaceable(entry.id, replace)
            self.entries[entry.id] = entry
            try:
                await self._persist()
            except Exception as exc:
                if old is None:
                    self.entries.pop(entry.id)
                else:
                    self.entries[entry.id] = old
                raise RegistryError(f"could not write the registry, {entry.id!r} is not registered: {exc}",
                                    code="registry_write_failed") from exc
        if old is not None:
            await self.slots.unload(old)
        return entry

    async def update_defaults(self, intervention_id: str, *, scale: float | None = None,
                              positions: str | None = None) -> Entry:
        """PATCH: change the default scale/positions (takes effect for new requests)."""
        async with self._changes:
            entry = self.get(intervention_id)
            entry.set_defaults(scale=scale, positions=positions)
            await self._persist()
        return entry

    async def unregister(self, intervention_id: str, *, force: bool = False, timeout: float = 60.0) -> None:
        """Remove an entry; refused while in use unless ``force`` (then new requests get 404 and it
        waits for the pinned ones, those still waiting for a slot included)."""
        entry = self.get(intervention_id)
        if entry.refcount and not force:
            raise RegistryError(f"intervention {intervention_id!r} is in use by {entry.refcount} request(s); "
                                "retry later or pass force=true to wait for them", code="conflict")
        entry.deleting = True
        try:
            await self.slots.wait_unused(entry, timeout)
        except TimeoutError:
            entry.deleting = False
            raise RegistryError(f"intervention {intervention_id!r} still in use after {timeout:.0f}s",
                                code="conflict") from None
        async with self._changes:
            if self.entries.get(intervention_id) is entry:
                del self.entries[intervention_id]
                await self._persist()
        await self.slots.unload(entry)

    async def _persist(self) -> None:
        if self.store is not None and not self._restoring:
            await self.store.write(list(self.entries.values()))

    # ----- requests -----------------------------------------------------------------------
    async def acquire(self, requested: list[tuple[str, float | None, str | None]]) -> Lease:
        """Pin each (id, scale, positions) a request names into device slots (waiting while every
        slot is pinned) and build its steering; at most one may be a weight-space adapter."""
        if any(not isinstance(self.entries.get(i), AdapterEntry) for i, _, _ in requested):
            self.geometry.require_interventions()
        named = [(self.get(i), scale, positions) for i, scale, positions in requested]
        adapters = list(dict.fromkeys(e for e, _, _ in named if isinstance(e, AdapterEntry)))
        columns = [(e, s, p) for e, s, p in named if isinstance(e, InterventionEntry)]
        if len(adapters) > 1:
            raise RegistryError("a request may use at most one weight-space adapter (PEFT LoRA / GIFT)",
                                param="interventions")
        if sum(len(e.parts) for e, _, _ in columns) > self.geometry.max_columns:
            raise RegistryError(f"a request may combine at most {self.geometry.max_columns} interventions (an "
                                "intervention with edits on different positions counts once per positions)",
                                param="interventions")
        distinct = {e.id: len(e.parts) for e, _, _ in columns}
        if sum(distinct.values()) > self.geometry.num_slots:
            raise RegistryError(f"a request names {len(distinct)} distinct interventions needing "
                                f"{sum(distinct.values())} slots but the server has {self.geometry.num_slots}",
                                param="interventions")
        columns = [(e, e.scale if s is None else float(s), e.positions if p is None else p) for e, s, p in columns]
        for _, _, positions in columns:
            parse_positions(positions)
        unique = list(dict.fromkeys([e for e, _, _ in columns] + adapters))
        await self.slots.pin(unique, self.catalogue.is_current)
        steering = RequestSteering()
        for entry, scale, positions in columns:
            for part in entry.parts:
                steering.slots.append(part.slot)
                steering.scales.append(scale)
                steering.positions.append(window_part(positions, part.window))
        salt_source = json.dumps([[e.content_hash for e in adapters]] + [[e.content_hash, s, p] for e, s, p in columns])
        salt = hashlib.sha256(salt_source.encode()).hexdigest()[:32]
        return Lease(unique, steering, salt, adapters[0].lora if adapters else None)

    async def release(self, lease: Lease) -> None:
        await self.slots.release(lease.entries)

    # ----- start-up -----------------------------------------------------------------------
    async def restore(self) -> list[str]:
        """Re-register what the store holds; returns the ids restored (a broken record is logged and skipped)."""
        if self.store is None:
            return []
        from steer_serve.formats.native import read_native

        restored = []
        self._restoring = True
        try:
            for record in self.store.records():
                try:
                    if record.get("kind") == "adapter":
                        adapter = load_weight_adapter(self.adapters_dir / record["weights"], self.adapters_dir,
                                                      base_model_dir=self.engine.settings.model,
                                                      max_rank=self.max_lora_rank)
                        adapter.source_format = record["format"]
                        entry = await self.register_adapter(record["id"], adapter, source=record["source"],
                                                            replace=True)
                    else:
                        iv = read_native(self.store.weights_dir / record["weights"])
                        iv.positions, iv.scale = record["positions"], record["scale"]
                        entry = await self.register(record["id"], iv, source=record["source"],
                                                    format=record["format"], replace=True)
                    entry.created = record.get("created", entry.created)
                    restored.append(record["id"])
                except Exception as exc:  # a broken record must not stop the server from starting
                    logger.error("could not restore intervention %s: %s", record.get("id"), exc)
        finally:
            self._restoring = False
        return restored
