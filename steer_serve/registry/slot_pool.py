"""The device slot pool (slots 1..num_slots; 0 is 'none'), as vLLM's LoRA manager keeps its adapters.

* :meth:`SlotPool.pin` bumps the refcount of every entry a request names (a pinned entry is never
  evicted or overwritten) and loads the missing ones, all of them or none (so two requests can never
  each hold half of the slots the other needs), evicting the least recently used idle ones. When
  every slot is pinned the request waits.
* The pool's lock only guards its bookkeeping: slots are reserved under it, the device writes run
  outside it (one at a time, in order), so a cold load never stalls other requests' pins and
  releases. A request that needs an entry another request is loading waits for that load alone.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from steer_serve.registry.catalogue import Entry
from steer_serve.registry.errors import not_found

logger = logging.getLogger(__name__)


class SlotPool:
    def __init__(self, engine, num_slots: int):
        self.engine, self.num_slots = engine, num_slots
        self.owner: dict[int, Entry] = {}
        self.evictions = 0
        self.on_load: Callable[[float], None] = lambda seconds: None  # metrics hook: each load's latency
        self._changed = asyncio.Condition()     # bookkeeping; notified when slots may have come free
        self._device = asyncio.Lock()           # one table write at a time
        self._loading: dict[Entry, asyncio.Future] = {}

    def occupancy(self) -> dict:
        return {"slots": self.num_slots, "loaded": len(self.owner),
                "pinned": sum(1 for entry in self.owner.values() if entry.refcount), "evictions": self.evictions}

    def _available(self) -> int:
        """Free slots plus slots held by idle (unpinned) entries."""
        return self.num_slots - sum(1 for entry in self.owner.values() if entry.refcount)

    def _take_slot(self, entry: Entry) -> int:
        """A free slot for ``entry``, evicting (all slots of) the least recently used idle entry if none is."""
        free = [s for s in range(1, self.num_slots + 1) if s not in self.owner]
        if not free:
            victim = min({e for e in self.owner.values() if e.refcount == 0}, key=lambda e: e.last_used)
            free = [part.slot for part in victim.parts]
            self._forget(victim)
            self.evictions += 1
        self.owner[free[0]] = entry
        return free[0]

    def _forget(self, entry: Entry) -> list[int]:
        slots = [part.slot for part in entry.parts if part.slot is not None]
        for part in entry.parts:
            part.slot = None
        for slot in slots:
            self.owner.pop(slot, None)
        return slots

    async def pin(self, entries: list[Entry], is_current: Callable[[Entry], bool]) -> None:
        """Pin every entry and load the missing ones (all or none); waits while the slots are pinned.

        ``is_current(entry)`` is False for an entry deleted before it was pinned (a 404); a
        force-DELETE waits for pinned requests, waiting ones included.
        """
        async with self._changed:
            for entry in entries:
                entry.refcount += 1
            try:
                while True:
                    gone = next((e for e in entries if not is_current(e)), None)
                    if gone is not None:
                        raise not_found(gone.id)
                    missing = [e for e in entries if not e.loaded and e not in self._loading]
                    if sum(len(e.parts) for e in missing) <= self._available():
                        break
                    await self._changed.wait()
                mine = {}
                for entry in missing:
                    for part in entry.parts:
                        part.slot = self._take_slot(entry)
                    mine[entry] = self._loading[entry] = asyncio.get_running_loop().create_future()
                    mine[entry].add_done_callback(lambda f: f.cancelled() or f.exception())
                theirs = [self._loading[e] for e in entries if e in self._loading and e not in mine]
            except BaseException:
                self._unpin(entries)
                raise
        try:
            for entry, done in mine.items():
                await self._write(entry)
                done.set_result(None)
            for load in theirs:
                await asyncio.shield(load)
        except BaseException as exc:
            async with self._changed:
                for entry, done in mine.items():
                    if not done.done():
                        self._forget(entry)
                        done.set_exception(exc if isinstance(exc, Exception) else RuntimeError("load cancelled"))
                self._unpin(entries)
            raise
        finally:
            for entry in mine:
                self._loading.pop(entry, None)
        now = time.monotonic()
        for entry in entries:
            entry.last_used = now

    async def _write(self, entry: Entry) -> None:
        started = time.perf_counter()
        async with self._device:
            for part in entry.parts:
                await self.engine.write_slot(part.slot, part.site_edits)
        seconds = time.perf_counter() - started
        self.on_load(seconds)
        logger.info("loaded %s into slot(s) %s in %.1f ms", entry.id, [p.slot for p in entry.parts], 1e3 * seconds)

    def _unpin(self, entries: list[Entry]) -> None:
        for entry in entries:
            entry.refcount -= 1
        self._changed.notify_all()

    async def release(self, entries: list[Entry]) -> None:
        async with self._changed:
            self._unpin(entries)

    async def wait_unused(self, entry: Entry, timeout: float) -> None:
        """Wait until no request pins ``entry`` (raises TimeoutError after ``timeout`` seconds)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: entry.refcount == 0), timeout)

    async def unload(self, entry: Entry) -> None:
        """Give up ``entry``'s slots and clear them on the device (unless already taken again: the
        new owner's write comes after the clear, both under the device lock)."""
        async with self._changed:
            slots = self._forget(entry)
            self._changed.notify_all()
        async with self._device:
            for slot in slots:
                if slot not in self.owner:
                    await self.engine.clear_slot(slot)
