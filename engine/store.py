"""Per-collection storage of documents, chunks and their exact float32 vectors.

A collection lives in one folder:
  store.sqlite   SQLite in WAL mode: settings, documents, chunk text/spans/metadata
  vectors.f32    raw float32 rows, row number = chunk key (engine/vectors.py)
  wal.log        the collection's write-ahead log (engine/wal.py)
  index.usearch  the HNSW index (engine/index.py), rebuilt from the two above if stale
  writer.lock    held by the one process that may write the collection (engine/lock.py)
The store's FTS5 full-text index of chunk text lives in store.sqlite (engine/lexical.py),
as does the metadata index (`doc_meta`) through which filters find their documents.

Every change is one SQLite transaction that also records the log sequence number it
applies (`applied_seq`). New vectors are written to rows past the committed `next_key`
before that transaction commits, so a crash leaves either the old state or the new one,
never a chunk without its vector. Durability comes from the write-ahead log: the store is
synced only at snapshots (`checkpoint`), which record `snapshot_seq`, the point from which
recovery replays the log.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .chunk import Chunk
from .errors import InvalidInput, NotFound, Unavailable
from .filters import LIST_OPS, LOGICAL_OPS, META_INDEX_MAX_CHARS, RANGE_OPS, check_filter, fields, matches, meta_rows
from .lexical import LexicalIndex, ensure_fts, has_fts
from .vectors import VectorFile

STORE_FILE = "store.sqlite"
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
# The metadata index: one row per (field, value, document), values as filters compare them
# (engine/filters.py meta_str) and, where they read as numbers, as numbers (for ranges), so a
# filter finds its documents without reading the others' metadata; and which documents have
# a value too long for it, per field; and the elements of list values (doc_meta_item), which
# $contains finds through doc_meta_any beside the values that are not lists.
META_INDEX_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS doc_meta (field TEXT NOT NULL, value TEXT NOT NULL, doc_id TEXT NOT NULL, "
    "num REAL, PRIMARY KEY (field, value, doc_id)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS doc_meta_doc ON doc_meta(doc_id)",
    "CREATE INDEX IF NOT EXISTS doc_meta_num ON doc_meta(field, num) WHERE num IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS doc_meta_long (field TEXT NOT NULL, doc_id TEXT NOT NULL, "
    "PRIMARY KEY (field, doc_id)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS doc_meta_long_doc ON doc_meta_long(doc_id)",
    "CREATE TABLE IF NOT EXISTS doc_meta_item (field TEXT NOT NULL, value TEXT NOT NULL, doc_id TEXT NOT NULL, "
    "PRIMARY KEY (field, value, doc_id)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS doc_meta_item_doc ON doc_meta_item(doc_id)",
    "CREATE VIEW IF NOT EXISTS doc_meta_any AS SELECT field, value, doc_id FROM doc_meta "
    "UNION ALL SELECT field, value, doc_id FROM doc_meta_item",
)


RANGE_SQL = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


def _alias(terms: str, alias: str) -> str:
    return terms.replace("x.", f"{alias}.")


# 2: rows for dotted paths into nested objects too (engine/filters.py paths).
# 3: the elements of list values (doc_meta_item), and paths into the objects of lists.
META_INDEX_VERSION = "3"
META_INDEX_TABLES = ("doc_meta", "doc_meta_long", "doc_meta_item")


def _meta_tables(db: sqlite3.Connection) -> bool:
    """Whether the metadata index's tables are there, doc_meta with numbers (since ranges)."""
    return ("num" in {r[1] for r in db.execute("PRAGMA table_info(doc_meta)")} and
            all(db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (t,)).fetchone() is not None
                for t in (*META_INDEX_TABLES, "doc_meta_any")))


def has_meta_index(db: sqlite3.Connection) -> bool:
    """Whether the store has the metadata index as this version writes it."""
    version = db.execute("SELECT value FROM meta WHERE key = 'meta_index_version'").fetchone()
    return version is not None and version[0] == META_INDEX_VERSION and _meta_tables(db)


