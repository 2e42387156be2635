"""The lexical (BM25) half of hybrid search: an SQLite FTS5 index over the chunk text.

External content: the text is stored once, in the store's `chunks` table; triggers keep
the index in step inside the store's own transactions, so it can never disagree with the
chunks. Queries run on per-thread read-only connections, outside the store's lock: SQLite
releases the GIL while it works, so server threads (and the workers of one batch) rank in
parallel, each on the last committed state.
"""

from __future__ import annotations

import concurrent.futures
import re
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FTS_SCHEMA = (
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
FILTER_PAGE_ROWS = 1024  # rows of a ranking read at a time when only some chunks may be hits


def query_words(text: str) -> list[str]:
    """The text's distinct words for a lexical query, stopwords left out."""
    words = dict.fromkeys(w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS)
    return list(words)[:MAX_QUERY_TERMS]


def fts_query(text: str | list[str]) -> str:
    """An FTS5 query matching any of the words (quoted: no query syntax gets through)."""
    words = query_words(text) if isinstance(text, str) else text
    return " OR ".join(f'"{w}"' for w in words)


def has_fts(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunks_fts'").fetchone() is not None


def ensure_fts(db: sqlite3.Connection) -> bool:
    """Create the full-text index if missing (older stores: built from the chunks once).
    False if this SQLite lacks FTS5: search is then dense only."""
    have = has_fts(db)
    db.execute("BEGIN IMMEDIATE")
    try:
        for stmt in FTS_SCHEMA:
            db.execute(stmt)
        if not have:
            db.execute("INSERT INTO chunks_fts(chunks_fts) VALUES ('rebuild')")
        db.execute("COMMIT")
    except sqlite3.OperationalError as e:
        db.execute("ROLLBACK")
        if "fts5" in str(e):
            return False
        raise
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return True


class LexicalIndex:
    """BM25 ranking of one store's chunks. `n_chunks()` tells the collection's current size."""

    def __init__(self, db_path: Path, n_chunks, *, enabled: bool) -> None:
        self.db_path = Path(db_path)
        self.enabled = enabled
        self._n_chunks = n_chunks
        self._local = threading.local()
        self._lock = threading.Lock()
        self._readers: list[sqlite3.Connection] = []
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._df: dict[str, int] = {}
        self._df_n = n_chunks()

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection."""
        con = getattr(self._local, "db", None)
        if con is None:
            con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, check_same_thread=False)
            con.execute("PRAGMA query_only=1")
            self._local.db = con
            with self._lock:
                self._readers.append(con)
        return con

    def _doc_freq(self, con: sqlite3.Connection, word: str) -> int:
        """Chunks containing `word` (cached; the cache is dropped when the collection's size
        has changed by a fifth, so shares stay about right)."""
        n = self._n_chunks()
        if abs(n - self._df_n) > 0.2 * max(self._df_n, 1):
            self._df, self._df_n = {}, n
        df = self._df.get(word)
        if df is None:
            df = con.execute("SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH ?", (f'"{word}"',)).fetchone()[0]
            self._df[word] = df
        return df

    def _one(self, query: str, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        words = query_words(query) if self.enabled else []
        if not words or (allowed is not None and not len(allowed)):
            return np.empty(0, np.int64), np.empty(0, np.float32)
        con = self._reader()
        n = self._n_chunks()
        if len(words) > 1 and n >= PRUNE_MIN_CHUNKS:
            limit = COMMON_TERM_SHARE * n
            df = {w: self._doc_freq(con, w) for w in words}
            rare = [w for w in words if df[w] <= limit]
            words = rare or sorted(words, key=df.__getitem__)[:2]
        # FTS5's rank is bm25() negated (lower is better): the score is its negation.
        if allowed is None:
            rows = con.execute("SELECT rowid, rank FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY rank LIMIT ?",
                               (fts_query(words), int(k))).fetchall()
        else:
            rows = self._among(con, fts_query(words), k, allowed)
        keys = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        scores = np.fromiter((-r[1] for r in rows), dtype=np.float32, count=len(rows))
        return keys, scores

    @staticmethod
    def _among(con: sqlite3.Connection, match: str, k: int, allowed: np.ndarray) -> list[tuple[int, float]]:
        """The k best (rowid, rank) among the chunks `allowed` (keys, ascending): the ranking
        read in pages until k of them are found (BM25 scores stay the collection's)."""
        out: list[tuple[int, float]] = []
        cur = con.execute("SELECT rowid, rank FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY rank", (match,))
        try:
            while len(out) < k and (page := cur.fetchmany(FILTER_PAGE_ROWS)):
                ids = np.fromiter((r[0] for r in page), dtype=np.int64, count=len(page))
                at = np.minimum(np.searchsorted(allowed, ids), len(allowed) - 1)
                out.extend(page[i] for i in np.flatnonzero(allowed[at] == ids)[:k - len(out)])
        finally:
            cur.close()
        return out

    def search(self, queries: Sequence[str], k: int, *, threads: int = 1,
               allowed: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """(chunk keys, BM25 scores) per query, best first (at most k; empty without FTS5 or
        words), among the chunks `allowed` (keys, ascending) if given. A batch is split over
        `threads` workers."""
        if threads <= 1 or len(queries) < 2 * threads:
            return [self._one(q, k, allowed) for q in queries]
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="rag-fts")
        step = -(-len(queries) // threads)
        parts = self._pool.map(lambda i: [self._one(q, k, allowed) for q in queries[i:i + step]],
                               range(0, len(queries), step))
        return [found for part in parts for found in part]

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            for con in self._readers:
                con.close()
            self._readers.clear()
