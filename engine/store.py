"""Per-collection storage of documents, chunks and their exact float32 vectors.

A collection lives in one folder:
  store.sqlite   SQLite in WAL mode: settings, documents, chunk text/spans/metadata
  vectors.f32    raw float32 rows, row number = chunk key (what the rescoring kernel reads)
  wal.log        the collection's write-ahead log (engine/wal.py)
  index.usearch  the HNSW index (engine/index.py), rebuilt from the two above if stale

Every change is one SQLite transaction that also records the log sequence number it
applies (`applied_seq`). New vectors are written to rows past the committed `next_key`
before that transaction commits, so a crash leaves either the old state or the new one,
never a chunk without its vector. Durability comes from the write-ahead log: the store is
synced only at snapshots (`checkpoint`), which record `snapshot_seq`, the point from which
recovery replays the log.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .errors import InvalidInput, NotFound

STORE_FILE = "store.sqlite"
VECTORS_FILE = "vectors.f32"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    metadata TEXT NOT NULL,
    n_chars INTEGER NOT NULL,
    n_chunks INTEGER NOT NULL,
    ingested_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    key INTEGER PRIMARY KEY,
    doc_id TEXT NOT NULL REFERENCES documents(doc_id),
    ordinal INTEGER NOT NULL,
    start INTEGER NOT NULL,
    end INTEGER NOT NULL,
    n_tokens INTEGER NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
"""

# Full-text index of chunk text for the lexical (BM25) half of hybrid search. External
# content: the text is stored once, in `chunks`; triggers keep the index in step inside
# the same transactions, so it can never disagree with the chunks.
_FTS_SCHEMA = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, content='chunks', content_rowid='key', "
    "tokenize='porter unicode61 remove_diacritics 2')",
    "CREATE TRIGGER IF NOT EXISTS chunks_fts_insert AFTER INSERT ON chunks BEGIN "
    "INSERT INTO chunks_fts(rowid, text) VALUES (new.key, new.text); END",
    "CREATE TRIGGER IF NOT EXISTS chunks_fts_delete AFTER DELETE ON chunks BEGIN "
    "INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.key, old.text); END",
)
_WORD = re.compile(r"\w+")
# Words too common to rank by; left out of lexical queries so they stay fast on large
# collections (BM25 gives them almost no weight anyway).
_STOPWORDS = frozenset("""a an and are as at be but by did do does for from had has have how i in is it its
of on or that the their then there these this to was were what when where which who whom whose why will
with you your""".split())
MAX_QUERY_TERMS = 64
# Query words found in more than this share of chunks are left out of the lexical query
# (while rarer ones remain): BM25 gives them little weight, and their long posting lists
# are most of what a query costs.
COMMON_TERM_SHARE = 0.2
PRUNE_MIN_CHUNKS = 1000  # below this, every query word is cheap enough to keep


def query_words(text: str) -> list[str]:
    """The text's distinct words for a lexical query, stopwords left out."""
    words = dict.fromkeys(w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS)
    return list(words)[:MAX_QUERY_TERMS]


def fts_query(text: str | list[str]) -> str:
    """An FTS5 query matching any of the words (quoted: no query syntax gets through)."""
    words = query_words(text) if isinstance(text, str) else text
    return " OR ".join(f'"{w}"' for w in words)