def insert_meta(db: sqlite3.Connection, doc_id: str, metadata: dict) -> None:
    rows, long, items = meta_rows(doc_id, metadata)
    db.executemany("INSERT INTO doc_meta VALUES (?, ?, ?, ?)", rows)
    db.executemany("INSERT INTO doc_meta_long VALUES (?, ?)", long)
    db.executemany("INSERT INTO doc_meta_item VALUES (?, ?, ?)", items)


def ensure_meta_index(db: sqlite3.Connection) -> None:
    """Create the metadata index if missing or older than this version's (older stores,
    indexes from before ranges, dotted paths or list elements): built from the documents once."""
    if has_meta_index(db):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("DROP VIEW IF EXISTS doc_meta_any")
        for table in META_INDEX_TABLES:
            db.execute(f"DROP TABLE IF EXISTS {table}")
        for sql in META_INDEX_SCHEMA:
            db.execute(sql)
        cur = db.execute("SELECT doc_id, metadata FROM documents")
        while rows := cur.fetchmany(1000):  # a page at a time: never every document's metadata at once
            for doc_id, metadata in rows:
                insert_meta(db, doc_id, json.loads(metadata))
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('meta_index_version', ?)", (META_INDEX_VERSION,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


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


# How far from 1 a received vector's length may be (a float32 unit vector is within ~1e-6).
UNIT_TOLERANCE = 1e-3


def check_record(rec: DocumentRecord, dim: int) -> None:
    """Raise InvalidInput unless `rec` is a document as this engine stores one: for records
    from outside (a backup sent to a server). A non-empty id; source and content hash as
    text; metadata a JSON object; chunks numbered 0, 1, ... in order, each inside the
    document with text as long as its span; one finite unit vector of `dim` floats a chunk."""
    doc_id = rec.doc_id
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise InvalidInput("a document's id is empty; every document needs one")
    where = f"document {doc_id!r}"
    if not isinstance(rec.source, str):
        raise InvalidInput(f"{where}: source must be text")
    if not isinstance(rec.content_hash, str) or not rec.content_hash:
        raise InvalidInput(f"{where}: content_hash is empty")
    if not isinstance(rec.metadata, dict):
        raise InvalidInput(f"{where}: metadata must be a JSON object")
    try:
        json.dumps(rec.metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{where}: metadata is not JSON ({e})") from None
    n_chars = rec.n_chars
    if isinstance(n_chars, bool) or not isinstance(n_chars, int) or n_chars < 1:
        raise InvalidInput(f"{where}: its size in characters must be a positive integer, got {n_chars!r}")
    if not rec.chunks:
        raise InvalidInput(f"{where} has no chunks; a stored document has at least one")
    last_start = 0
    for i, c in enumerate(rec.chunks):
        spans = (c.ordinal, c.start, c.end, c.n_tokens)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in spans):
            raise InvalidInput(f"{where}, chunk {i}: ordinal, start, end and tokens must be integers")
        if c.doc_id != doc_id or c.ordinal != i:
            raise InvalidInput(f"{where}, chunk {i}: it names document {c.doc_id!r}, ordinal {c.ordinal}; "
                               "a document's chunks are its own, numbered 0, 1, ... in order")
        if not last_start <= c.start < c.end <= n_chars:
            raise InvalidInput(f"{where}, chunk {i}: span [{c.start}, {c.end}) is not inside the document's "
                               f"{n_chars} characters after the previous chunk's start {last_start}")
        last_start = c.start
        if not isinstance(c.text, str) or len(c.text) != c.end - c.start or "\x00" in c.text:
            raise InvalidInput(f"{where}, chunk {i}: its text must be the {c.end - c.start} characters of its span "
                               "(no NUL characters)")
        if c.n_tokens < 1:
            raise InvalidInput(f"{where}, chunk {i}: tokens must be >= 1, got {c.n_tokens}")
    v = rec.vectors
    if not isinstance(v, np.ndarray) or v.shape != (len(rec.chunks), dim):
        raise InvalidInput(f"{where}: vectors must be {len(rec.chunks)} chunks x {dim} floats, got "
                           f"{getattr(v, 'shape', type(v).__name__)}")
    if not np.all(np.isfinite(v)):
        raise InvalidInput(f"{where}: a vector holds NaN or infinity")
    norms = np.linalg.norm(v.astype(np.float64), axis=1)
    if (bad := np.flatnonzero(np.abs(norms - 1) > UNIT_TOLERANCE)).size:
        raise InvalidInput(f"{where}, chunk {int(bad[0])}: its vector has length {norms[bad[0]]:.4g}; stored "
                           "vectors are unit length (as the embedder makes them)")


