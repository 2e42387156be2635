"""The engine: collections, ingestion (chunk -> embed -> store -> index) and search.

This module wires the stages together and owns validation of requests; each stage lives
in its own module. It imports nothing from gRPC: the server calls these methods and maps
the typed errors of engine/errors.py to status codes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from . import kernels
from .chunk import Chunker
from .config import MAX_TOP_K, NO_ANSWER, SEARCH_MODES, Config
from .errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound
from .index import VectorIndex, check_dtype
from .ingest import Document, Failure, check_document, iter_documents
from .store import DocumentRecord, Store, fsync_dir
from .wal import WAL_FILE, WriteAheadLog
from .wal import encode as wal_encode

COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_QUERY_CHARS = 64 * 1024
# When removed vectors make up this share of the index, it is rebuilt from the live ones
# (usearch marks removed nodes but keeps their memory and graph slots).
COMPACT_REMOVED_SHARE = 0.3
# Documents buffered before one chunk+embed+commit round; bounds memory while ingesting.
INGEST_BATCH_CHARS = 2_000_000
INGEST_BATCH_DOCS = 256


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


@dataclasses.dataclass(frozen=True, slots=True)
class Hit:
    """One search result. `start:end` is the chunk's character span in its document."""

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


@dataclasses.dataclass(slots=True)
class IngestReport:
    documents_added: int = 0
    documents_updated: int = 0
    documents_unchanged: int = 0
    chunks_added: int = 0
    chunks_removed: int = 0
    failures: list[Failure] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    # doc_id -> (status, chunks, error); status is added/updated/unchanged/failed
    results: dict[str, tuple[str, int, str]] = dataclasses.field(default_factory=dict)

    def fail(self, failure: Failure, doc_id: str | None = None) -> None:
        self.failures.append(failure)
        self.results[doc_id or failure.source] = ("failed", 0, failure.reason)


ProgressFn = Callable[[int, int], None]  # (documents seen, chunks added so far)
FILTER_OVERFETCH = 10
FILTER_MIN_FETCH = 100


def _meta_str(v) -> str | None:
    """Metadata values compare as strings (JSON for non-strings), as the gRPC API sends them."""
    if v is None or isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True, ensure_ascii=False)


CITATION = re.compile(r"\[(\d{1,3})\]")


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
    """A retrieved chunk as numbered in the prompt: `[number]`."""

    number: int
    hit: Hit


@dataclasses.dataclass(slots=True)
class AnswerStart:
    """First event of a streamed answer: the sources packed into the prompt."""

    sources: list[Source]


@dataclasses.dataclass(slots=True)
class Answer:
    """A finished answer. `cited` are the source numbers the text refers to."""

    question: str
    text: str
    finish_reason: str
    sources: list[Source]
    cited: list[int]
    prompt_tokens: int
    completion_tokens: int
    timings_ns: dict[str, int]

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.text, "finish_reason": self.finish_reason,
                "sources": [{"number": s.number, "source": s.hit.source, "doc_id": s.hit.doc_id,
                             "span": [s.hit.start, s.hit.end], "score": s.hit.score,
                             "cited": s.number in self.cited} for s in self.sources],
                "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens},
                "timings_ns": self.timings_ns}


