"""The store: where the registry persists (``--registry-dir``), shared by replicas or owned by one.

Layout: ``registry.json`` (one record per id: kind, source, format, defaults, weights hash),
``weights/<hash>/`` (a native copy of each intervention), ``adapters/<hash>/`` (the servable PEFT
copy of each weight-space adapter), ``.lock`` (who uses the directory), ``.write-lock``.

Every change is a read-modify-write of ``registry.json`` under an exclusive ``flock`` on
``.write-lock``, in a thread off the event loop: read the current records, apply this one change
(an upsert or a delete of one id), store any new weights, write the file atomically (temp file,
fsync, rename), then remove the weights that change stopped naming. So several processes — the
replicas of a fleet on one shared directory (``--shared-registry``) — never lose or half-read each
other's records. Without ``--shared-registry`` a second process on the directory is refused at
start-up (:func:`claim_registry_dir`). Leftovers of a crashed write (temp files and dirs) are
removed at start-up, under the write lock, once they are older than :data:`LEFTOVER_GRACE_S` (a
replica's write in progress is younger).
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from steer_serve.registry.catalogue import DIRECTORY_KINDS, Entry, InterventionEntry
from steer_serve.registry.errors import RegistryError

logger = logging.getLogger(__name__)

#: Half-written files of a crashed write: temp weight dirs, adapter staging dirs, temp registry files.
_LEFTOVERS = (("weights", ".*.tmp-*"), ("adapters", ".*.tmp-*"), ("adapters", ".incoming-*"), (".", ".registry.json.*"))
#: A leftover younger than this may belong to a replica's write in progress (shared directories).
LEFTOVER_GRACE_S = 120.0


def claim_registry_dir(path: Path, *, shared: bool = False):
    """Hold ``path`` for this process: an exclusive ``flock`` on ``path/.lock`` (a second server on the
    directory is refused) or, with ``shared``, a shared one (other ``--shared-registry`` replicas may
    join; a server that owns the directory alone may not). Released when the process ends, even by
    SIGKILL. Returns the open lock file, to be kept alive."""
    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / ".lock", "a+")
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        if shared:
            raise SystemExit(f"registry directory {path} is owned by a steer-serve process that does not share it "
                             f"(pid {holder}); start every replica with --shared-registry") from None
        raise SystemExit(f"registry directory {path} is in use by another steer-serve process ({holder}); give "
                         "each server its own --registry-dir, or start every replica with --shared-registry") from None
    if not shared:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
    return handle


def open_store(directory: Path | None, *, shared: bool = False, url: str | None = None):
    """The store a server persists to: a Redis server at ``url`` (``--registry-store``; ``directory`` then
    holds this replica's local copies of the weights), else ``directory``; None: nothing persists."""
    if url is not None:
        from steer_serve.registry.redis_store import RedisStore

        return RedisStore(url, directory if directory is not None else Path(tempfile.mkdtemp(prefix="steer-store-")))
    return RegistryStore(directory, shared=shared) if directory is not None else None


class RegistryStore:
    def __init__(self, root: Path, *, shared: bool = False):
        self.root, self.shared = root, shared
        self.weights_dir = root / "weights"
        self.adapters_dir = root / "adapters"
        self.root.mkdir(parents=True, exist_ok=True)

    def version(self) -> tuple | None:
        """Changes whenever ``registry.json`` is rewritten (by any process)."""
        try:
            stat = (self.root / "registry.json").stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def weights_path(self, record: dict) -> Path:
        """The local directory holding ``record``'s weights (native, or a PEFT dir for an adapter or a prompt)."""
        return (self.adapters_dir if record.get("kind") in DIRECTORY_KINDS else self.weights_dir) / record["weights"]

    def records(self) -> dict[str, dict]:
        """id -> record, as persisted now (atomic renames: never a half-written file)."""
        path = self.root / "registry.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        return {record["id"]: record for record in data.get("interventions", [])}

    def start(self) -> dict[str, dict]:
        """The records, after removing a crashed write's leftovers (at start-up)."""
        with self._write_lock():
            self._remove_crash_leftovers()
            return self.records()

    async def upsert(self, entry: Entry, *, replace: bool) -> None:
        """Persist ``entry`` (its weights too); 409 if its id exists and ``replace`` is False."""
        record = entry.record()
        intervention = entry.intervention if isinstance(entry, InterventionEntry) else None
        await asyncio.to_thread(self._change, entry.id, record, intervention, replace)

    async def delete(self, intervention_id: str) -> None:
        await asyncio.to_thread(self._change, intervention_id, None, None, True)

    def _change(self, intervention_id: str, record: dict | None, intervention, replace: bool) -> None:
        from steer_serve.formats.native import save_native

        with self._write_lock():
            records = self.records()
            if record is not None and not replace and intervention_id in records:
                raise RegistryError(f"intervention {intervention_id!r} already exists", code="conflict", param="id")
            before = {r["weights"] for r in records.values()}
            if record is None:
                records.pop(intervention_id, None)
            else:
                if intervention is not None and not (self.weights_dir / record["weights"]).exists():
                    self.weights_dir.mkdir(parents=True, exist_ok=True)
                    save_native(intervention, self.weights_dir / record["weights"])
                records[intervention_id] = record
            _atomic_write_json(self.root / "registry.json", {"version": 1, "interventions": list(records.values())})
            for stale in before - {r["weights"] for r in records.values()}:
                for directory in (self.weights_dir, self.adapters_dir):
                    shutil.rmtree(directory / stale, ignore_errors=True)

    @contextlib.contextmanager
    def _write_lock(self):
        with open(self.root / ".write-lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _remove_crash_leftovers(self) -> None:
        oldest = time.time() - (LEFTOVER_GRACE_S if self.shared else 0.0)
        for folder, pattern in _LEFTOVERS:
            directory = self.root / folder
            for leftover in directory.glob(pattern) if directory.is_dir() else ():
                if leftover.stat().st_mtime > oldest:
                    continue
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