def checked_records(batches: Iterable[Sequence[DocumentRecord]], dim: int) -> Iterator[list[DocumentRecord]]:
    """`batches` with every record checked (check_record) and each document id once."""
    seen: set[str] = set()
    for batch in batches:
        batch = list(batch)
        for rec in batch:
            check_record(rec, dim)
            if rec.doc_id in seen:
                raise InvalidInput(f"document {rec.doc_id!r} comes twice; a collection holds each id once")
            seen.add(rec.doc_id)
        yield batch


@dataclasses.dataclass(frozen=True, slots=True)
class StoredDocument:
    """What the store holds about a document besides its chunks (Engine.list_documents)."""

    doc_id: str
    source: str
    content_hash: str
    metadata: dict
    n_chars: int
    n_chunks: int
    ingested_at: float  # unix seconds of the write that stored this version


@dataclasses.dataclass(frozen=True, slots=True)
class DocumentText:
    """A stored document with its text, rebuilt from its chunks (Engine.get_documents)."""

    document: StoredDocument
    text: str  # characters no chunk covers (whitespace at either end, between chunks) guessed
    exact: bool  # the text's content hash equals the stored one: it is the text as ingested
    chunks: list  # (start, end, tokens) of each chunk, by ordinal: text[start:end] is its text


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