class Collection:
    """An open collection: its write-ahead log, store and index, guarded by one write lock.

    A write is logged, then applied to the store, then to the index (`commit`). Opening a
    collection replays the log past the store's last snapshot, then brings the index (a
    snapshot of its own, tagged with the store generation) up to the store.
    """

    def __init__(self, name: str, folder: Path, config: Config) -> None:
        self.name = name
        self.folder = folder
        self.config = config
        self.store = Store(folder)
        s = self.store.settings
        self.settings = s
        self.wal = WriteAheadLog(folder / WAL_FILE, fsync=config.wal_fsync,
                                 interval_ms=config.wal_fsync_interval_ms)
        self.replayed = 0
        for rec in self.wal.records(after_seq=self.store.snapshot_seq):
            # Records the store already holds are rewritten to the same keys: a no-op.
            self.store.apply(rec.upserts, rec.deletes, first_key=rec.first_key, seq=rec.seq)
            self.replayed += 1
        # After a snapshot the log is empty; numbering goes on from what the store holds.
        self.wal.last_seq = max(self.wal.last_seq, self.store.applied_seq)
        self.index = VectorIndex.load(folder, ndim=s["dim"], dtype=s["index_dtype"],
                                      connectivity=s["connectivity"], expansion_add=s["expansion_add"],
                                      expansion_search=s["expansion_search"], threads=config.threads)
        self.write_lock = threading.Lock()
        generation = self.store.generation
        if self.index.generation != generation or len(self.index) != self.store.counts()[1]:
            # The index snapshot is older than the store (crash before a snapshot): catch up.
            self.index.sync(self.store.keys(), self.store.vectors(), generation)
        self.dirty = self.replayed > 0
        self.last_snapshot = time.monotonic()

    @property
    def quantized(self) -> bool:
        return self.index.dtype != "f32"

    def commit(self, records: Sequence[DocumentRecord], deletes: Sequence[str] = ()):
        """Log, then apply, one change; returns the store's Change. Caller holds write_lock.

        The change is acknowledged (durable per config.wal_fsync) once this returns. If the
        store cannot apply it, the log record is taken back and nothing changes.
        """
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
        """Persist the store and index and empty the write-ahead log."""
        with self.write_lock:
            if self.dirty or not self.wal.empty:
                self._snapshot()

    def close(self) -> None:
        self.wal.close()
        self.store.close()


