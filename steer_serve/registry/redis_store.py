"""A networked store for a fleet: the registry in a Redis server (``--registry-store redis://…``).

Replicas on different machines share it as replicas on one machine share a directory
(:mod:`.store`), with the same interface and guarantees: one record per id, weights stored by
content hash, every change atomic, no lost or half-read record when replicas write at once.

Keys (under ``steer-serve:``): ``records`` (a hash id -> the record's JSON), ``version`` (an integer
bumped by every change; replicas poll it), ``files:<kind>:<hash>`` (a hash relative path -> bytes:
the native files of an intervention, or the owned PEFT directory of an adapter or a prompt).

A change is an optimistic transaction (``WATCH``/``MULTI``): upload the weights (idempotent,
content-addressed), then watch ``records`` and the weights' key, check, and in one ``MULTI`` write the
record, delete the weights no record names any more and bump ``version``; if another replica changed
either key meanwhile (deleted those very weights as stale, say), the transaction fails and is retried
from the upload. Each replica materialises the weights it serves into its local ``--registry-dir``.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from steer_serve.registry.catalogue import DIRECTORY_KINDS, Entry, InterventionEntry
from steer_serve.registry.errors import RegistryError

PREFIX = "steer-serve:"
RECORDS, VERSION = PREFIX + "records", PREFIX + "version"
#: attempts of one change against concurrent writers before giving up (each retry means another replica wrote)
MAX_ATTEMPTS = 100


def files_key(kind: str, content_hash: str) -> str:
    return f"{PREFIX}files:{kind if kind in DIRECTORY_KINDS else 'intervention'}:{content_hash}"


class RedisStore:
    """The registry in a Redis server; ``cache_dir`` holds this replica's local copies of the weights."""

    shared = True

    def __init__(self, url: str, cache_dir: Path):
        import redis

        if urlparse(url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"--registry-store {url!r}: expected redis://host:port/db (or rediss://, unix://)")
        self.url = url
        self.client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10)
        self.weights_dir = cache_dir / "weights"
        self.adapters_dir = cache_dir / "adapters"
        for directory in (self.weights_dir, self.adapters_dir):
            directory.mkdir(parents=True, exist_ok=True)

    def check(self) -> None:
        """Fail fast (at start-up, before the engine) when the store cannot be reached."""
        try:
            self.client.ping()
        except Exception as exc:
            raise SystemExit(f"--registry-store {self.url}: cannot reach the store: {exc}") from None

    def version(self) -> int:
        """Bumped by every change any replica makes."""
        return int(self.client.get(VERSION) or 0)

    def records(self) -> dict[str, dict]:
        return {key.decode(): json.loads(value) for key, value in self.client.hgetall(RECORDS).items()}

    def start(self) -> dict[str, dict]:
        """The records, after removing weights that no record names (an upload whose record was never written)."""
        self._transact(lambda pipe, records: None)   # no record changes: only the unnamed weights go
        return self.records()

    async def upsert(self, entry: Entry, *, replace: bool) -> None:
        """Persist ``entry`` (its weights too); 409 if its id exists and ``replace`` is False."""
        await asyncio.to_thread(self._upsert, entry, replace)

    async def delete(self, intervention_id: str) -> None:
        def change(pipe, records):
            records.pop(intervention_id, None)

        await asyncio.to_thread(self._transact, change)

    def weights_path(self, record: dict) -> Path:
        """The local copy of ``record``'s weights, fetched from the store the first time."""
        local = (self.adapters_dir if record.get("kind") in DIRECTORY_KINDS else self.weights_dir) / record["weights"]
        if not local.is_dir():
            files = self.client.hgetall(files_key(record.get("kind"), record["weights"]))
            if not files:
                raise RegistryError(f"the store holds no weights for {record['id']!r}", code="registry_write_failed")
            staging = Path(tempfile.mkdtemp(prefix=f".{local.name}.tmp-", dir=local.parent))
            for relative, data in files.items():
                target = staging / relative.decode()
                if staging not in target.resolve().parents:
                    raise RegistryError(f"the store's weights for {record['id']!r} name a path outside their "
                                        "directory", code="registry_write_failed")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            try:
                staging.rename(local)
            except OSError:          # another request of this replica materialised it first
                shutil.rmtree(staging, ignore_errors=True)
        return local

    # ----- changes ------------------------------------------------------------------------
    def _upsert(self, entry: Entry, replace: bool) -> None:
        record = entry.record()
        files = self._files_of(entry)
        key = files_key(record.get("kind"), record["weights"])

        def change(pipe, records):
            if not replace and entry.id in records:
                raise RegistryError(f"intervention {entry.id!r} already exists", code="conflict", param="id")
            if not pipe.exists(key):
                return "upload"
            records[entry.id] = record

        self._transact(change, upload=lambda: self.client.hset(key, mapping=files), watch=(key,))

    def _files_of(self, entry: Entry) -> dict[str, bytes]:
        """relative path -> bytes of the entry's weights directory (written natively for an intervention)."""
        from steer_serve.formats.native import save_native

        if isinstance(entry, InterventionEntry):
            directory = self.weights_dir / entry.content_hash
            if not directory.is_dir():
                with tempfile.TemporaryDirectory(dir=self.weights_dir) as staging:
                    save_native(entry.intervention, Path(staging) / "native")
                    Path(staging, "native").rename(directory)
        else:
            directory = Path(entry.directory)
        return {str(path.relative_to(directory)): path.read_bytes()
                for path in sorted(directory.rglob("*")) if path.is_file()}

    def _transact(self, change, *, upload=None, watch: tuple[str, ...] = ()) -> None:
        """Apply ``change(pipe, records)`` (it edits ``records`` in place, or returns "upload" when the
        weights it needs are missing) atomically: the record writes, the removal of weights no record
        names any more and the version bump happen in one MULTI, or not at all and are retried."""
        import redis

        for _ in range(MAX_ATTEMPTS):
            if upload is not None:
                upload()
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(RECORDS, *watch)
                    records = {k.decode(): json.loads(v) for k, v in pipe.hgetall(RECORDS).items()}
                    before = dict(records)
                    if change(pipe, records) == "upload":
                        continue
                    named = {files_key(r.get("kind"), r["weights"]) for r in records.values()}
                    stale = [k for k in pipe.scan_iter(match=PREFIX + "files:*") if k.decode() not in named]
                    pipe.multi()
                    for gone in before.keys() - records.keys():
                        pipe.hdel(RECORDS, gone)
                    for intervention_id, record in records.items():
                        if before.get(intervention_id) != record:
                            pipe.hset(RECORDS, intervention_id, json.dumps(record))
                    if stale:
                        pipe.delete(*stale)
                    pipe.incr(VERSION)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue
        raise RegistryError(f"the store at {self.url} kept changing under {MAX_ATTEMPTS} attempts of this change",
                            code="registry_write_failed")
