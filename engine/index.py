"""The HNSW vector index of one collection (usearch), with atomic save and exact rescoring.

Keys are chunk keys from engine/store.py. Vectors are unit length and the metric is cosine.
An f16 or i8 index stores compressed vectors; `search` then over-fetches candidates and
rescores them exactly against the store's float32 rows with a Numba kernel, so ranking
quality stays that of f32 while the graph takes 2-4x less memory.

Two things make ours faster than usearch's defaults (benchmarks/ann.py):
- f32 indexes use a Numba inner-product metric (kernels.ip_distance_f32) instead of the
  built-in cosine, which accumulates in float64 and recomputes norms. usearch does not
  save a custom metric, so it is set again after every load; the file keeps the "cos"
  label and any reader that ignores our metric still ranks the same (unit vectors).
- i8 indexes quantize rows themselves instead of usearch's f32 -> i8 cast (unit length x
  127, which leaves MiniLM components only ~6-20 levels). Where one scale fits the data
  (I8_MIN_TYPICAL_SHARE, decided on the first batch added, or on all rows in rebuild),
  every row is stored times `i8_scale` = 127 / its largest |component| (kept in
  index.json; larger components later are clipped, which only perturbs candidate order:
  quantized indexes are rescored exactly) and searched with usearch's int8 inner product,
  one VNNI dot product per distance where its i8 cosine does three (~30% faster search).
  Otherwise each row gets its own scale (kernels.quantize_i8) and the metric stays
  usearch's scale-invariant i8 cosine. Queries always get their own scale: it does not
  change their ranking. Files from before (i8 "cos") load as the second kind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import kernels
from .errors import InvalidInput
from .fsutil import atomic_write, replace_file

INDEX_FILE = "index.usearch"
INDEX_META_FILE = "index.json"
USEARCH_DTYPES = {"f32": "f32", "f16": "f16", "i8": "i8"}
# An i8 index uses one scale (inner product) only if the median row's largest |component|
# is at least this share of the first batch's largest, i.e. typical rows keep >= ~60 of
# 127 levels: true of MiniLM (0.6), not of fashion-mnist pixels, which then get per-row
# scales and usearch's i8 cosine.
I8_MIN_TYPICAL_SHARE = 0.5


def _metric(dtype: str):
    """usearch metric for a new index of `dtype` (see the module docstring)."""
    if dtype == "i8":
        return "ip"
    if dtype == "f16":
        return "cos"  # usearch's f16 kernel is SIMD already; Numba cannot take f16 pointers
    from usearch.index import CompiledMetric, MetricKind, MetricSignature

    # kind=Cos only labels the file; the pointer is what usearch calls.
    return CompiledMetric(pointer=kernels.ip_distance_f32.address, kind=MetricKind.Cos,
                          signature=MetricSignature.ArrayArraySize)


def check_dtype(dtype: str) -> str:
    if not isinstance(dtype, str) or dtype not in USEARCH_DTYPES:
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
        self.i8_scale: float | None = None  # i8 only: set by the first add (module docstring)
        self._i8_ip = dtype == "i8"  # False for an i8 file from before (metric cos)
        self._metric = _metric(self.dtype)
        self._args = dict(ndim=ndim, metric=self._metric, dtype=USEARCH_DTYPES[dtype], connectivity=connectivity,
                          expansion_add=expansion_add, expansion_search=expansion_search)
        self._index = Index(**self._args)

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

    def _encode_rows(self, vectors: np.ndarray) -> np.ndarray:
        """Rows as usearch should store them: int8 for i8 (module docstring), else float32."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if self.dtype != "i8":
            return vectors
        if self.i8_scale is None and len(self) == 0 and vectors.size:
            peaks = np.abs(vectors).max(axis=1)
            top = float(peaks.max())
            if top > 0 and np.median(peaks) / top >= I8_MIN_TYPICAL_SHARE:
                self.i8_scale = 127.0 / top
            else:  # one scale would leave typical rows few levels: per-row scales and cosine
                self._index.metric = "cos"
                self._i8_ip = False
                self.i8_scale = 0.0
        if not self._i8_ip:
            return kernels.quantize_i8(vectors)
        return kernels.scale_i8(vectors, self.i8_scale)

    def _encode_queries(self, queries: np.ndarray) -> np.ndarray:
        return kernels.quantize_i8(queries) if self.dtype == "i8" else queries

    # ------------------------------------------------------------------ writes
    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        # One thread: concurrent inserts in usearch 2.26 can leave nodes no search reaches
        # (unum-cloud/usearch#735; measured 1-3 of 2,252 SQuAD chunks lost with 2 threads,
        # none with 1). Embedding dominates ingest 30-100x, so this costs little.
        if len(keys):
            self._index.add(np.asarray(keys, dtype=np.uint64), self._encode_rows(vectors), threads=1)

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

        expansion_search = self._index.expansion_search
        self._index = Index(**self._args)
        self._index.expansion_search = expansion_search
        self.i8_scale = None  # chosen afresh from all rows
        self._i8_ip = self.dtype == "i8"
        self.removed = 0
        if len(keys):
            self._index.add(np.asarray(keys, dtype=np.uint64), self._encode_rows(vectors[keys]),
                            threads=1)  # see add()

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
        meta = {"generation": self.generation, "size": len(self), "removed": self.removed}
        if self.i8_scale is not None:
            meta["i8_scale"] = self.i8_scale
        # Index first, then the generation it holds: a crash between leaves an older
        # generation on disk, which only triggers a resync on load.
        replace_file(tmp, folder / INDEX_FILE, fsync=fsync)
        atomic_write(folder / INDEX_META_FILE, json.dumps(meta), fsync=fsync)

    @classmethod
    def load(cls, folder: Path, *, ndim: int, dtype: str, connectivity: int, expansion_add: int,
             expansion_search: int, threads: int = 1) -> "VectorIndex":
        """The saved index, or an empty one (generation 0) if none was saved or it is unreadable."""
        from usearch.index import Index, MetricKind

        ix = cls(ndim=ndim, dtype=dtype, connectivity=connectivity, expansion_add=expansion_add,
                 expansion_search=expansion_search, threads=threads)
        path = Path(folder) / INDEX_FILE
        meta = Path(folder) / INDEX_META_FILE
        if path.exists() and meta.exists():
            try:
                ix._index.load(str(path))
                if ix.dtype == "f32":
                    ix._index.metric = ix._metric  # usearch does not save a compiled metric
                saved = json.loads(meta.read_text())
                ix.generation = int(saved["generation"])
                ix.removed = int(saved.get("removed", 0))
                if ix.dtype == "i8":
                    # usearch takes the metric from the file but its Python side does not say so.
                    # Files from before i8_scale hold usearch's unit x 127 rows (metric cos).
                    ix._i8_ip = Index.metadata(str(path))["kind_metric"] == MetricKind.IP
                    if len(ix):
                        ix.i8_scale = float(saved.get("i8_scale", 0.0))
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
        encoded = self._encode_queries(queries)
        m = self._index.search(encoded, fetch, threads=self.threads)
        if hasattr(m, "counts"):  # BatchMatches: rows padded past each count
            raw_keys = np.asarray(m.keys).view(np.int64).reshape(q, fetch)
            raw_dist = np.asarray(m.distances, dtype=np.float32).reshape(q, fetch)
            counts = np.asarray(m.counts, dtype=np.int64).reshape(q)
        else:  # a single query comes back as Matches, trimmed to its count
            raw_keys = np.full((1, fetch), -1, np.int64)
            raw_dist = np.zeros((1, fetch), np.float32)
            got = len(m.keys)
            raw_keys[0, :got] = m.keys
            raw_dist[0, :got] = m.distances
            counts = np.array([got], dtype=np.int64)
        if exact_vectors is not None:
            # A key added after the caller mapped the store's rows has no row here yet.
            raw_keys[raw_keys >= len(exact_vectors)] = -1
            return kernels.rescore_topk(queries, raw_keys, counts, exact_vectors, k)
        valid = np.arange(fetch)[None, :] < counts[:, None]
        sims = 1.0 - raw_dist
        if self._i8_ip and self.i8_scale:  # an integer dot product of rows at i8_scale and queries at their own
            query_scale = 127.0 / np.maximum(np.abs(queries).max(axis=1, initial=0.0), 1e-30)
            sims = sims / (self.i8_scale * query_scale[:, None])
        out_keys = np.full((q, k), -1, np.int64)
        out_scores = np.full((q, k), -np.inf, np.float32)
        out_keys[:, :fetch] = np.where(valid, raw_keys, -1)
        out_scores[:, :fetch] = np.where(valid, sims, -np.inf)
        return out_keys, out_scores
