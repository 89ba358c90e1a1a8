"""The store: where the registry persists (``--registry-dir``), written by one atomic writer.

Layout: ``registry.json`` (one record per id: kind, source, format, defaults, weights hash),
``weights/<hash>/`` (a native copy of each intervention), ``adapters/<hash>/`` (the servable PEFT
copy of each weight-space adapter), ``.lock`` (the owning process). Every change rewrites
``registry.json`` atomically (temp file, fsync, rename) in a thread, off the event loop, one write at
a time; weights no record names are removed after it. A second process on the same directory is
refused (:func:`lock_registry_dir`), and leftovers of a crashed write are removed at start-up.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from steer_serve.registry.catalogue import Entry, InterventionEntry

logger = logging.getLogger(__name__)

#: Half-written files of a crashed write: temp weight dirs, adapter staging dirs, temp registry files.
_LEFTOVERS = (("weights", ".*.tmp-*"), ("adapters", ".*.tmp-*"), ("adapters", ".incoming-*"), (".", ".registry.json.*"))


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


class RegistryStore:
    def __init__(self, root: Path):
        self.root = root
        self.weights_dir = root / "weights"
        self.adapters_dir = root / "adapters"
        self._writer = asyncio.Lock()
        self._live: set[str] = set()   # weights the last write named

    def records(self) -> list[dict]:
        """The persisted records (none before the first write); removes a crashed write's leftovers first."""
        self._remove_crash_leftovers()
        path = self.root / "registry.json"
        records = json.loads(path.read_text()).get("interventions", []) if path.is_file() else []
        self._live = {record["weights"] for record in records}
        return records

    async def write(self, entries: list[Entry]) -> None:
        """Persist ``entries`` (their records, and any weights not stored yet) atomically. Weights that
        an earlier write of this store named and this one does not are removed after it; nothing else
        (a copy another registration is still preparing stays)."""
        async with self._writer:   # the snapshot is taken in turn, so the newest state is written last
            records = [entry.record() for entry in entries]
            unsaved = [(entry.content_hash, entry.intervention) for entry in entries
                       if isinstance(entry, InterventionEntry)]
            await asyncio.to_thread(self._write, records, unsaved)

    def _write(self, records: list[dict], unsaved: list) -> None:
        from steer_serve.formats.native import save_native

        self.weights_dir.mkdir(parents=True, exist_ok=True)
        for weights, intervention in unsaved:
            if not (self.weights_dir / weights).exists():
                save_native(intervention, self.weights_dir / weights)
        _atomic_write_json(self.root / "registry.json", {"version": 1, "interventions": records})
        live = {record["weights"] for record in records}
        for stale in self._live - live:
            for directory in (self.weights_dir, self.adapters_dir):
                shutil.rmtree(directory / stale, ignore_errors=True)
        self._live = live

    def _remove_crash_leftovers(self) -> None:
        """Safe at start-up only: this process holds the directory's lock and has written nothing yet."""
        for folder, pattern in _LEFTOVERS:
            directory = self.root / folder
            for leftover in directory.glob(pattern) if directory.is_dir() else ():
                logger.warning("removing %s, left by a write that did not finish", leftover)
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)


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