@dataclasses.dataclass(frozen=True, slots=True)
class DocumentRecord:
    """A document ready to store: its chunks (ordinal order) and their unit vectors."""

    doc_id: str
    source: str
    content_hash: str
    metadata: dict
    n_chars: int
    chunks: Sequence  # engine.chunk.Chunk
    vectors: np.ndarray  # (len(chunks), dim) float32


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkRow:
    key: int
    doc_id: str
    source: str
    ordinal: int
    start: int
    end: int
    n_tokens: int
    text: str
    metadata: dict


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """Keys a committed write added and removed, for the index to follow."""

    added_keys: np.ndarray
    added_vectors: np.ndarray
    removed_keys: np.ndarray
    generation: int


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_BLOCK = 4096


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks of a file range (Linux fallocate); reads of it give zeros.
    False where the OS or file system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    return fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """SQLite + vector file of one collection. Thread-safe: one lock serialises access."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        db = self.folder / STORE_FILE
        if not db.exists():
            raise NotFound(f"no store at {db}")
        self._lock = threading.RLock()
        self._db = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit is not synced (the write-ahead log already is); checkpoints are.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # Stores made before the write-ahead log lack these rows.
        self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('applied_seq', '0')")
        self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('snapshot_seq', '0')")
        self.lexical = self._ensure_fts()
        self.settings = json.loads(self._meta("settings"))
        self.dim = int(self.settings["dim"])
        self._vec_path = self.folder / VECTORS_FILE
        self._vec_fd = os.open(self._vec_path, os.O_RDWR | os.O_CREAT, 0o644)
        self._mapped: np.ndarray | None = None
        self._local = threading.local()
        self._n_chunks = int(self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])
        self._df: dict[str, int] = {}
        self._df_n = self._n_chunks
        self._readers: list[sqlite3.Connection] = []
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _ensure_fts(self) -> bool:
        """Create the full-text index if missing (older stores: built from the chunks once).
        False if this SQLite lacks FTS5: search is then dense only."""
        have = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunks_fts'").fetchone()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _FTS_SCHEMA:
                self._db.execute(stmt)
            if not have:
                self._db.execute("INSERT INTO chunks_fts(chunks_fts) VALUES ('rebuild')")
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            self._db.execute("ROLLBACK")
            if "fts5" in str(e):
                return False
            raise
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return True

    # ------------------------------------------------------------------ creation
    @staticmethod
    def initialise(folder: Path, settings: dict) -> None:
        """Create the SQLite schema and settings in an empty folder."""
        db = sqlite3.connect(Path(folder) / STORE_FILE, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            db.execute("BEGIN")
            for k, v in (("settings", json.dumps(settings, sort_keys=True)), ("next_key", "0"),
                         ("generation", "0"), ("schema_version", str(SCHEMA_VERSION)),
                         ("applied_seq", "0"), ("snapshot_seq", "0")):
                db.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (k, v))
            db.execute("COMMIT")
        finally:
            db.close()
        (Path(folder) / VECTORS_FILE).touch()

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            for con in self._readers:
                con.close()
            self._readers.clear()
            self._mapped = None
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._vec_fd >= 0:
                os.close(self._vec_fd)
                self._vec_fd = -1

    # ------------------------------------------------------------------ meta
    def _meta(self, key: str) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0]

    @property
    def generation(self) -> int:
        with self._lock:
            return int(self._meta("generation"))

    @property
    def next_key(self) -> int:
        """The key the next new chunk gets (keys are never reused)."""
        with self._lock:
            return int(self._meta("next_key"))

    @property
    def applied_seq(self) -> int:
        """Sequence number of the last write-ahead log record applied."""
        with self._lock:
            return int(self._meta("applied_seq"))

    @property
    def snapshot_seq(self) -> int:
        """Everything up to this log record is durable in the store (see `checkpoint`)."""
        with self._lock:
            return int(self._meta("snapshot_seq"))

    def counts(self) -> tuple[int, int]:
        """(documents, chunks)."""
        with self._lock:
            d = self._db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
            c = self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
            return int(d), int(c)

    # ------------------------------------------------------------------ reads
    def hashes(self, doc_ids: Sequence[str]) -> dict[str, str]:
        """content_hash of each stored doc among `doc_ids`."""
        out: dict[str, str] = {}
        with self._lock:
            for i in range(0, len(doc_ids), 500):
                part = list(doc_ids[i:i + 500])
                q = f"SELECT doc_id, content_hash FROM documents WHERE doc_id IN ({','.join('?' * len(part))})"
                out.update(self._db.execute(q, part).fetchall())
        return out

    def keys(self) -> np.ndarray:
        with self._lock:
            rows = self._db.execute("SELECT key FROM chunks ORDER BY key").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def document_keys(self, doc_id: str) -> list[int]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT key FROM chunks WHERE doc_id = ? ORDER BY ordinal", (doc_id,))]

    def has_document(self, doc_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM documents WHERE doc_id = ?", (doc_id,)).fetchone() is not None

    def chunks(self, keys: Iterable[int]) -> dict[int, ChunkRow]:
        """Chunk rows (with their document's source and metadata) by key."""
        keys = [int(k) for k in keys]
        out: dict[int, ChunkRow] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                part = keys[i:i + 500]
                q = ("SELECT c.key, c.doc_id, d.source, c.ordinal, c.start, c.end, c.n_tokens, c.text, "
                     "d.metadata FROM chunks c JOIN documents d ON c.doc_id = d.doc_id "
                     f"WHERE c.key IN ({','.join('?' * len(part))})")
                for row in self._db.execute(q, part):
                    out[row[0]] = ChunkRow(*row[:8], json.loads(row[8]))
        return out

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection. Full-text queries run on these, outside the
        store lock: SQLite releases the GIL while it works, so server threads (and the
        workers of one batch) rank in parallel, each on the last committed state."""
        con = getattr(self._local, "db", None)
        if con is None:
            con = sqlite3.connect(f"file:{self.folder / STORE_FILE}?mode=ro", uri=True, check_same_thread=False)
            con.execute("PRAGMA query_only=1")
            self._local.db = con
            with self._lock:
                self._readers.append(con)
        return con

    def _doc_freq(self, con: sqlite3.Connection, word: str) -> int:
        """Chunks containing `word` (cached; the cache is dropped when the collection's size
        has changed by a fifth, so shares stay about right)."""
        n = self._n_chunks
        if abs(n - self._df_n) > 0.2 * max(self._df_n, 1):
            self._df, self._df_n = {}, n
        df = self._df.get(word)
        if df is None:
            df = con.execute("SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH ?", (f'"{word}"',)).fetchone()[0]
            self._df[word] = df
        return df

    def _lexical_one(self, query: str, k: int) -> np.ndarray:
        words = query_words(query) if self.lexical else []
        if not words:
            return np.empty(0, np.int64)
        con = self._reader()
        if len(words) > 1 and self._n_chunks >= PRUNE_MIN_CHUNKS:
            limit = COMMON_TERM_SHARE * self._n_chunks
            df = {w: self._doc_freq(con, w) for w in words}
            rare = [w for w in words if df[w] <= limit]
            words = rare or sorted(words, key=df.__getitem__)[:2]
        expr = fts_query(words)
        rows = con.execute("SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY rank LIMIT ?",
                                      (expr, int(k))).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def lexical_search(self, queries: Sequence[str], k: int, *, threads: int = 1) -> list[np.ndarray]:
        """Chunk keys per query, best BM25 first (at most k; empty without FTS5 or words).
        A batch is split over `threads` workers."""
        if threads <= 1 or len(queries) < 2 * threads:
            return [self._lexical_one(q, k) for q in queries]
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="rag-fts")
        step = -(-len(queries) // threads)
        parts = self._pool.map(lambda i: [self._lexical_one(q, k) for q in queries[i:i + step]],
                               range(0, len(queries), step))
        return [keys for part in parts for keys in part]

    def vectors(self) -> np.ndarray:
        """All committed vector rows as a read-only (next_key, dim) float32 array (memory map)."""
        with self._lock:
            rows = int(self._meta("next_key"))
            if self._mapped is None or self._mapped.shape[0] < rows:
                if rows == 0:
                    return np.empty((0, self.dim), dtype=np.float32)
                mm = np.memmap(self._vec_path, dtype=np.float32, mode="r", shape=(rows, self.dim))
                self._mapped = np.asarray(mm)
            return self._mapped[:rows]

    def size_bytes(self) -> int:
        """Disk space the collection's files take (allocated blocks: freed rows do not count)."""
        return sum(p.stat().st_blocks * 512 for p in self.folder.iterdir() if p.is_file())

    def reclaim(self) -> int:
        """Free the disk blocks of vector rows no chunk uses any more (replaced or deleted
        chunks); returns the bytes of whole blocks freed. Keys never move, so searches running
        meanwhile stay correct: a dead row they might still read comes back as zeros and its
        chunk is gone from the store."""
        with self._lock:
            n = int(self._meta("next_key"))
            dead = np.ones(n + 1, dtype=bool)
            dead[self.keys()] = False
            dead[n] = False  # sentinel: every run ends
            row = self.dim * 4
            edges = np.flatnonzero(np.diff(np.concatenate([[False], dead]).astype(np.int8)))
            freed = 0
            for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist()):
                start = -(-a * row // _BLOCK) * _BLOCK
                end = b * row // _BLOCK * _BLOCK
                if end > start:
                    if not punch_hole(self._vec_fd, start, end - start):
                        return freed
                    freed += end - start
            return freed

    # ------------------------------------------------------------------ writes
    def check(self, upserts: Sequence[DocumentRecord]) -> None:
        """Raise InvalidInput if a record cannot be stored (before it is logged)."""
        for rec in upserts:
            if rec.vectors.shape != (len(rec.chunks), self.dim):
                raise InvalidInput(f"document {rec.doc_id!r}: vectors shape {rec.vectors.shape} does "
                                   f"not match {len(rec.chunks)} chunks x dim {self.dim}")

    def apply(self, upserts: Sequence[DocumentRecord], deletes: Sequence[str] = (), *,
              first_key: int | None = None, seq: int | None = None) -> Change:
        """Replace or insert documents and delete others, all in one transaction.

        New chunks get keys first_key, first_key + 1, ... (default: next_key). Replaying a
        logged change passes the keys it was given, so applying it twice writes the same rows.
        `seq` is the write-ahead log record this applies.
        """
        self.check(upserts)
        with self._lock:
            next_key = int(self._meta("next_key"))
            first = next_key if first_key is None else int(first_key)
            n_new = sum(len(r.chunks) for r in upserts)
            added = np.arange(first, first + n_new, dtype=np.int64)
            vectors = (np.concatenate([r.vectors for r in upserts]).astype(np.float32, copy=False)
                       if n_new else np.empty((0, self.dim), np.float32))
            if n_new:
                # Rows past next_key are invisible until the transaction below commits.
                data = np.ascontiguousarray(vectors).tobytes()
                written = os.pwrite(self._vec_fd, data, first * self.dim * 4)
                if written != len(data):
                    raise OSError(f"short write to {self._vec_path}: {written} of {len(data)} bytes")
            removed: list[int] = []
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                for doc_id in [*deletes, *(r.doc_id for r in upserts)]:
                    removed.extend(r[0] for r in db.execute("SELECT key FROM chunks WHERE doc_id = ?", (doc_id,)))
                    db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
                    db.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))
                key = first
                for rec in upserts:
                    db.execute("INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (rec.doc_id, rec.source, rec.content_hash,
                                json.dumps(rec.metadata, sort_keys=True, ensure_ascii=False),
                                rec.n_chars, len(rec.chunks), now))
                    db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)",
                                   [(key + i, rec.doc_id, c.ordinal, c.start, c.end, c.n_tokens, c.text)
                                    for i, c in enumerate(rec.chunks)])
                    key += len(rec.chunks)
                generation = int(self._meta("generation")) + 1
                db.execute("UPDATE meta SET value = ? WHERE key = 'next_key'", (str(max(key, next_key)),))
                db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(generation),))
                if seq is not None:
                    db.execute("UPDATE meta SET value = ? WHERE key = 'applied_seq'", (str(seq),))
                db.execute("COMMIT")
                self._n_chunks += n_new - len(removed)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return Change(added, vectors, np.asarray(removed, dtype=np.int64), generation)

    def checkpoint(self) -> int:
        """Make everything applied durable and record it as the snapshot point; returns it.

        Order matters: vector rows are synced before the snapshot point is written, and
        SQLite's checkpoint syncs its log, then the database, after it.
        """
        with self._lock:
            self.reclaim()
            os.fsync(self._vec_fd)
            seq = int(self._meta("applied_seq"))
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'snapshot_seq'", (str(seq),))
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy:
                # Cannot happen with this one connection; fall back to a synced commit.
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'snapshot_seq'", (str(seq),))
                self._db.execute("PRAGMA synchronous=NORMAL")
            return seq
