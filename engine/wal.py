"""Per-collection write-ahead log: every acknowledged ingest/delete, before it is applied.

usearch has no log of its own and the store is only made durable at snapshots, so this
file is what a write's acknowledgement rests on. A collection commits a change by
appending one record here (and syncing it, per the fsync policy), then applying it to the
store and the index. A snapshot (engine/pipeline.py `Collection.snapshot`) makes the store
and index durable, records the last sequence number they hold, and empties the log.
Recovery replays every record past that number; replaying is idempotent because a record
carries the chunk keys it was given, so a record the store already holds is rewritten to
the same rows.

File layout (little-endian):
  header   8 bytes  b"RAGWAL1\\n"
  record  20 bytes  magic b"RWR1", seq u64, payload length u32, crc32(seq bytes + payload) u32
          payload   u32 JSON length, JSON (op, first_key, documents, chunks, deletes),
                    then the float32 vectors of every upserted chunk, row after row

A record cut short by a crash (short header, short payload, bad checksum, or a sequence
number that does not follow the previous one) ends the log: it and anything after it are
dropped and the file is truncated there. Such a record was never acknowledged under the
default policy, because the write is acknowledged only after the record is synced.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .chunk import Chunk
from .errors import InvalidInput
from .config import WAL_FSYNC_POLICIES as FSYNC_POLICIES
from .fsutil import fsync_dir, temp_path

log = logging.getLogger(__name__)

WAL_FILE = "wal.log"
FILE_MAGIC = b"RAGWAL1\n"
RECORD_MAGIC = b"RWR1"
_HEADER = struct.Struct("<4sQII")
_SEQ = struct.Struct("<Q")
_JSON_LEN = struct.Struct("<I")
MAX_RECORD_BYTES = 1 << 31  # a batch is bounded far below this (engine/pipeline.py INGEST_BATCH_*)

# When the log is synced to disk before a write is acknowledged:
#   batch     every commit (one ingest batch or delete): nothing acknowledged is lost, even on power loss
#   interval  at most every `interval_ms`: a power loss may lose that window; a process crash loses nothing
#   off       left to the OS: a process crash loses nothing, a power loss may lose recent writes


@dataclasses.dataclass(frozen=True, slots=True)
class LoggedDocument:
    """An upserted document as the log holds it (what the store needs to re-apply it)."""

    doc_id: str
    source: str
    content_hash: str
    metadata: dict
    n_chars: int
    chunks: list[Chunk]
    vectors: np.ndarray


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One logged change: upserts (chunk keys first_key, first_key+1, ...) and deletes."""

    seq: int
    first_key: int
    upserts: list[LoggedDocument]
    deletes: list[str]


def encode(first_key: int, upserts: Sequence, deletes: Sequence[str], dim: int) -> bytes:
    """Payload bytes of a change; `upserts` are engine.store.DocumentRecord-like objects."""
    head = {
        "op": "apply", "first_key": int(first_key), "dim": int(dim), "deletes": list(deletes),
        "upserts": [{"doc_id": r.doc_id, "source": r.source, "content_hash": r.content_hash,
                     "metadata": r.metadata, "n_chars": r.n_chars,
                     "chunks": [[c.ordinal, c.start, c.end, c.n_tokens, c.text] for c in r.chunks]}
                    for r in upserts],
    }
    body = json.dumps(head, ensure_ascii=False, separators=(",", ":")).encode()
    vecs = [np.ascontiguousarray(r.vectors, dtype="<f4").tobytes() for r in upserts]
    return b"".join([_JSON_LEN.pack(len(body)), body, *vecs])


def decode(seq: int, payload: bytes) -> Record:
    (n,) = _JSON_LEN.unpack_from(payload, 0)
    head = json.loads(payload[4:4 + n])
    dim = int(head["dim"])
    offset = 4 + n
    docs = []
    for d in head["upserts"]:
        chunks = [Chunk(d["doc_id"], *c) for c in d["chunks"]]
        size = len(chunks) * dim * 4
        vectors = np.frombuffer(payload, dtype="<f4", count=len(chunks) * dim, offset=offset)
        docs.append(LoggedDocument(d["doc_id"], d["source"], d["content_hash"], d["metadata"], d["n_chars"],
                                   chunks, vectors.reshape(len(chunks), dim).astype(np.float32)))
        offset += size
    return Record(seq, int(head["first_key"]), docs, list(head["deletes"]))