class Engine:
    """Retrieval engine over the collections in `config.data_dir`."""

    def __init__(self, config: Config | None = None, *, embedder=None, generator=None) -> None:
        self.config = config or Config()
        self._embedder = embedder
        self._generator = generator
        self._collections: dict[str, Collection] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ models
    @property
    def embedder(self):
        """The Embedder, loaded on first use (listing collections needs no model)."""
        with self._lock:
            if self._embedder is None:
                from .embed import Embedder

                c = self.config
                self._embedder = Embedder(c.embed_model_dir, variant=c.embed_variant, provider=c.provider,
                                          threads=c.threads, batch_max_tokens=c.batch_max_tokens,
                                          max_batch=c.max_batch)
            return self._embedder

    @property
    def generator(self):
        """The Generator, loaded on first use (retrieval alone never loads it)."""
        with self._lock:
            if self._generator is None:
                from .generate import Generator

                c = self.config
                self._generator = Generator(c.gen_model_dir, variant=c.gen_variant, provider=c.provider,
                                            threads=c.threads, context_window=c.context_window)
            return self._generator

    def warmup(self, generation: bool = False) -> None:
        kernels.warmup()
        self.embedder.warmup()
        if generation:
            self.generator.warmup()

    # ------------------------------------------------------------------ collections
    @property
    def root(self) -> Path:
        return self.config.data_dir / "collections"

    def _check_name(self, name: str) -> str:
        if not isinstance(name, str) or not COLLECTION_NAME.match(name):
            raise InvalidInput(f"collection name {name!r} is invalid: use 1-64 letters, digits, '_', '-' "
                               "or '.', starting with a letter or digit")
        return name

    def _open(self, name: str) -> Collection:
        self._check_name(name)
        with self._lock:
            col = self._collections.get(name)
            if col is None:
                folder = self.root / name
                if not (folder / "store.sqlite").exists():
                    raise NotFound(f"collection {name!r} does not exist; create it first "
                                   "(rag ingest creates it, or use create_collection)")
                col = self._collections[name] = Collection(name, folder, self.config)
            return col

    def create_collection(self, name: str, *, index_dtype: str | None = None, connectivity: int | None = None,
                          expansion_add: int | None = None, expansion_search: int | None = None,
                          chunk_tokens: int | None = None, chunk_overlap: int | None = None) -> CollectionInfo:
        """Create an empty collection; its settings are fixed for its lifetime."""
        self._check_name(name)
        c = self.config
        def pick(value, default):
            return default if value is None else value

        settings = {
            "index_dtype": check_dtype(pick(index_dtype, c.index_dtype)),
            "connectivity": pick(connectivity, c.connectivity),
            "expansion_add": pick(expansion_add, c.expansion_add),
            "expansion_search": pick(expansion_search, c.expansion_search),
            "chunk_tokens": pick(chunk_tokens, c.chunk_tokens),
            "chunk_overlap": pick(chunk_overlap, c.chunk_overlap),
        }
        for key in ("connectivity", "expansion_add", "expansion_search", "chunk_tokens"):
            if not isinstance(settings[key], int) or not 1 <= settings[key] <= 4096:
                raise InvalidInput(f"{key} must be an integer in [1, 4096], got {settings[key]!r}")
        if not isinstance(settings["chunk_overlap"], int) or not 0 <= settings["chunk_overlap"] < settings["chunk_tokens"]:
            raise InvalidInput(f"chunk_overlap must be in [0, chunk_tokens={settings['chunk_tokens']}), "
                               f"got {settings['chunk_overlap']!r}")
        emb = self.embedder
        settings.update(dim=emb.dim, embed_model=emb.name, created_at=time.time())
        with self._lock:
            final = self.root / name
            if final.exists():
                raise AlreadyExists(f"collection {name!r} already exists")
            self.root.mkdir(parents=True, exist_ok=True)
            # Build in a hidden folder and rename: a half-created collection is never listed.
            tmp = self.root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                Store.initialise(tmp, settings)
                tmp.rename(final)
                fsync_dir(self.root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return self.describe(name)

    def list_collections(self) -> list[CollectionInfo]:
        if not self.root.exists():
            return []
        names = sorted(p.name for p in self.root.iterdir()
                       if not p.name.startswith(".") and (p / "store.sqlite").exists())
        return [self.describe(n) for n in names]

    def describe(self, name: str) -> CollectionInfo:
        col = self._open(name)
        s = col.settings
        docs, chunks = col.store.counts()
        return CollectionInfo(name=name, documents=docs, chunks=chunks, dim=s["dim"],
                              embed_model=s["embed_model"], index_dtype=s["index_dtype"],
                              connectivity=s["connectivity"], expansion_add=s["expansion_add"],
                              expansion_search=s["expansion_search"], chunk_tokens=s["chunk_tokens"],
                              chunk_overlap=s["chunk_overlap"], disk_bytes=col.store.size_bytes(),
                              index_memory_bytes=col.index.memory_bytes())

    def drop_collection(self, name: str) -> None:
        col = self._open(name)
        with self._lock, col.write_lock:
            col.close()
            del self._collections[name]
            trash = self.root / f".drop-{name}-{uuid.uuid4().hex[:8]}"
            col.folder.rename(trash)  # atomic: the collection is gone from listings at once
            fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ ingestion
    def _chunker(self, col: Collection) -> Chunker:
        emb = self.embedder
        return Chunker(emb.raw_tokenizer, target=col.settings["chunk_tokens"],
                       overlap=col.settings["chunk_overlap"], window=emb.max_length - emb.special_tokens)

    def _check_model(self, col: Collection) -> None:
        emb = self.embedder
        if col.settings["embed_model"] != emb.name or col.settings["dim"] != emb.dim:
            raise InvalidInput(f"collection {col.name!r} was built with {col.settings['embed_model']} "
                               f"(dim {col.settings['dim']}) but the engine runs {emb.name} (dim {emb.dim})")

    def ingest(self, name: str, documents: Iterable[Document | Failure], *,
               progress: ProgressFn | None = None) -> IngestReport:
        """Upsert documents: unchanged ones (same content hash) are skipped, changed ones replaced.

        Documents are processed in bounded batches, each committed atomically; a document
        that fails (no text, nothing to chunk) is reported and skipped.
        """
        col = self._open(name)
        self._check_model(col)
        report = IngestReport()
        t0 = time.perf_counter()
        seen = 0
        pending: list[Document] = []
        pending_chars = 0
        with col.write_lock:
            for item in documents:
                seen += 1
                if isinstance(item, Failure):
                    report.fail(item)
                    continue
                try:
                    check_document(item)
                except InvalidInput as e:
                    report.fail(Failure(item.source, str(e)), item.doc_id if isinstance(item.doc_id, str) else None)
                    continue
                pending.append(item)
                pending_chars += len(item.text)
                if pending_chars >= INGEST_BATCH_CHARS or len(pending) >= INGEST_BATCH_DOCS:
                    self._ingest_batch(col, pending, report)
                    pending, pending_chars = [], 0
                    if progress:
                        progress(seen, report.chunks_added)
            if pending:
                self._ingest_batch(col, pending, report)
            if progress:
                progress(seen, report.chunks_added)
        report.seconds = time.perf_counter() - t0
        return report

    def _ingest_batch(self, col: Collection, docs: list[Document], report: IngestReport) -> None:
        # Later duplicates of an id in one batch win, as if sent one after another.
        by_id: dict[str, Document] = {}
        for d in docs:
            by_id.pop(d.doc_id, None)
            by_id[d.doc_id] = d
        docs = list(by_id.values())
        stored = col.store.hashes([d.doc_id for d in docs])
        todo = []
        for d in docs:
            h = d.content_hash
            if stored.get(d.doc_id) == h:
                report.documents_unchanged += 1
                report.results[d.doc_id] = ("unchanged", 0, "")
            else:
                todo.append((d, h))
        if not todo:
            return
        chunked = self._chunker(col).chunk_many([(d.doc_id, d.text) for d, _ in todo])
        records_in = []
        for (d, h), chunks in zip(todo, chunked):
            if not chunks:
                report.fail(Failure(d.source, "no indexable text (no tokens after tokenization)"), d.doc_id)
                continue
            records_in.append((d, h, chunks))
        if not records_in:
            return
        texts = [c.text for _, _, chunks in records_in for c in chunks]
        vectors = self.embedder.embed(texts)
        records, row = [], 0
        for d, h, chunks in records_in:
            records.append(DocumentRecord(d.doc_id, d.source, h, d.metadata, len(d.text), chunks,
                                          vectors[row:row + len(chunks)]))
            row += len(chunks)
        change = col.commit(records)
        for d, _, chunks in records_in:
            if d.doc_id in stored:
                report.documents_updated += 1
                report.results[d.doc_id] = ("updated", len(chunks), "")
            else:
                report.documents_added += 1
                report.results[d.doc_id] = ("added", len(chunks), "")
        report.chunks_added += len(change.added_keys)
        report.chunks_removed += len(change.removed_keys)

    def ingest_paths(self, name: str, paths: Sequence[str | Path], *, text_field: str = "text",
                     progress: ProgressFn | None = None) -> IngestReport:
        return self.ingest(name, iter_documents(paths, text_field=text_field), progress=progress)

    def delete_documents(self, name: str, doc_ids: Sequence[str]) -> int:
        """Delete documents by id; returns how many existed. Unknown ids are not an error."""
        col = self._open(name)
        if isinstance(doc_ids, str):
            raise InvalidInput("doc_ids must be a list of ids, not one string")
        with col.write_lock:
            present = [d for d in dict.fromkeys(doc_ids) if col.store.has_document(d)]
            if not present:
                return 0
            col.commit([], deletes=present)
            return len(present)

    def save(self) -> None:
        """Snapshot every open collection: store and index synced, write-ahead log emptied.
        Not needed for durability (the log gives that); it makes the next start quick."""
        with self._lock:
            cols = list(self._collections.values())
        for col in cols:
            col.snapshot()

    def close(self) -> None:
        self.save()
        with self._lock:
            for col in self._collections.values():
                col.close()
            self._collections.clear()

    # ------------------------------------------------------------------ search
    def check_query(self, query: str, i: int | None = None) -> None:
        label = "query" if i is None else f"query {i}"
        if not isinstance(query, str):
            raise InvalidInput(f"{label} must be a string, got {type(query).__name__}")
        if not query.strip():
            raise InvalidInput(f"{label} is empty; send the question text")
        if len(query) > MAX_QUERY_CHARS:
            raise InvalidInput(f"{label} is {len(query)} characters; the limit is {MAX_QUERY_CHARS}")

    def check_k(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_TOP_K:
            raise InvalidInput(f"k must be an integer in [1, {MAX_TOP_K}], got {k!r}")
        return int(k)

    def check_mode(self, mode: str | None) -> str:
        mode = self.config.search_mode if mode is None else mode
        if mode not in SEARCH_MODES:
            raise InvalidInput(f"search mode must be one of {SEARCH_MODES}, got {mode!r}")
        return mode

    def search(self, name: str, query: str, k: int = 5, *, filter: dict | None = None,
               mode: str | None = None) -> list[Hit]:
        return self.search_batch(name, [query], k, filter=filter, mode=mode)[0]

    def search_batch(self, name: str, queries: Sequence[str], k: int = 5, *,
                     filter: dict | None = None, mode: str | None = None) -> list[list[Hit]]:
        """Top-k hits per query: one embedding batch, one index batch search, exact rescoring,
        and (mode "hybrid", the default) fusion with a BM25 ranking of the same collection."""
        k = self.check_k(k)
        mode = self.check_mode(mode)
        if isinstance(queries, str) or not len(queries):
            raise InvalidInput("queries must be a non-empty list of strings")
        for i, q in enumerate(queries):
            self.check_query(q, i if len(queries) > 1 else None)
        col = self._open(name)
        self._check_model(col)
        vectors = self.embedder.embed(list(queries))
        return self.search_vectors(col, vectors, k, filter=filter, queries=queries, mode=mode)

    def search_vectors(self, col: Collection | str, vectors: np.ndarray, k: int, *,
                       filter: dict | None = None, queries: Sequence[str] | None = None,
                       mode: str | None = None) -> list[list[Hit]]:
        """Top-k hits per query vector. `filter`: metadata key -> value, all must be equal;
        applied to an over-fetched candidate list, so rare matches may give fewer than k.

        With `queries` (the texts the vectors embed) and mode "hybrid", the dense ranking is
        fused with the BM25 ranking by reciprocal rank fusion: hits come in fused order and
        each hit's `score` stays its cosine similarity to the query.
        """
        if isinstance(col, str):
            col = self._open(col)
        mode = self.check_mode(mode)
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if vectors.shape[1] != col.settings["dim"]:
            raise InvalidInput(f"query vectors have dim {vectors.shape[1]}; collection {col.name!r} "
                               f"expects {col.settings['dim']}")
        if filter is not None and not isinstance(filter, dict):
            raise InvalidInput("filter must be a mapping of metadata field -> value")
        if queries is not None and len(queries) != len(vectors):
            raise InvalidInput(f"{len(queries)} query texts for {len(vectors)} query vectors")
        fetch = k if not filter else min(max(k * FILTER_OVERFETCH, FILTER_MIN_FETCH), MAX_TOP_K * FILTER_OVERFETCH)
        hybrid = mode == "hybrid" and queries is not None and col.store.lexical
        exact = col.store.vectors() if (col.quantized or hybrid) else None
        depth = max(fetch, self.config.hybrid_depth) if hybrid else fetch
        keys, scores = col.index.search(vectors, depth, exact_vectors=exact if col.quantized else None,
                                        oversample=self.config.oversample)
        if exact is not None:
            # Rows added after `exact` was mapped cannot be scored yet: leave them out.
            keys[keys >= len(exact)] = -1
        if hybrid:
            lexical = col.store.lexical_search(queries, depth, threads=self.config.threads)
            lex = np.full((len(queries), depth), -1, np.int64)
            for i, found in enumerate(lexical):
                lex[i, :len(found)] = found
            lex[lex >= len(exact)] = -1
            keys, _, scores = kernels.rrf_fuse(keys, lex, vectors, exact, fetch, self.config.rrf_k)
        rows = col.store.chunks(np.unique(keys[keys >= 0]))
        out = []
        for qk, qs in zip(keys, scores):
            hits = []
            for key, score in zip(qk.tolist(), qs.tolist()):
                row = rows.get(key)
                if key < 0 or row is None:  # deleted between index search and row fetch
                    continue
                if filter and any(_meta_str(row.metadata.get(f)) != _meta_str(v) for f, v in filter.items()):
                    continue
                if len(hits) == k:
                    break
                hits.append(Hit(rank=len(hits) + 1, score=float(score), key=key, doc_id=row.doc_id,
                                source=row.source, ordinal=row.ordinal, start=row.start, end=row.end,
                                text=row.text, metadata=row.metadata))
            out.append(hits)
        return out

    # ------------------------------------------------------------------ answers
    def _render(self, question: str, context: str) -> str:
        gen = self.generator
        user = self.config.prompt_template.format(context=context, question=question)
        if gen.chat_template:
            return gen.render_chat([{"role": "system", "content": self.config.system_prompt},
                                    {"role": "user", "content": user}])
        return f"{self.config.system_prompt}\n\n{user}\nAnswer:"

    def relevant(self, hits: Sequence[Hit]) -> list[Hit]:
        """Hits good enough to show the generator (see DEFAULT_ANSWER_MIN_SCORE)."""
        if not hits:
            return []
        floor = self.config.answer_min_score
        if self.config.answer_min_relative > 0:  # hybrid order need not put the best cosine first
            floor = max(floor, max(h.score for h in hits) * self.config.answer_min_relative)
        return [h for h in hits if h.score >= floor]

    def build_prompt(self, question: str, hits: Sequence[Hit], max_new_tokens: int) -> tuple[list[int], list[Source]]:
        """Prompt token ids with as many top hits as fit in window - max_new_tokens, numbered [1].."""
        gen = self.generator
        budget = gen.window - max_new_tokens
        base = len(gen.encode(self._render(question, "")))
        if base > budget:
            raise InvalidInput(f"the question takes {base} tokens with the prompt template; with max_new_tokens="
                               f"{max_new_tokens} that exceeds the {gen.window}-token context window. "
                               "Shorten the question or lower max_new_tokens")
        blocks: list[str] = []
        sources: list[Source] = []
        used = base
        for hit in self.relevant(hits):
            label = hit.metadata.get("title") or Path(hit.source).name or hit.doc_id
            block = f"[{len(sources) + 1}] ({label})\n{hit.text.strip()}\n\n"
            cost = len(gen.encode(block))
            if used + cost > budget:
                break
            blocks.append(block)
            sources.append(Source(len(sources) + 1, hit))
            used += cost
        while True:  # token counts of pieces need not add up exactly: check the whole
            ids = gen.encode(self._render(question, "".join(blocks) or "(no passages)\n"))
            if len(ids) <= budget or not blocks:
                return ids, sources
            blocks.pop()
            sources.pop()

    def _retrieve_for_answer(self, name: str, questions: Sequence[str], k: int | None, params) -> tuple:
        from .generate import SamplingParams

        params = params or SamplingParams(max_new_tokens=self.config.max_new_tokens)
        k = self.check_k(self.config.answer_k if k is None else k)
        if isinstance(questions, str) or not len(questions):
            raise InvalidInput("questions must be a non-empty list of strings")
        for i, q in enumerate(questions):
            self.check_query(q, i if len(questions) > 1 else None)
        col = self._open(name)
        self._check_model(col)
        params.check(self.generator.window)
        if col.store.counts()[1] == 0:
            raise FailedPrecondition(f"collection {name!r} is empty; ingest documents before asking questions")
        t0 = time.perf_counter_ns()
        vectors = self.embedder.embed(list(questions))
        t1 = time.perf_counter_ns()
        hits = self.search_vectors(col, vectors, k, queries=questions)
        t2 = time.perf_counter_ns()
        return params, hits, t1 - t0, t2 - t1

    def answer_stream(self, name: str, question: str, *, k: int | None = None, params=None,
                      cancelled: Callable[[], bool] | None = None):
        """Yields AnswerStart (sources), then text deltas (str), then the final Answer."""
        from .generate import Completion

        params, (hits,), embed_ns, search_ns = self._retrieve_for_answer(name, [question], k, params)
        t0 = time.perf_counter_ns()
        ids, sources = self.build_prompt(question, hits, params.max_new_tokens)
        prompt_ns = time.perf_counter_ns() - t0
        yield AnswerStart(sources)
        if not sources:
            yield NO_ANSWER
            yield self._answer(question, self._no_context(len(ids)), sources, embed_ns, search_ns, prompt_ns)
            return
        for ev in self.generator.stream_ids(ids, params, cancelled=cancelled):
            if isinstance(ev, Completion):
                yield self._answer(question, ev, sources, embed_ns, search_ns, prompt_ns)
            else:
                yield ev

    def answer(self, name: str, question: str, **kw) -> Answer:
        *_, final = self.answer_stream(name, question, **kw)
        return final

    def answer_batch(self, name: str, questions: Sequence[str], *, k: int | None = None, params=None,
                     batch_size: int = 4, progress: Callable[[int], None] | None = None) -> list[Answer]:
        """Answers for many questions: one embedding batch, one index batch search, and
        generation in batches of `batch_size` prompts of similar length."""
        params, hits, embed_ns, search_ns = self._retrieve_for_answer(name, questions, k, params)
        n = len(questions)
        t0 = time.perf_counter_ns()
        prompts = [self.build_prompt(q, h, params.max_new_tokens) for q, h in zip(questions, hits)]
        prompt_ns = (time.perf_counter_ns() - t0) // n
        out: list[Answer | None] = [None] * n
        done = 0
        for i, (ids, sources) in enumerate(prompts):
            if not sources:
                out[i] = self._answer(questions[i], self._no_context(len(ids)), sources, embed_ns // n,
                                      search_ns // n, prompt_ns)
                done += 1
        order = sorted((i for i in range(n) if out[i] is None), key=lambda i: len(prompts[i][0]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            comps = self.generator.generate_ids([prompts[i][0] for i in idx], params)
            for i, comp in zip(idx, comps):
                out[i] = self._answer(questions[i], comp, prompts[i][1], embed_ns // n, search_ns // n, prompt_ns)
            done += len(idx)
            if progress:
                progress(done)
        return out

    @staticmethod
    def _no_context(prompt_tokens: int):
        from .generate import FINISH_NO_CONTEXT, Completion

        return Completion(text=NO_ANSWER, finish_reason=FINISH_NO_CONTEXT, prompt_tokens=0, completion_tokens=0,
                          token_ids=[])

    @staticmethod
    def _answer(question, comp, sources, embed_ns, search_ns, prompt_ns) -> Answer:
        cited = sorted({int(m) for m in CITATION.findall(comp.text) if 1 <= int(m) <= len(sources)})
        return Answer(question=question, text=comp.text, finish_reason=comp.finish_reason, sources=sources,
                      cited=cited, prompt_tokens=comp.prompt_tokens, completion_tokens=comp.completion_tokens,
                      timings_ns={"embed": embed_ns, "search": search_ns, "prompt": prompt_ns,
                                  "prefill": comp.prefill_ns, "decode": comp.decode_ns})


def hit_to_json(hit: Hit) -> str:
    return json.dumps(dataclasses.asdict(hit), ensure_ascii=False)
