"""The HNSW vector index of one collection (usearch), with atomic save and exact rescoring.

Keys are chunk keys from engine/store.py. Vectors are unit length and the metric is cosine.
An f16 or i8 index stores compressed vectors; `search` then over-fetches candidates and
rescores them exactly against the store's float32 rows with a Numba kernel, so ranking
quality stays that of f32 while the graph takes 2-4x less memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import kernels
from .errors import InvalidInput
from .store import fsync_dir

INDEX_FILE = "index.usearch"
INDEX_META_FILE = "index.json"
USEARCH_DTYPES = {"f32": "f32", "f16": "f16", "i8": "i8"}


def check_dtype(dtype: str) -> str:
    if dtype not in USEARCH_DTYPES:
        raise InvalidInput(f"index dtype {dtype!r} is not supported; use one of {sorted(USEARCH_DTYPES)}")
    return dtype


class VectorIndex:
    """usearch HNSW index plus the store generation it reflects."""

    def __init__(self, *, ndim: int, dtype: str, connectivity: int, expansion_add: int,
                 expansion_search: int, threads: int = 1) -> None:
        from usearch.index import Index

        self.dtype = check_dtype(dtype)
        self.ndim = ndim
        self.threads = threads
        self.generation = 0
        self.removed = 0  # vectors removed since the graph was built: usearch keeps their memory
        self._args = dict(ndim=ndim, metric="cos", dtype=USEARCH_DTYPES[dtype], connectivity=connectivity,
                          expansion_add=expansion_add, expansion_search=expansion_search)
        self._index = Index(ndim=ndim, metric="cos", dtype=USEARCH_DTYPES[dtype],
                            connectivity=connectivity, expansion_add=expansion_add,
                            expansion_search=expansion_search)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def expansion_search(self) -> int:
        return self._index.expansion_search

    @expansion_search.setter
    def expansion_search(self, value: int) -> None:
        self._index.expansion_search = int(value)

    def memory_bytes(self) -> int:
        return int(self._index.memory_usage)

    def keys(self) -> np.ndarray:
        return np.asarray(self._index.keys, dtype=np.int64)

    # ------------------------------------------------------------------ writes
    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        # One thread: concurrent inserts in usearch 2.26 can leave nodes no search reaches
        # (unum-cloud/usearch#735; measured 1-3 of 2,252 SQuAD chunks lost with 2 threads,
        # none with 1). Embedding dominates ingest 30-100x, so this costs little.
        if len(keys):
            self._index.add(np.asarray(keys, dtype=np.uint64),
                            np.ascontiguousarray(vectors, dtype=np.float32), threads=1)

    def remove(self, keys: np.ndarray) -> None:
        if len(keys):
            self._index.remove(np.asarray(keys, dtype=np.uint64))
            self.removed += len(keys)

    @property
    def removed_share(self) -> float:
        total = len(self) + self.removed
        return self.removed / total if total else 0.0

    def rebuild(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """A fresh graph over `keys` (rows of `vectors`): frees what removed vectors held."""
        from usearch.index import Index

        fresh = Index(**self._args)
        if len(keys):
            fresh.add(np.asarray(keys, dtype=np.uint64), np.ascontiguousarray(vectors[keys], dtype=np.float32),
                      threads=1)  # see add()
        fresh.expansion_search = self._index.expansion_search
        self._index = fresh
        self.removed = 0

    def sync(self, store_keys: np.ndarray, vectors: np.ndarray, generation: int) -> int:
        """Make the index hold exactly `store_keys` (rows of `vectors`); returns keys changed."""
        have = self.keys()
        stale = np.setdiff1d(have, store_keys, assume_unique=True)
        missing = np.setdiff1d(store_keys, have, assume_unique=True)
        self.remove(stale)
        if len(missing):
            self.add(missing, vectors[missing])
        self.generation = generation
        return len(stale) + len(missing)

    # ------------------------------------------------------------------ persistence
    def save(self, folder: Path, *, fsync: bool = True) -> None:
        """Atomically replace folder/index.usearch (+ index.json): tmp file, fsync, rename."""
        folder = Path(folder)
        tmp = folder / (INDEX_FILE + ".tmp")
        self._index.save(str(tmp))
        meta_tmp = folder / (INDEX_META_FILE + ".tmp")
        meta_tmp.write_text(json.dumps({"generation": self.generation, "size": len(self), "removed": self.removed}))
        if fsync:
            for p in (tmp, meta_tmp):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        # Index first, then the generation it holds: a crash between leaves an older
        # generation on disk, which only triggers a resync on load.
        os.replace(tmp, folder / INDEX_FILE)
        os.replace(meta_tmp, folder / INDEX_META_FILE)
        if fsync:
            fsync_dir(folder)

    @classmethod
    def load(cls, folder: Path, *, ndim: int, dtype: str, connectivity: int, expansion_add: int,
             expansion_search: int, threads: int = 1) -> "VectorIndex":
        """The saved index, or an empty one (generation 0) if none was saved or it is unreadable."""
        ix = cls(ndim=ndim, dtype=dtype, connectivity=connectivity, expansion_add=expansion_add,
                 expansion_search=expansion_search, threads=threads)
        path = Path(folder) / INDEX_FILE
        meta = Path(folder) / INDEX_META_FILE
        if path.exists() and meta.exists():
            try:
                ix._index.load(str(path))
                saved = json.loads(meta.read_text())
                ix.generation = int(saved["generation"])
                ix.removed = int(saved.get("removed", 0))
                ix._index.expansion_search = expansion_search
            except (RuntimeError, ValueError, KeyError, OSError):
                # Unreadable: start empty; the caller resyncs from the store.
                ix = cls(ndim=ndim, dtype=dtype, connectivity=connectivity, expansion_add=expansion_add,
                         expansion_search=expansion_search, threads=threads)
        return ix

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int, *, exact_vectors: np.ndarray | None = None,
               oversample: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (keys, cosine scores) per query, each (q, k), -1 / -inf where fewer exist.

        With `exact_vectors` (the store's f32 rows), fetch k * oversample candidates and
        rescore them exactly.
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        q = queries.shape[0]
        n = len(self)
        if n == 0 or q == 0:
            return np.full((q, k), -1, np.int64), np.full((q, k), -np.inf, np.float32)
        fetch = min(n, k * oversample if exact_vectors is not None else k)
        m = self._index.search(queries, fetch, threads=self.threads)
        if hasattr(m, "counts"):  # BatchMatches: rows padded with key 0 past each count
            raw_keys = np.asarray(m.keys, dtype=np.int64).reshape(q, fetch)
            raw_dist = np.asarray(m.distances, dtype=np.float32).reshape(q, fetch)
            counts = np.asarray(m.counts).reshape(q)
        else:  # a single query comes back as Matches, trimmed to its count
            raw_keys = np.zeros((1, fetch), np.int64)
            raw_dist = np.zeros((1, fetch), np.float32)
            got = len(m.keys)
            raw_keys[0, :got] = m.keys
            raw_dist[0, :got] = m.distances
            counts = np.array([got])
        valid = np.arange(fetch)[None, :] < counts[:, None]
        keys = np.where(valid, raw_keys, -1)
        if exact_vectors is not None:
            # A key added after the caller mapped the store's rows has no row here yet.
            keys[keys >= len(exact_vectors)] = -1
            return kernels.rescore_topk(queries, keys, exact_vectors, k)
        scores = np.where(valid, 1.0 - raw_dist, -np.inf)
        out_keys = np.full((q, k), -1, np.int64)
        out_scores = np.full((q, k), -np.inf, np.float32)
        out_keys[:, :fetch] = keys
        out_scores[:, :fetch] = scores
        return out_keys, out_scores.astype(np.float32)