class WriteAheadLog:
    """Append-only record file of one collection. Callers serialise writes (the collection's
    write lock); a small lock still guards the file so `size_bytes` may be read any time."""

    def __init__(self, path: Path, *, fsync: str = "batch", interval_ms: float = 100.0) -> None:
        if fsync not in FSYNC_POLICIES:
            raise InvalidInput(f"wal fsync policy must be one of {FSYNC_POLICIES}, got {fsync!r}")
        self.path = Path(path)
        self.policy = fsync
        self.interval_s = interval_ms / 1000.0
        self._lock = threading.Lock()
        self.dropped_bytes = 0  # torn tail found (and cut) when the log was opened
        if not self.path.exists():
            self._write_empty(self.path)
        self.last_seq, self._end = self._scan_and_repair()
        self._fd = os.open(self.path, os.O_WRONLY)
        self._last_record_start = self._end
        self._last_sync = time.monotonic()
        self._unsynced = False

    # ------------------------------------------------------------------ reading
    def _iter_raw(self, f) -> Iterator[tuple[int, int, bytes]]:
        """(offset, seq, payload) of each whole record; stops at the first bad one."""
        prev = None
        while True:
            offset = f.tell()
            head = f.read(_HEADER.size)
            if not head:
                return
            if len(head) < _HEADER.size:
                return
            magic, seq, length, crc = _HEADER.unpack(head)
            if magic != RECORD_MAGIC or length > MAX_RECORD_BYTES or (prev is not None and seq <= prev):
                return
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))) != crc:
                return
            prev = seq
            yield offset, seq, payload

    def _scan_and_repair(self) -> tuple[int, int]:
        """Find the end of the last whole record; cut anything after it (a torn write)."""
        last, end = 0, len(FILE_MAGIC)
        with open(self.path, "rb") as f:
            if f.read(len(FILE_MAGIC)) != FILE_MAGIC:
                raise InvalidInput(f"{self.path} is not a write-ahead log of this engine")
            for offset, seq, payload in self._iter_raw(f):
                last, end = seq, f.tell()
            size = os.fstat(f.fileno()).st_size
        if size > end:
            self.dropped_bytes = size - end
            log.warning("%s: dropped a torn or corrupt tail of %d bytes after record %d (never acknowledged "
                        "under fsync policy 'batch')", self.path, size - end, last)
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        return last, end

    def records(self, after_seq: int = 0) -> Iterator[Record]:
        """Decoded records with seq > after_seq, read from disk one at a time."""
        with self._lock, open(self.path, "rb") as f:
            f.seek(len(FILE_MAGIC))
            for offset, seq, payload in self._iter_raw(f):
                if offset >= self._end:
                    return
                if seq > after_seq:
                    yield decode(seq, payload)

    # ------------------------------------------------------------------ writing
    def append(self, payload: bytes, seq: int | None = None) -> int:
        """Append one record (seq: next after last_seq unless given) and sync it per the policy."""
        with self._lock:
            seq = self.last_seq + 1 if seq is None else int(seq)
            if seq <= self.last_seq:
                raise ValueError(f"sequence number {seq} does not follow {self.last_seq}")
            crc = zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq)))
            data = _HEADER.pack(RECORD_MAGIC, seq, len(payload), crc) + payload
            view = memoryview(data)
            pos = self._end
            while view:
                n = os.pwrite(self._fd, view, pos)
                view, pos = view[n:], pos + n
            self._last_record_start = self._end
            self._end = pos
            self.last_seq = seq
            self._unsynced = True
            if self.policy == "batch" or (self.policy == "interval"
                                          and time.monotonic() - self._last_sync >= self.interval_s):
                self._sync()
            return seq

    def undo_last(self, seq: int) -> None:
        """Take back record `seq` (the last appended) after it could not be applied: the
        write fails as a whole and is not replayed later."""
        with self._lock:
            if seq != self.last_seq:
                raise ValueError(f"can only undo the last record ({self.last_seq}), not {seq}")
            os.ftruncate(self._fd, self._last_record_start)
            self._end = self._last_record_start
            self.last_seq = seq - 1
            self._sync()

    def _sync(self) -> None:
        os.fdatasync(self._fd)
        self._last_sync = time.monotonic()
        self._unsynced = False

    def sync(self) -> None:
        with self._lock:
            if self._unsynced:
                self._sync()

    def size_bytes(self) -> int:
        with self._lock:
            return self._end

    @property
    def empty(self) -> bool:
        with self._lock:
            return self._end <= len(FILE_MAGIC)

    def reset(self) -> None:
        """Start an empty log (after a snapshot holds everything in it). Atomic: a crash leaves
        either the old log, whose records the snapshot makes no-ops, or the empty one."""
        with self._lock:
            tmp = temp_path(self.path)
            self._write_empty(tmp)  # synced
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY)
            self._end = self._last_record_start = len(FILE_MAGIC)
            self._unsynced = False

    @staticmethod
    def _write_empty(path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, FILE_MAGIC)
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                if self._unsynced:
                    self._sync()
                os.close(self._fd)
                self._fd = -1
