"""Search: the one path from question texts to ranked hits.

`Searcher.search` is what `rag search`, `Engine.search_batch`, the server's Search and
SearchBatch RPCs (through the micro-batcher, which hands in the vectors it embedded for a
whole batch) and answers all call: request validation, the check that the collection was
built with the loaded embedding model, filter over-fetch, the dense (HNSW) ranking, the
lexical (BM25) ranking and their fusion (engine/kernels.py `fuse`), then the hits.

Every hit carries the score it was ranked by (`score`: the fused score in hybrid mode, the
cosine similarity in dense and exact mode) and its cosine similarity (`cosine`), which is
what the answer relevance gate thresholds. Mode "exact" scores every stored vector instead
of searching the HNSW index (exact_dense): exact recall, at a cost that grows with the
collection (ground truth, small collections, checks).

A metadata filter that matches at most PREFILTER_MAX_CHUNKS chunks (found through the
store's metadata index) is searched by scoring exactly those chunks, and ranking BM25 among
them: a tenant's or a source's chunks come back however far the nearest unfiltered
candidates lie. A more common filter filters the index's over-fetched candidates, which
then hold k matches nearly always; where they do not, its matches are scored after all.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from . import kernels
from .collection import Collection, Collections
from .config import MAX_TOP_K, SEARCH_MODES, Config
from .errors import FailedPrecondition, InvalidInput
from .filters import both, check_filter, matches

MAX_QUERY_CHARS = 64 * 1024
FILTER_OVERFETCH = 10
FILTER_MIN_FETCH = 100
# A filter matching at most this many chunks is searched by scoring every match (exact_dense,
# and BM25 among the matches only in hybrid mode) instead of filtering the index's
# candidates, where a rare match may not be among them.
PREFILTER_MAX_CHUNKS = 10_000
FUSION_METHOD = {"convex": kernels.FUSE_CONVEX, "rrf": kernels.FUSE_RRF, "weighted_rrf": kernels.FUSE_WEIGHTED_RRF}


@dataclasses.dataclass(frozen=True, slots=True)
class Hit:
    """One search result. `start:end` is the chunk's character span in its document.

    `score` is what the hits are ranked by (descending): the fused score in hybrid mode,
    the cosine similarity in dense and exact mode. `cosine` is always the cosine similarity.
    """

    rank: int
    score: float
    key: int
    doc_id: str
    source: str
    ordinal: int
    start: int
    end: int
    text: str
    metadata: dict
    cosine: float


@dataclasses.dataclass(slots=True)
class SearchResult:
    hits: list[list[Hit]]
    embed_ns: int
    search_ns: int
    vectors: np.ndarray  # the queries' embeddings (n, dim): answers reuse them to pack context


def hit_to_json(hit: Hit) -> str:
    return json.dumps(dataclasses.asdict(hit), ensure_ascii=False)


def check_query(query: str, i: int | None = None) -> None:
    label = "query" if i is None else f"query {i}"
    if not isinstance(query, str):
        raise InvalidInput(f"{label} must be a string, got {type(query).__name__}")
    if not query.strip():
        raise InvalidInput(f"{label} is empty; send the question text")
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidInput(f"{label} is {len(query)} characters; the limit is {MAX_QUERY_CHARS}")


def check_queries(queries: Sequence[str], what: str = "queries") -> list[str]:
    if isinstance(queries, str) or not len(queries):
        raise InvalidInput(f"{what} must be a non-empty list of strings")
    for i, q in enumerate(queries):
        check_query(q, i if len(queries) > 1 else None)
    return list(queries)


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_TOP_K:
        raise InvalidInput(f"k must be an integer in [1, {MAX_TOP_K}], got {k!r}")
    return int(k)


def check_min_cosine(x) -> float | None:
    """A search's min_cosine: None (no floor) or a number in [-1, 1]."""
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating)) or not -1 <= x <= 1:  # NaN fails too
        raise InvalidInput(f"min_cosine must be a number in [-1, 1], got {x!r}")
    return float(x)


def at_least(hits: list[Hit], min_cosine: float | None) -> list[Hit]:
    """`hits` whose cosine similarity to the query is at least `min_cosine` (None: all of
    them), ranked 1, 2, ... again: fewer than k where fewer are that close."""
    if min_cosine is None:
        return hits
    kept = [h for h in hits if h.cosine >= min_cosine]
    return kept if len(kept) == len(hits) else [dataclasses.replace(h, rank=i + 1) for i, h in enumerate(kept)]


def filter_args(filter, filters, n: int) -> dict:
    """search_open's filter arguments, checked and canonical: the one filter of every query,
    or (`filters` given) each query's own with `filter` within it."""
    if filters is None:
        return {"filter": check_filter(filter)}
    return {"filter": None, "filters": query_filters(filter, filters, n)}


