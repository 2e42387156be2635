"""Collections: the folder of one collection opened for writing or reading, and the registry
of a data dir's collections (create, open, list, describe, drop).

A writer (one per collection, across processes: engine/lock.py) logs a write, applies it to
the store, then to the index (`Collection.commit`). Opening one replays the log past the
store's last snapshot and brings the index (a snapshot of its own, tagged with the store
generation) up to the store.

A reader opens a collection beside a writer in another process (a `rag search` next to a
`rag serve`). It writes nothing: its store connection is query-only, and its index lives
in memory, brought up to the store's generation before each search (`refresh`), so it sees
every write the writer has acknowledged. A reader that finds no writer replays the log
first, under the writer lock, then lets the lock go.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .config import Config
from .errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound
from .fsutil import fsync_dir
from .index import VectorIndex, check_dtype
from .lock import WriterBusy, WriterLock, read_holder
from .store import STORE_FILE, DocumentRecord, Store, checked_records
from .wal import WAL_FILE, WriteAheadLog
from .wal import encode as wal_encode

COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# When removed vectors make up this share of the index, it is rebuilt from the live ones
# (usearch marks removed nodes but keeps their memory and graph slots).
COMPACT_REMOVED_SHARE = 0.3


def check_name(name: str) -> str:
    if not isinstance(name, str) or not COLLECTION_NAME.match(name):
        raise InvalidInput(f"collection name {name!r} is invalid: use 1-64 letters, digits, '_', '-' "
                           "or '.', starting with a letter or digit")
    return name


# A collection's settings, fixed when it is created; a copy carries them (check_settings).
SETTINGS = ("index_dtype", "connectivity", "expansion_add", "expansion_search", "chunk_tokens", "chunk_overlap",
            "dim", "embed_model")
MAX_DIM = 65536


def check_settings(settings: dict) -> dict:
    """A collection's settings as create_collection makes them, or as a copy from elsewhere
    brings them (a backup sent to a server): InvalidInput naming the first one that is
    missing, unknown or out of range. Returns them without created_at (the new
    collection's own time is set when it is made)."""
    if not isinstance(settings, dict):
        raise InvalidInput(f"collection settings must be a JSON object, got {type(settings).__name__}")
    if missing := [k for k in SETTINGS if k not in settings]:
        raise InvalidInput(f"collection settings lack {', '.join(missing)}")
    if unknown := sorted(set(settings) - set(SETTINGS) - {"created_at"}):
        raise InvalidInput(f"collection settings have unknown keys {', '.join(map(repr, unknown))} "
                           f"(known: {', '.join(SETTINGS)}, created_at)")
    out = check_index_settings({k: settings[k] for k in SETTINGS})
    if isinstance(out["dim"], bool) or not isinstance(out["dim"], int) or not 1 <= out["dim"] <= MAX_DIM:
        raise InvalidInput(f"dim must be an integer in [1, {MAX_DIM}], got {out['dim']!r}")
    if not isinstance(out["embed_model"], str) or not out["embed_model"].strip():
        raise InvalidInput(f"embed_model must name the embedding model, got {out['embed_model']!r}")
    return out


def check_index_settings(settings: dict) -> dict:
    """The index and chunking settings of `settings` in range (InvalidInput otherwise)."""
    check_dtype(settings["index_dtype"])
    for key in ("connectivity", "expansion_add", "expansion_search", "chunk_tokens"):
        v = settings[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4096:
            raise InvalidInput(f"{key} must be an integer in [1, 4096], got {v!r}")
    v = settings["chunk_overlap"]
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < settings["chunk_tokens"]:
        raise InvalidInput(f"chunk_overlap must be in [0, chunk_tokens={settings['chunk_tokens']}), got {v!r}")
    return settings


@dataclasses.dataclass(frozen=True, slots=True)
class CollectionInfo:
    name: str
    documents: int
    chunks: int
    dim: int
    embed_model: str
    index_dtype: str
    connectivity: int
    expansion_add: int
    expansion_search: int
    chunk_tokens: int
    chunk_overlap: int
    disk_bytes: int
    index_memory_bytes: int


def _replay(store: Store, wal: WriteAheadLog) -> int:
    """Apply the log records past the store's snapshot; returns how many there were."""
    n = 0
    for rec in wal.records(after_seq=store.snapshot_seq):
        # Records the store already holds are rewritten to the same keys: a no-op.
        store.apply(rec.upserts, rec.deletes, first_key=rec.first_key, seq=rec.seq)
        n += 1
    return n


class Collection:
    """An open collection: store and index, plus (writer) its log and the writer lock.

    `read_only=False` takes the writer lock or raises WriterBusy naming its holder.
    """

    def __init__(self, name: str, folder: Path, config: Config, *, read_only: bool = False,
                 owner: dict | None = None, lock: WriterLock | None = None) -> None:
        self.name = name
        self.folder = folder
        self.config = config
        self.read_only = read_only
        self.write_lock = threading.Lock()  # writers within this process; a reader's refresh
        self.lock: WriterLock | None = None
        self.wal: WriteAheadLog | None = None
        self.replayed = 0
        if read_only:
            free = WriterLock.try_acquire(folder, owner)
            if free is not None:  # nobody writes: recover what a dead writer logged, then let go
                try:
                    store = Store(folder)
                    try:
                        wal = WriteAheadLog(folder / WAL_FILE, fsync=config.wal_fsync,
                                            interval_ms=config.wal_fsync_interval_ms)
                        self.replayed = _replay(store, wal)
                        wal.close()
                    finally:
                        store.close()
                finally:
                    free.release()
            self.store = Store(folder, read_only=True)
        else:
            self.lock = lock or WriterLock.acquire(folder, name, owner)
            try:
                self.store = Store(folder)
                self.wal = WriteAheadLog(folder / WAL_FILE, fsync=config.wal_fsync,
                                         interval_ms=config.wal_fsync_interval_ms)
                self.replayed = _replay(self.store, self.wal)
                # After a snapshot the log is empty; numbering goes on from what the store holds.
                self.wal.last_seq = max(self.wal.last_seq, self.store.applied_seq)
            except BaseException:
                self.lock.release()
                raise
        s = self.settings = self.store.settings
        self.index = VectorIndex.load(folder, ndim=s["dim"], dtype=s["index_dtype"],
                                      connectivity=s["connectivity"], expansion_add=s["expansion_add"],
                                      expansion_search=s["expansion_search"], threads=config.threads)
        generation = self.store.generation
        if self.index.generation != generation or len(self.index) != self.store.counts()[1]:
            # The index snapshot is older than the store (crash before a snapshot): catch up.
            self.index.sync(self.store.keys(), self.store.vectors(), generation)
        self.dirty = self.replayed > 0 and not read_only
        self.last_snapshot = time.monotonic()

    @property
    def quantized(self) -> bool:
        return self.index.dtype != "f32"

    def refresh(self) -> None:
        """A reader: bring the in-memory index up to the writer's last commit (no-op for a writer)."""
        if not self.read_only:
            return
        with self.write_lock:
            generation = self.store.generation
            if generation != self.index.generation:
                self.store.counts()
                self.index.sync(self.store.keys(), self.store.vectors(), generation)

    def _writable(self) -> None:
        if self.read_only:
            raise FailedPrecondition(f"collection {self.name!r} is open read-only here; writes go to its writer")

    def commit(self, records: Sequence[DocumentRecord], deletes: Sequence[str] = ()):
        """Log, then apply, one change; returns the store's Change. Caller holds write_lock.

        The change is acknowledged (durable per config.wal_fsync) once this returns. If the
        store cannot apply it, the log record is taken back and nothing changes.
        """
        self._writable()
        self.store.check(records)
        first_key = self.store.next_key
        seq = self.wal.append(wal_encode(first_key, records, deletes, self.store.dim))
        try:
            change = self.store.apply(records, deletes, first_key=first_key, seq=seq)
        except BaseException:
            self.wal.undo_last(seq)
            raise
        self.index.remove(change.removed_keys)
        self.index.add(change.added_keys, change.added_vectors)
        self.index.generation = change.generation
        self.dirty = True
        self.maybe_compact()
        if (self.wal.size_bytes() >= self.config.snapshot_wal_bytes
                or time.monotonic() - self.last_snapshot >= self.config.snapshot_interval_s):
            self._snapshot()
        return change

    def maybe_compact(self) -> bool:
        """Rebuild the index if removed vectors passed COMPACT_REMOVED_SHARE (caller holds write_lock)."""
        if self.index.removed_share < COMPACT_REMOVED_SHARE:
            return False
        self.index.rebuild(self.store.keys(), self.store.vectors())
        self.dirty = True
        return True

    def _snapshot(self) -> None:
        # The log first: everything up to here must be replayable before the store frees
        # the disk blocks of rows it no longer uses. Then the store (its snapshot point makes
        # every logged record up to it a no-op on replay), the index, and an empty log. A
        # crash anywhere in between recovers.
        self.wal.sync()
        self.store.checkpoint()
        if self.dirty:
            self.index.save(self.folder)
            self.dirty = False
        self.wal.reset()
        self.last_snapshot = time.monotonic()

    def snapshot(self) -> None:
        """Persist the store and index and empty the write-ahead log (writers only)."""
        if self.read_only:
            return
        with self.write_lock:
            if self.dirty or not self.wal.empty:
                self._snapshot()

    def info(self) -> CollectionInfo:
        s = self.settings
        docs, chunks = self.store.counts()
        return CollectionInfo(name=self.name, documents=docs, chunks=chunks, dim=s["dim"],
                              embed_model=s["embed_model"], index_dtype=s["index_dtype"],
                              connectivity=s["connectivity"], expansion_add=s["expansion_add"],
                              expansion_search=s["expansion_search"], chunk_tokens=s["chunk_tokens"],
                              chunk_overlap=s["chunk_overlap"], disk_bytes=self.store.size_bytes(),
                              index_memory_bytes=self.index.memory_bytes())

    def close(self) -> None:
        try:
            if self.wal is not None:
                self.wal.close()
            self.store.close()
        finally:
            if self.lock is not None:
                self.lock.release()


def read_only_refusal(name: str, holder: dict) -> str:
    """Why a read-only engine refuses to change collection `name`, naming its writer if any."""
    head = f"this engine is read-only (a replica); collection {name!r} cannot be changed here"
    if not holder.get("pid"):
        return f"{head}, and no process writes it now: write with `rag ingest` or a `rag serve` without --read-only"
    who = f"{holder.get('command') or 'another process'} (pid {holder['pid']}"
    who += f" on host {holder['host']})" if holder.get("host") else ")"
    if holder.get("address"):
        return f"{head}; its writer is {who}: send writes to {holder['address']}"
    return f"{head}; its writer is {who}"


class Collections:
    """The collections under `config.data_dir/collections`, each opened once per engine.

    An engine that writes (`read_only=False`) opens a collection as its writer; if another
    process writes it, reads still work through a reader and writes raise WriterBusy. A
    read-only engine (`rag search`, `rag serve --read-only`) opens readers only.
    """

    def __init__(self, config: Config, *, owner: dict | None = None) -> None:
        self.config = config
        self.owner = owner
        self.read_only = config.read_only
        self._open: dict[str, Collection] = {}
        self._retired: list[Collection] = []  # readers replaced by a writer; searches may still hold them
        self._lock = threading.RLock()

    @property
    def root(self) -> Path:
        return self.config.data_dir / "collections"

    def folder(self, name: str) -> Path:
        return self.root / check_name(name)

    def get(self, name: str, *, write: bool = False) -> Collection:
        """The open collection `name`, opened for writing if `write` (see the class docstring)."""
        folder = self.folder(name)
        with self._lock:
            col = self._open.get(name)
            if col is not None and (not write or not col.read_only):
                return col
            if not (folder / STORE_FILE).exists():
                raise NotFound(f"collection {name!r} does not exist; create it first "
                               "(rag ingest creates it, or use create_collection)")
            if write and self.read_only:
                raise FailedPrecondition(read_only_refusal(name, read_holder(folder)))
            lock = None if self.read_only else WriterLock.try_acquire(folder, self.owner)
            if lock is None and write:
                lock = WriterLock.acquire(folder, name, self.owner)  # WriterBusy naming the holder
            if lock is None:
                if col is not None:  # already reading beside another process's writer
                    return col
                col = Collection(name, folder, self.config, read_only=True, owner=self.owner)
            else:
                if col is not None:  # the other writer is gone: this reader's engine writes now
                    self._retired.append(col)
                col = Collection(name, folder, self.config, lock=lock)
            self._open[name] = col
            return col

    def create(self, name: str, settings: dict) -> None:
        """Create an empty collection with fixed `settings`; AlreadyExists if it exists."""
        self._make(name, settings)

    def build(self, name: str, settings: dict, batches: Iterable[Sequence[DocumentRecord]],
              progress: Callable[[int], None] | None = None) -> None:
        """Create collection `name` with `settings`, holding the records of `batches` (a copy
        of another collection), committed as a writer commits any write and snapshotted
        before it is renamed into place: a failure leaves nothing behind and no one sees it
        half built. AlreadyExists if it exists."""
        def fill(folder: Path) -> None:
            col = Collection(name, folder, self.config, owner=self.owner)
            try:
                done = 0
                for records in batches:
                    with col.write_lock:
                        col.commit(records)
                    done += len(records)
                    if progress:
                        progress(done)
                col.snapshot()
            finally:
                col.close()
        self._make(name, settings, fill)

    def receive(self, name: str, settings: dict, batches: Iterable[Sequence[DocumentRecord]],
                progress: Callable[[int], None] | None = None) -> None:
        """build() from a collection sent from elsewhere (a backup, another server's export):
        its settings and every record checked as they arrive (check_settings,
        store.checked_records); a bad one fails the build, which leaves nothing."""
        settings = check_settings(settings)
        self.build(name, {**settings, "created_at": time.time()}, checked_records(batches, settings["dim"]),
                   progress)

    def _make(self, name: str, settings: dict, fill: Callable[[Path], None] | None = None) -> None:
        """Build a collection in a hidden folder (`fill` adding its contents) and rename it
        into place: a half-created collection is never listed, and a failed one is removed."""
        if self.read_only:
            raise FailedPrecondition("this engine is read-only; collections cannot be created here")
        final = self.folder(name)
        if final.exists():
            raise AlreadyExists(f"collection {name!r} already exists")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            Store.initialise(tmp, settings)
            if fill is not None:
                fill(tmp)
            with self._lock:
                if final.exists():
                    raise AlreadyExists(f"collection {name!r} already exists")
                tmp.rename(final)
                fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def names(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if not p.name.startswith(".") and (p / STORE_FILE).exists())

    def drop(self, name: str) -> None:
        col = self.get(name, write=True)
        with self._lock, col.write_lock:
            col.close()
            del self._open[name]
            trash = self.root / f".drop-{name}-{uuid.uuid4().hex[:8]}"
            col.folder.rename(trash)  # atomic: the collection is gone from listings at once
            fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)

    def opened(self) -> list[Collection]:
        with self._lock:
            return list(self._open.values())

    def close(self) -> None:
        with self._lock:
            for col in [*self._open.values(), *self._retired]:
                col.close()
            self._open.clear()
            self._retired.clear()


__all__ = ["COLLECTION_NAME", "Collection", "CollectionInfo", "Collections", "WriterBusy", "check_name",
           "check_index_settings", "check_settings"]
