"""The intervention registry, split as vLLM splits its LoRA manager:

* :mod:`.catalogue` — ids and their compiled edits (two kinds of entry behind one interface), the
  one geometry check;
* :mod:`.slot_pool` — device slots: LRU, refcounts, loads outside the lock;
* :mod:`.store` — persistence under ``--registry-dir``, one atomic writer off the event loop;
  :mod:`.redis_store` — the same in a Redis server, for replicas on different machines.

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
from steer_serve.formats.dora import output_scales_intervention
from steer_serve.formats.peft_prompt import PromptAdapter, load_prompt_adapter
from steer_serve.interventions.base import Intervention
from steer_serve.interventions.positions import parse_positions, window_part
from steer_serve.registry.catalogue import (AdapterEntry, Catalogue, Entry, Geometry, InterventionEntry, PromptEntry,
                                            content_hash)
from steer_serve.registry.errors import RegistryError
from steer_serve.registry.slot_pool import SlotPool
from steer_serve.registry.store import claim_registry_dir, open_store

__all__ = ["InterventionRegistry", "Lease", "RegistryError", "claim_registry_dir", "open_store"]
logger = logging.getLogger(__name__)


@dataclass
class Lease:
    """The entries pinned for one request; give it back with :meth:`InterventionRegistry.release`."""

    entries: list[Entry]
    steering: RequestSteering
    cache_salt: str | None
    lora: tuple[str, int, str] | None = None   # (name, vLLM int id, PEFT dir) of the weight-space adapter
    prompt: PromptAdapter | None = None         # virtual tokens to prepend to the prompt


class InterventionRegistry:
    def __init__(self, engine, *, persist_dir: Path | None = None, shared: bool = False, store_url: str | None = None):
        self.engine = engine
        self.geometry = Geometry.of(engine.geometry)
        self.max_loras = int(engine.settings.max_loras)
        self.max_lora_rank = int(engine.settings.max_lora_rank)
        self.catalogue = Catalogue()
        self.slots = SlotPool(engine, self.geometry.num_slots)
        self.store = open_store(persist_dir, shared=shared, url=store_url)
        self._temp_adapters: Path | None = None
        self._lora_ids = 0
        self._changes = asyncio.Lock()     # one catalogue change (and its write) at a time
        self._synced = None                # the store version the catalogue last reflected
        self._retiring: set[asyncio.Task] = set()

    @property
    def entries(self) -> dict[str, Entry]:
        return self.catalogue.entries

    async def resolve(self, intervention_id: str) -> Entry:
        """The entry, fetching it from the store first when this process has not seen it yet (a
        replica sharing the store registered it): lazy resolution, as vLLM's LoRA resolvers do."""
        if intervention_id not in self.entries and self.store is not None and self.store.version() != self._synced:
            await self.sync()
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
        return await self._install(self._intervention_entry(intervention_id, iv, source, format), replace)

    def _intervention_entry(self, intervention_id: str, iv: Intervention, source: str, format: str) -> Entry:
        parts = self.geometry.compile(iv)
        return InterventionEntry(intervention_id, content_hash(parts), source, format, intervention=iv, compiled=parts)

    async def register_adapter(self, intervention_id: str, adapter: WeightAdapter, *, source: str,
                               replace: bool = False) -> Entry:
        """Add a weight-space adapter (PEFT LoRA / GIFT), served through vLLM's LoRA slots."""
        return await self._install(self._adapter_entry(intervention_id, adapter, source), replace)

    def _adapter_entry(self, intervention_id: str, adapter: WeightAdapter, source: str) -> Entry:
        if not self.max_loras:
            raise RegistryError("this server serves no weight-space adapters; start it with --max-loras N",
                                param="source")
        compiled = (self.geometry.compile(output_scales_intervention(adapter.output_scales, self.geometry.hidden_size))
                    if adapter.output_scales else [])
        self._lora_ids += 1
        return AdapterEntry(intervention_id, adapter.content_hash, source, adapter.source_format, adapter=adapter,
                            lora_id=self._lora_ids, compiled=compiled)

    async def register_prompt(self, intervention_id: str, prompt: PromptAdapter, *, source: str,
                              replace: bool = False) -> Entry:
        """Add a prompt-space adapter (virtual tokens prepended per request)."""
        return await self._install(PromptEntry(intervention_id, prompt.content_hash, source, prompt.source_format,
                                               prompt=prompt), replace)

    async def _install(self, entry: Entry, replace: bool) -> Entry:
        async with self._changes:
            old = self.catalogue.check_replaceable(entry.id, replace)
            if self.store is not None:
                try:
                    await self.store.upsert(entry, replace=replace)
                except RegistryError:
                    raise
                except Exception as exc:
                    raise RegistryError(f"could not write the registry, {entry.id!r} is not registered: {exc}",
                                        code="registry_write_failed") from exc
            self.entries[entry.id] = entry
        if old is not None:
            await self.slots.unload(old)
        return entry

    async def update_defaults(self, intervention_id: str, *, scale: float | None = None,
                              positions: str | None = None) -> Entry:
        """PATCH: change the default scale/positions (takes effect for new requests)."""
        entry = await self.resolve(intervention_id)
        async with self._changes:
            before = entry.record()
            entry.set_defaults(scale=scale, positions=positions)
            if self.store is not None:
                try:
                    await self.store.upsert(entry, replace=True)
                except Exception:
                    entry.set_defaults(scale=before["scale"], positions=before["positions"])
                    raise
        return entry

    async def unregister(self, intervention_id: str, *, force: bool = False, timeout: float = 60.0) -> None:
        """Remove an entry; refused while in use unless ``force`` (then new requests get 404 and it
        waits for the pinned ones, those still waiting for a slot included)."""
        entry = await self.resolve(intervention_id)
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
            if self.store is not None:
                try:
                    await self.store.delete(intervention_id)
                except Exception:
                    entry.deleting = False
                    raise
            if self.entries.get(intervention_id) is entry:
                del self.entries[intervention_id]
        await self.slots.unload(entry)

    # ----- the store's view ---------------------------------------------------------------
    async def restore(self) -> list[str]:
        """Load what the store holds (at start-up); returns the ids (a broken record is logged and skipped)."""
        if self.store is None:
            return []
        await asyncio.to_thread(self.store.start)
        await self.sync()
        return list(self.entries)

    async def sync(self) -> None:
        """Make the catalogue what the store says: records other processes added, changed or removed
        (entries in use by requests are retired once those finish: they keep what they started with)."""
        async with self._changes:
            version = self.store.version()
            records = await asyncio.to_thread(self.store.records)
            for intervention_id, record in records.items():
                local = self.entries.get(intervention_id)
                if local is not None and local.record() == record:
                    continue
                try:
                    entry = await self._entry_from_record(record)
                except Exception as exc:  # a broken record must not stop the server
                    logger.error("could not load intervention %s from the store: %s", intervention_id, exc)
                    continue
                self.entries[intervention_id] = entry
                if local is not None:
                    self._retire(local)
            for intervention_id in [i for i in self.entries if i not in records]:
                self._retire(self.entries.pop(intervention_id))
            self._synced = version

    async def _entry_from_record(self, record: dict) -> Entry:
        from steer_serve.formats.native import read_native

        if record.get("kind") == "adapter":
            directory = await asyncio.to_thread(self.store.weights_path, record)
            adapter = await asyncio.to_thread(load_weight_adapter, directory, self.adapters_dir, base_model_dir=self.engine.settings.model,
                                              max_rank=self.max_lora_rank)
            adapter.source_format = record["format"]
            entry = self._adapter_entry(record["id"], adapter, record["source"])
        elif record.get("kind") == "prompt":
            directory = await asyncio.to_thread(self.store.weights_path, record)
            prompt = await asyncio.to_thread(load_prompt_adapter, directory, self.adapters_dir,
                                             hidden_size=self.geometry.hidden_size)
            prompt.source_format = record["format"]
            entry = PromptEntry(record["id"], prompt.content_hash, record["source"], record["format"], prompt=prompt)
        else:
            iv = await asyncio.to_thread(read_native, await asyncio.to_thread(self.store.weights_path, record))
            iv.positions, iv.scale = record["positions"], record["scale"]
            entry = self._intervention_entry(record["id"], iv, record["source"], record["format"])
        entry.created = record.get("created", entry.created)
        return entry

    def _retire(self, entry: Entry) -> None:
        """Free ``entry``'s slots once no request uses it (it is no longer in the catalogue)."""
        async def unload_when_unused():
            await self.slots.wait_unused(entry, timeout=None)
            await self.slots.unload(entry)

        self._retiring.add(task := asyncio.ensure_future(unload_when_unused()))
        task.add_done_callback(self._retiring.discard)

    async def watch(self, interval: float) -> None:
        """Follow the store's changes made by other processes, checking every ``interval`` seconds."""
        while True:
            await asyncio.sleep(interval)
            if self.store.version() != self._synced:
                try:
                    await self.sync()
                except Exception:
                    logger.exception("could not follow the intervention store")

    # ----- requests -----------------------------------------------------------------------
    def require_steerable(self, ids: list[str]) -> None:
        """Refuse, naming the architecture, a request for anything but adapters on a model served plain."""
        if any(not isinstance(self.entries.get(i), (AdapterEntry, PromptEntry)) for i in ids):
            self.geometry.require_interventions()

    async def acquire(self, requested: list[tuple[str, float | None, str | None]]) -> Lease:
        """Pin each (id, scale, positions) a request names into device slots (waiting while every
        slot is pinned) and build its steering; at most one may be a weight-space adapter."""
        self.require_steerable([i for i, _, _ in requested])
        named = [(await self.resolve(i), scale, positions) for i, scale, positions in requested]
        adapters = list(dict.fromkeys(e for e, _, _ in named if isinstance(e, AdapterEntry)))
        prompts = list(dict.fromkeys(e for e, _, _ in named if isinstance(e, PromptEntry)))
        # a DoRA's output scales first: they are part of its modules' outputs, which interventions then edit
        columns = [(e, None, None) for e in adapters if e.parts]
        columns += [(e, s, p) for e, s, p in named if isinstance(e, InterventionEntry)]
        if len(adapters) > 1:
            raise RegistryError("a request may use at most one weight-space adapter (PEFT LoRA / GIFT)",
                                param="interventions")
        if len(prompts) > 1:
            raise RegistryError("a request may use at most one prompt-space adapter (prompt tuning / P-tuning)",
                                param="interventions")
        if any((s, p) != (None, None) for e, s, p in named if isinstance(e, PromptEntry)):
            raise RegistryError("a prompt-space adapter takes no scale or positions", param="interventions")
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
        unique = list(dict.fromkeys([e for e, _, _ in columns] + adapters + prompts))
        await self.slots.pin(unique, self.catalogue.is_current)
        steering = RequestSteering()
        for entry, scale, positions in columns:
            for part in entry.parts:
                steering.slots.append(part.slot)
                steering.scales.append(scale)
                steering.positions.append(window_part(positions, part.window))
        salt_source = json.dumps([[e.content_hash for e in adapters + prompts]]
                                 + [[e.content_hash, s, p] for e, s, p in columns])
        salt = hashlib.sha256(salt_source.encode()).hexdigest()[:32]
        return Lease(unique, steering, salt, adapters[0].lora if adapters else None,
                     prompts[0].prompt if prompts else None)

    async def release(self, lease: Lease) -> None:
        await self.slots.release(lease.entries)