def query_filters(filter, filters, n: int) -> list:
    """Each of `n` queries' filter, canonical: `filter` for all, with the query's own from
    `filters` (one per query, or None) where given."""
    if filters is None:
        return [check_filter(filter)] * n
    if isinstance(filters, (str, dict)) or not isinstance(filters, Sequence) or len(filters) != n:
        raise InvalidInput(f"filters must be a list with one filter (or None) per query: {n} queries")
    return [both(filter, f) for f in filters]


EXACT_BLOCK_ROWS = 32768  # rows scored per matrix product in exact mode (~50 MB of f32 at dim 384)


def exact_dense(queries: np.ndarray, vectors: np.ndarray, live: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (keys, cosines) per query over the rows `live` of `vectors` (the store's unit
    f32 rows; `live`: keys of its chunks, every live one or a filter's matches, ascending),
    without the HNSW index: search mode "exact", and filtered searches. Rows are scored a
    block at a time (one matrix product each), so memory stays bounded: where most rows are
    live, each block as it lies in the mapped file (no copy) and the live ones' scores kept;
    where few are, only those rows are read. Equal scores keep key order. Keys past the
    rows mapped are left out (added since)."""
    q = len(queries)
    live = live[live < len(vectors)]
    best_keys = np.full((q, 0), -1, np.int64)
    best_scores = np.full((q, 0), -np.inf, np.float32)
    for block, sims in _exact_blocks(queries, vectors, live):
        if sims.shape[1] > k:  # this block's k best per query, before the merge
            part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            sims = np.take_along_axis(sims, part, axis=1)
            block = block[part]
        else:
            block = np.broadcast_to(block, sims.shape)
        best_keys = np.concatenate([best_keys, block], axis=1)
        best_scores = np.concatenate([best_scores, sims.astype(np.float32)], axis=1)
        order = np.lexsort((best_keys, -best_scores), axis=1)[:, :k]  # score descending, then key
        best_keys = np.take_along_axis(best_keys, order, axis=1)
        best_scores = np.take_along_axis(best_scores, order, axis=1)
    keys = np.full((q, k), -1, np.int64)
    scores = np.full((q, k), -np.inf, np.float32)
    keys[:, :best_keys.shape[1]] = best_keys
    scores[:, :best_scores.shape[1]] = best_scores
    return keys, scores


def _exact_blocks(queries: np.ndarray, vectors: np.ndarray, live: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(keys, scores of the queries against them) for the rows `live`, a block at a time."""
    if len(live) * 4 < len(vectors):  # few live rows: read only them
        for i in range(0, len(live), EXACT_BLOCK_ROWS):
            block = live[i:i + EXACT_BLOCK_ROWS]
            yield block, queries @ vectors[block].T
        return
    alive = np.zeros(len(vectors), bool)
    alive[live] = True
    for i in range(0, len(vectors), EXACT_BLOCK_ROWS):
        rows = np.flatnonzero(alive[i:i + EXACT_BLOCK_ROWS])
        if len(rows):
            # the block's rows as they lie (no copy of the mapped file), then the live ones' scores
            yield rows + i, (queries @ vectors[i:i + EXACT_BLOCK_ROWS].T)[:, rows]


class Searcher:
    """Runs searches over `collections` with the embedder `embedder()` returns (loaded lazily)."""

    def __init__(self, config: Config, collections: Collections, embedder: Callable[[], object]) -> None:
        self.config = config
        self.collections = collections
        self._embedder = embedder

    def check_mode(self, mode: str | None) -> str:
        mode = self.config.search_mode if mode is None else mode
        if mode not in SEARCH_MODES:
            raise InvalidInput(f"search mode must be one of {SEARCH_MODES}, got {mode!r}")
        return mode

    def check_model(self, col: Collection) -> None:
        """The collection's vectors come from the loaded model, or its state is at fault."""
        emb = self._embedder()
        if col.settings["embed_model"] != emb.name or col.settings["dim"] != emb.dim:
            raise FailedPrecondition(
                f"collection {col.name!r} was built with {col.settings['embed_model']} (dim {col.settings['dim']}) "
                f"but this engine runs {emb.name} (dim {emb.dim}); search it with the model it was built with, "
                "or re-ingest its documents into a new collection")

    def open(self, name: str) -> Collection:
        """The collection to search, checked against the loaded model and up to date."""
        col = self.collections.get(name)
        self.check_model(col)
        col.refresh()
        return col

    def search(self, name: str, queries: Sequence[str], k: int, *, filter: dict | None = None,
               mode: str | None = None, vectors: np.ndarray | None = None,
               filters: Sequence[dict | None] | None = None) -> SearchResult:
        """Top-k hits per query. `vectors`: the queries' embeddings, if the caller already has
        them (the micro-batcher embeds many requests at once); otherwise they are embedded here.

        `filter`: metadata field -> value or {operator: operand} (engine/filters.py: equal,
        one of, not, ranges), every field's must hold; the k best matches, however rare
        (see _rank). `filters`: one more filter per query (None for none), each to hold
        with `filter` (a batch of many tenants' questions).
        """
        k = check_k(k)
        mode = self.check_mode(mode)
        queries = check_queries(queries)
        return self.search_open(self.open(name), queries, k, mode=mode, vectors=vectors,
                                **filter_args(filter, filters, len(queries)))

    def search_open(self, col: Collection, queries: list[str], k: int, *, filter: dict | None, mode: str,
                    vectors: np.ndarray | None = None, filters: Sequence | None = None) -> SearchResult:
        """`search` on a collection `open` returned, with checked arguments (answers open the
        collection first, to check it is not empty, and do not open it twice)."""
        t0 = time.perf_counter_ns()
        per_query = query_filters(filter, filters, len(queries))
        if vectors is None:
            vectors = self._embedder().embed(queries)
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if vectors.shape != (len(queries), col.settings["dim"]):
            raise InvalidInput(f"query vectors have shape {vectors.shape}; collection {col.name!r} expects "
                               f"({len(queries)}, {col.settings['dim']})")
        t1 = time.perf_counter_ns()
        if filters is None:
            hits = self._rank(col, queries, vectors, k, per_query[0], mode)
        else:  # queries with the same filter are ranked together
            groups: dict[str, list[int]] = {}
            for i, f in enumerate(per_query):
                groups.setdefault(json.dumps(f, sort_keys=True), []).append(i)
            hits = [None] * len(queries)
            for members in groups.values():
                ranked = self._rank(col, [queries[i] for i in members], vectors[members], k, per_query[members[0]],
                                    mode)
                for i, h in zip(members, ranked):
                    hits[i] = h
        return SearchResult(hits, t1 - t0, time.perf_counter_ns() - t1, vectors)

    def _rank(self, col: Collection, queries: list[str], vectors: np.ndarray, k: int,
              filter: dict | None, mode: str) -> list[list[Hit]]:
        """The hits; filtered, a filter that matches few chunks (PREFILTER_MAX_CHUNKS, or
        any filter in exact mode) ranks exactly its matches, so a rare one is never crowded
        out of the index's candidates; a common one filters the index's over-fetched
        candidates, and ranks exactly its matches after all if they left a query fewer than
        k hits."""
        allowed = None
        if filter:
            allowed = col.store.filter_keys(filter, None if mode == "exact" else PREFILTER_MAX_CHUNKS)
        hits = self._ranked(col, queries, vectors, k, filter, mode, allowed)
        if allowed is None and filter and any(len(h) < k for h in hits):
            hits = self._ranked(col, queries, vectors, k, filter, mode, col.store.filter_keys(filter))
        return hits

    def _ranked(self, col: Collection, queries: list[str], vectors: np.ndarray, k: int,
                filter: dict | None, mode: str, allowed: np.ndarray | None) -> list[list[Hit]]:
        """The hits among the chunks `allowed` (keys, ascending), scored exactly, or among
        the index's candidates (over-fetched when filtered)."""
        c = self.config
        if allowed is not None or not filter:
            fetch = k
        else:
            fetch = min(max(k * FILTER_OVERFETCH, FILTER_MIN_FETCH), MAX_TOP_K * FILTER_OVERFETCH)
        hybrid = mode == "hybrid" and col.store.lexical
        scan = mode == "exact" or allowed is not None
        exact = col.store.vectors() if (col.quantized or hybrid or scan) else None
        depth = max(fetch, c.hybrid_depth) if hybrid else fetch
        if scan:
            keys, scores = exact_dense(vectors, exact, col.store.keys() if allowed is None else allowed, depth)
        else:
            keys, scores = col.index.search(vectors, depth, exact_vectors=exact if col.quantized else None,
                                            oversample=c.oversample)
        cosines = scores
        if exact is not None:
            # Rows added after `exact` was mapped cannot be scored yet: leave them out.
            keys[keys >= len(exact)] = -1
        if hybrid:
            found = col.store.fts.search(queries, depth, threads=c.threads, allowed=allowed)
            lex = np.full((len(queries), depth), -1, np.int64)
            lex_scores = np.zeros((len(queries), depth), np.float32)
            for i, (fk, fs) in enumerate(found):
                lex[i, :len(fk)] = fk
                lex_scores[i, :len(fs)] = fs
            lex[lex >= len(exact)] = -1
            keys, scores, cosines = kernels.fuse(keys, lex, lex_scores, vectors, exact, fetch,
                                                 FUSION_METHOD[c.fusion], c.fusion_alpha, c.rrf_k)
        rows = col.store.chunks(np.unique(keys[keys >= 0]))
        out = []
        for qk, qs, qc in zip(keys, scores, cosines):
            hits = []
            for key, score, cos in zip(qk.tolist(), qs.tolist(), qc.tolist()):
                row = rows.get(key)
                if key < 0 or row is None:  # deleted between index search and row fetch
                    continue
                if filter and not matches(row.metadata, filter):
                    continue
                if len(hits) == k:
                    break
                hits.append(Hit(rank=len(hits) + 1, score=float(score), key=key, doc_id=row.doc_id,
                                source=row.source, ordinal=row.ordinal, start=row.start, end=row.end,
                                text=row.text, metadata=row.metadata, cosine=float(cos)))
            out.append(hits)
        return out