class Store:
    """SQLite + vector file of one collection. Thread-safe: one lock serialises access."""

    def __init__(self, folder: Path, *, read_only: bool = False) -> None:
        """`read_only`: a reader beside another process's writer (engine/lock.py). It writes
        nothing, not even the schema upgrades a writer makes on open."""
        self.folder = Path(folder)
        self.read_only = read_only
        db = self.folder / STORE_FILE
        if not db.exists():
            raise NotFound(f"no store at {db}")
        self._lock = threading.RLock()
        self._db = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
        if read_only:
            self._db.execute("PRAGMA query_only=1")
            self.lexical = has_fts(self._db)
        else:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit is not synced (the write-ahead log already is); checkpoints are.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            # Stores made before the write-ahead log lack these rows.
            self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('applied_seq', '0')")
            self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('snapshot_seq', '0')")
            self.lexical = ensure_fts(self._db)
            ensure_meta_index(self._db)
        self.settings = json.loads(self._meta("settings"))
        self.dim = int(self.settings["dim"])
        self.vector_file = VectorFile(self.folder, self.dim, read_only=read_only)
        self._n_chunks = int(self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])
        self.fts = LexicalIndex(db, lambda: self._n_chunks, enabled=self.lexical)
        self.meta_index = has_meta_index(self._db)

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
        VectorFile.create(folder)

    def close(self) -> None:
        with self._lock:
            self.fts.close()
            self.vector_file.close()
            if self._db is not None:
                self._db.close()
                self._db = None

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
            self._n_chunks = int(c)  # a reader's count follows the writer's commits here
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

    def filter_keys(self, filter: dict, limit: int | None = None) -> np.ndarray | None:
        """Keys (ascending) of the chunks of every document whose metadata matches `filter`
        (`matches`); None if more than `limit` chunks match (a filter that common is better
        served by filtering an index search's candidates). Through the metadata index where
        it holds every value asked for; else by reading every document's metadata. `filter`
        as engine/filters.py check_filter takes it."""
        filter = check_filter(filter) or {}
        with self._lock:
            docs = self._filter_sql(filter)
            if docs is not None:
                sql, params = docs
                if limit is not None and self._db.execute(  # documents first: the index alone answers
                        f"SELECT count(*) FROM ({sql} LIMIT ?)", [*params, limit + 1]).fetchone()[0] > limit:
                    return None  # more documents than `limit` match, so more chunks do
                rows = self._db.execute(f"SELECT key FROM chunks WHERE doc_id IN ({sql}) LIMIT ?",
                                        [*params, -1 if limit is None else limit + 1]).fetchall()
                if limit is not None and len(rows) > limit:
                    return None
            else:
                found = self._filter_scan(filter, limit)
                if found is None:
                    return None
                rows = []
                for i in range(0, len(found), 500):
                    part = found[i:i + 500]
                    rows += self._db.execute(
                        f"SELECT key FROM chunks WHERE doc_id IN ({','.join('?' * len(part))})", part).fetchall()
        return np.sort(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))

    def filter_documents(self, filter: dict) -> list[str]:
        """Ids of every document whose metadata matches `filter` (as filter_keys)."""
        filter = check_filter(filter) or {}
        with self._lock:
            docs = self._filter_sql(filter)
            if docs is None:
                return self._filter_scan(filter, None)
            return [r[0] for r in self._db.execute(*docs)]

    def list_documents(self, filter: dict | None, after: str, limit: int) -> list[StoredDocument]:
        """Up to `limit` documents whose ids sort after `after` ("" for the first), in id
        order, that `filter` (as filter_keys takes it) matches: one page of a listing."""
        filter = check_filter(filter) or {}
        cols = "doc_id, source, content_hash, metadata, n_chars, n_chunks, ingested_at"
        with self._lock:
            docs = self._filter_sql(filter) if filter else None
            if not filter or docs is not None:
                where, params = "doc_id > ?", [after]
                if docs is not None:
                    where += f" AND doc_id IN ({docs[0]})"
                    params += docs[1]
                rows = self._db.execute(f"SELECT {cols} FROM documents WHERE {where} ORDER BY doc_id LIMIT ?",
                                        [*params, limit]).fetchall()
            else:  # values the index does not hold: every document after `after` read, in order
                rows = []
                for row in self._db.execute(f"SELECT {cols} FROM documents WHERE doc_id > ? ORDER BY doc_id", (after,)):
                    if matches(json.loads(row[3]), filter):
                        rows.append(row)
                        if len(rows) == limit:
                            break
        return [StoredDocument(d, src, h, json.loads(m), n, c, t) for d, src, h, m, n, c, t in rows]

    def _filter_sql(self, filter: dict) -> tuple[str, list] | None:
        """A query for the ids of the documents a canonical `filter` matches, through the
        metadata index: the documents of its rarest field's condition (equal, one of, a
        range, elements a list holds), each checked under the other fields' and against the
        values a field must not have; every document, so checked, where no field names a
        value it must have. None where the index cannot answer exactly: a value asked for is
        null or too long for it, an element asked for reads as a list's JSON (starts with
        "["), a text range on a field some document's value was too long for, or the store
        has no such index."""
        if not self.meta_index:
            return None
        if any(op in filter for op in LOGICAL_OPS):  # the field conditions, within $and's and $or's documents
            return self._logical_sql(filter)
        if len(filter) == 1:  # the common case (a tenant's, a source's filter): one lookup
            (field, cond), = filter.items()
            value = cond.get("$eq") if len(cond) == 1 else None
            if value is not None and len(value) <= META_INDEX_MAX_CHARS:
                return "SELECT m.doc_id FROM doc_meta m WHERE m.field = ? AND m.value = ?", [field, value]
            items = cond.get("$contains", ()) if len(cond) == 1 else ()
            if len(items) == 1 and len(items[0]) <= META_INDEX_MAX_CHARS and not items[0].startswith("["):
                # a list's elements or a value that is not a list: each document once
                return ("SELECT doc_id FROM doc_meta WHERE field = ? AND value = ? UNION ALL "
                        "SELECT doc_id FROM doc_meta_item WHERE field = ? AND value = ?"), [field, items[0]] * 2
        # (field, SQL terms on an alias "x" of `table`, params, table): doc_meta, or doc_meta_any
        # for what a list holds (its elements, or a value that is not a list)
        wanted, unwanted = [], []
        for field, cond in filter.items():
            values = [cond[op] for op in ("$eq", "$ne") if op in cond] + [
                v for op in ("$in", "$nin") for v in cond.get(op, ())]
            if any(v is None or len(v) > META_INDEX_MAX_CHARS for v in values):
                return None
            elements = [v for op in LIST_OPS for v in cond.get(op, ())]
            if any(len(v) > META_INDEX_MAX_CHARS or v.startswith("[") for v in elements):
                return None  # a list's own row in doc_meta (its JSON text) could equal this one
            text_range = any(isinstance(cond[op], str) for op in RANGE_OPS if op in cond)
            if text_range and self._db.execute(
                    "SELECT 1 FROM doc_meta_long WHERE field = ? LIMIT 1", (field,)).fetchone():
                return None
            terms, params = [], []
            if "$eq" in cond:
                terms.append("x.value = ?")
                params.append(cond["$eq"])
            if "$in" in cond:
                terms.append(f"x.value IN ({','.join('?' * len(cond['$in']))})")
                params += cond["$in"]
            for op, sql_op in RANGE_SQL.items():
                if op in cond:
                    terms.append(f"x.{'num' if isinstance(cond[op], float) else 'value'} {sql_op} ?")
                    params.append(cond[op])
            if text_range:
                terms.append("x.num IS NULL")  # text compares with the values that are not numbers
            if terms:
                wanted.append((field, " AND ".join(terms), params, "doc_meta"))
            wanted += [(field, "x.value = ?", [v], "doc_meta_any") for v in cond.get("$contains", ())]
            if "$contains_any" in cond:
                wanted.append((field, f"x.value IN ({','.join('?' * len(cond['$contains_any']))})",
                               cond["$contains_any"], "doc_meta_any"))
            banned = ([cond["$ne"]] if "$ne" in cond else []) + list(cond.get("$nin", ()))
            if banned:
                unwanted.append((field, f"x.value IN ({','.join('?' * len(banned))})", banned))
        if len(wanted) > 1:  # one field needs no counting (a query each search would pay)
            wanted.sort(key=lambda w: self._db.execute(
                f"SELECT count(*) FROM (SELECT 1 FROM {w[3]} x WHERE x.field = ? AND {w[1]} LIMIT 10001)",
                [w[0], *w[2]]).fetchone()[0])
        if wanted:
            field, terms, params, table = wanted[0]
            sql, ref, args = f"SELECT m.doc_id FROM {table} m WHERE m.field = ? AND {_alias(terms, 'm')}", \
                "m.doc_id", [field, *params]
            if table != "doc_meta":  # each document once (a list holding several values asked for)
                sql = sql.replace("SELECT m.doc_id", "SELECT DISTINCT m.doc_id", 1)
        else:
            sql, ref, args = "SELECT d.doc_id FROM documents d WHERE 1", "d.doc_id", []
        for i, (field, terms, params, table) in enumerate(wanted[1:]):
            sql += (f" AND EXISTS (SELECT 1 FROM {table} o{i} WHERE o{i}.field = ? AND {_alias(terms, f'o{i}')}"
                    f" AND o{i}.doc_id = {ref})")
            args += [field, *params]
        for i, (field, terms, params) in enumerate(unwanted):
            sql += (f" AND NOT EXISTS (SELECT 1 FROM doc_meta n{i} WHERE n{i}.field = ? AND "
                    f"{_alias(terms, f'n{i}')} AND n{i}.doc_id = {ref})")
            args += [field, *params]
        return sql, args

    def _logical_sql(self, filter: dict) -> tuple[str, list] | None:
        """_filter_sql for a filter with $or / $and / $not: its field conditions' documents
        that are among every $and filter's and any $or filter's (a UNION) and none of the
        $not filters'; None where a part's is."""
        own = fields(filter)
        parts = [self._filter_sql(own)] if own else []
        parts += [self._filter_sql(g) for g in filter.get("$and", ())]
        alternatives = [self._filter_sql(g) for g in filter.get("$or", ())]
        excluded = [self._filter_sql(g) for g in filter.get("$not", ())]
        if any(p is None for p in (*parts, *alternatives, *excluded)):
            return None
        if alternatives:
            parts.append((" UNION ".join(sql for sql, _ in alternatives),
                          [a for _, args in alternatives for a in args]))
        if excluded:
            parts.append((f"SELECT d.doc_id FROM documents d WHERE d.doc_id NOT IN "
                          f"({' UNION '.join(sql for sql, _ in excluded)})", [a for _, args in excluded for a in args]))
        if len(parts) == 1:
            return parts[0]
        sql = f"SELECT doc_id FROM ({parts[0][0]}) WHERE 1" + "".join(f" AND doc_id IN ({q})" for q, _ in parts[1:])
        return sql, [a for _, args in parts for a in args]

    def _filter_scan(self, filter: dict, limit: int | None) -> list[str] | None:
        """The documents `filter` matches, by reading every document's metadata; None as soon
        as they hold more than `limit` chunks."""
        found, n = [], 0
        for doc_id, n_chunks, metadata in self._db.execute("SELECT doc_id, n_chunks, metadata FROM documents"):
            if matches(json.loads(metadata), filter):
                found.append(doc_id)
                n += n_chunks
                if limit is not None and n > limit:
                    return None
        return found

    def documents_with_chunks(self, ids: Sequence[str]) -> list[tuple[StoredDocument, list[Chunk]]]:
        """The documents of `ids` that exist, in that order, each with its chunks by ordinal,
        read in one transaction (a writer elsewhere cannot change a document between its row
        and its chunks)."""
        cols = "doc_id, source, content_hash, metadata, n_chars, n_chunks, ingested_at"
        docs, chunks = {}, {}
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for i in range(0, len(ids), 500):
                    part = list(ids[i:i + 500])
                    marks = ",".join("?" * len(part))
                    for d, src, h, m, n, c, t in self._db.execute(
                            f"SELECT {cols} FROM documents WHERE doc_id IN ({marks})", part):
                        docs[d] = StoredDocument(d, src, h, json.loads(m), n, c, t)
                    for row in self._db.execute("SELECT doc_id, ordinal, start, end, n_tokens, text FROM chunks "
                                                f"WHERE doc_id IN ({marks}) ORDER BY doc_id, ordinal", part):
                        chunks.setdefault(row[0], []).append(Chunk(*row))
            finally:
                self._db.execute("COMMIT")
        return [(docs[d], chunks.get(d, [])) for d in ids if d in docs]

    def document_keys(self, doc_id: str) -> list[int]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT key FROM chunks WHERE doc_id = ? ORDER BY ordinal", (doc_id,))]

    def chunk_vectors(self, doc_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vector of every chunk text of these documents (text -> a copy of its
        row): an upsert re-embeds only chunk texts it does not find here."""
        out: dict[str, np.ndarray] = {}
        with self._lock:
            vectors = self.vectors()
            for i in range(0, len(doc_ids), 500):
                part = list(doc_ids[i:i + 500])
                for key, text in self._db.execute(
                        f"SELECT key, text FROM chunks WHERE doc_id IN ({','.join('?' * len(part))})", part):
                    if key < len(vectors):
                        out[text] = np.array(vectors[key])
        return out

    def export(self, batch_chunks: int = 4096) -> Iterator[list[DocumentRecord]]:
        """Every document with its chunks and stored vectors, as of one moment, in batches of
        about `batch_chunks` chunks (whole documents): one read transaction on a connection
        of its own, so a writer beside it goes on and what it writes meanwhile is not seen.
        Documents come in the order of their chunks' keys (a document's chunks hold a run of
        keys, given when it was stored), so a collection built from them numbers its chunks
        in the same order and breaks ties between equal scores the same way. Unavailable if a
        vector row it needs was freed meanwhile (its document deleted and the collection
        snapshotted during the read): run it again."""
        db = sqlite3.connect(self.folder / STORE_FILE, check_same_thread=False, isolation_level=None)
        cols = "key, doc_id, ordinal, start, end, n_tokens, text"
        try:
            db.execute("PRAGMA query_only=1")
            db.execute("BEGIN")
            vectors = self.vector_file.rows(int(db.execute(
                "SELECT value FROM meta WHERE key = 'next_key'").fetchone()[0]))
            last = -1
            while rows := db.execute(f"SELECT {cols} FROM chunks WHERE key > ? ORDER BY key LIMIT ?",
                                     (last, batch_chunks)).fetchall():
                # the last document's other chunks: a batch holds whole documents
                rows += db.execute(f"SELECT {cols} FROM chunks WHERE doc_id = ? AND key > ? ORDER BY key",
                                   (rows[-1][1], rows[-1][0])).fetchall()
                last = rows[-1][0]
                chunks: dict[str, list] = {}
                for row in rows:
                    chunks.setdefault(row[1], []).append(row)
                ids, docs = list(chunks), {}
                for i in range(0, len(ids), 500):
                    part = ids[i:i + 500]
                    docs.update((d[0], d) for d in db.execute(
                        "SELECT doc_id, source, content_hash, metadata, n_chars FROM documents "
                        f"WHERE doc_id IN ({','.join('?' * len(part))})", part))
                out = []
                for doc_id, own in chunks.items():
                    vecs = np.array(vectors[[r[0] for r in own]], dtype=np.float32).reshape(len(own), self.dim)
                    if not np.all(np.any(vecs != 0, axis=1)):  # a unit vector is never all zeros
                        raise Unavailable(f"document {doc_id!r} changed while the collection was read (its "
                                          "vectors were freed by a snapshot); run it again")
                    _, source, content_hash, metadata, n_chars = docs[doc_id]
                    out.append(DocumentRecord(doc_id, source, content_hash, json.loads(metadata), n_chars,
                                              [Chunk(*r[1:]) for r in own], vecs))
                yield out
        finally:
            db.close()

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

    def lexical_search(self, queries: Sequence[str], k: int, *, threads: int = 1) -> list[np.ndarray]:
        """Chunk keys per query, best BM25 first (engine/lexical.py)."""
        return [keys for keys, _ in self.fts.search(queries, k, threads=threads)]

    def vectors(self) -> np.ndarray:
        """All committed vector rows as a read-only (next_key, dim) float32 array (memory map)."""
        with self._lock:
            return self.vector_file.rows(int(self._meta("next_key")))

    def size_bytes(self) -> int:
        """Disk space the collection's files take (allocated blocks: freed rows do not count)."""
        return sum(p.stat().st_blocks * 512 for p in self.folder.iterdir() if p.is_file())

    def reclaim(self) -> int:
        """Free the disk blocks of vector rows no chunk uses any more (replaced or deleted
        chunks); returns the bytes of whole blocks freed (engine/vectors.py)."""
        with self._lock:
            return self.vector_file.reclaim(int(self._meta("next_key")), self.keys())

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
                self.vector_file.write(first, vectors)
            removed: list[int] = []
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                for doc_id in [*deletes, *(r.doc_id for r in upserts)]:
                    removed.extend(r[0] for r in db.execute("SELECT key FROM chunks WHERE doc_id = ?", (doc_id,)))
                    db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
                    for table in META_INDEX_TABLES:
                        db.execute(f"DELETE FROM {table} WHERE doc_id = ?", (doc_id,))
                    db.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))
                key = first
                for rec in upserts:
                    db.execute("INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (rec.doc_id, rec.source, rec.content_hash,
                                json.dumps(rec.metadata, sort_keys=True, ensure_ascii=False),
                                rec.n_chars, len(rec.chunks), now))
                    insert_meta(db, rec.doc_id, rec.metadata)
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
            self.vector_file.sync()
            seq = int(self._meta("applied_seq"))
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'snapshot_seq'", (str(seq),))
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy:
                # Cannot happen with this one connection; fall back to a synced commit.
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'snapshot_seq'", (str(seq),))
                self._db.execute("PRAGMA synchronous=NORMAL")
            return seq
