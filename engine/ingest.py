"""Ingestion: documents -> chunk -> embed -> one commit per bounded batch, with a report.

Upsert semantics: a document whose content hash is stored already is skipped (unchanged),
one whose hash differs is replaced (updated), a new one added. Documents are buffered in
batches of at most INGEST_BATCH_DOCS or INGEST_BATCH_CHARS (memory stays bounded however
long the input), each batch chunked, embedded and committed atomically through the
collection's write-ahead log. A document that fails (no text, nothing to chunk) is
reported and skipped; the rest go on.

The documents may also arrive `Prepared`: parsed, chunked and embedded elsewhere (Ray
workers, engine/distributed.py). They go through the same batches, the same upsert
decisions and the same commits; only the chunk+embed step is skipped for them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable

import numpy as np

from .chunk import Chunk, Chunker
from .collection import Collection
from .documents import Document, Failure, check_document
from .errors import InvalidInput
from .store import DocumentRecord

# Documents buffered before one chunk+embed+commit round; bounds memory while ingesting.
INGEST_BATCH_CHARS = 2_000_000
INGEST_BATCH_DOCS = 256

ProgressFn = Callable[[int, int], None]  # (documents seen, chunks added so far)


@dataclasses.dataclass(slots=True)
class IngestReport:
    documents_added: int = 0
    documents_updated: int = 0
    documents_unchanged: int = 0
    chunks_added: int = 0
    chunks_removed: int = 0
    chunks_reused: int = 0  # chunks added with a vector already stored for their text, not embedded again
    failures: list[Failure] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    # doc_id -> (status, chunks, error); status is added/updated/unchanged/failed
    results: dict[str, tuple[str, int, str]] = dataclasses.field(default_factory=dict)

    def fail(self, failure: Failure, doc_id: str | None = None) -> None:
        self.failures.append(failure)
        self.results[doc_id or failure.source] = ("failed", 0, failure.reason)


@dataclasses.dataclass(slots=True)
class Prepared:
    """A document parsed, chunked and embedded by a worker; the writer only commits it.

    `chunks` is None when the worker found the stored hash equal and did no work; should the
    writer see otherwise (an earlier input changed the same id), `reload()` gives the
    Document back and it is chunked and embedded here.
    """

    doc_id: str
    source: str
    content_hash: str
    metadata: dict
    n_chars: int
    chunks: list[Chunk] | None
    vectors: np.ndarray | None
    reload: Callable[[], Document]
    reused: int = 0  # of the chunks, those whose vectors the worker took from the store (not embedded)


def chunker_for(col: Collection, embedder) -> Chunker:
    return Chunker(embedder.raw_tokenizer, target=col.settings["chunk_tokens"],
                   overlap=col.settings["chunk_overlap"], window=embedder.max_length - embedder.special_tokens)


def ingest(col: Collection, embedder: Callable[[], object], documents: Iterable[Document | Prepared | Failure], *,
           progress: ProgressFn | None = None) -> IngestReport:
    """Upsert `documents` into the writer `col` (see the module docstring). `embedder()`
    gives the embedding model; it is asked for only if a document needs embedding here."""
    report = IngestReport()
    t0 = time.perf_counter()
    seen = 0
    pending: list[Document | Prepared] = []
    pending_chars = 0
    local = _Local(col, embedder)
    with col.write_lock:
        for item in documents:
            seen += 1
            if isinstance(item, Failure):
                report.fail(item, item.doc_id)
                continue
            if isinstance(item, Document):
                try:
                    check_document(item)
                except InvalidInput as e:
                    report.fail(Failure(item.source, str(e)), item.doc_id if isinstance(item.doc_id, str) else None)
                    continue
            pending.append(item)
            pending_chars += len(item.text) if isinstance(item, Document) else item.n_chars
            if pending_chars >= INGEST_BATCH_CHARS or len(pending) >= INGEST_BATCH_DOCS:
                _batch(col, local, pending, report)
                pending, pending_chars = [], 0
                if progress:
                    progress(seen, report.chunks_added)
        if pending:
            _batch(col, local, pending, report)
        if progress:
            progress(seen, report.chunks_added)
    report.seconds = time.perf_counter() - t0
    return report


class _Local:
    """Chunking and embedding in this process, set up on first use."""

    def __init__(self, col: Collection, embedder: Callable[[], object]) -> None:
        self.col = col
        self._embedder = embedder
        self._chunker: Chunker | None = None

    def chunk_embed(self, docs: list[Document],
                    known: dict[str, np.ndarray]) -> tuple[list[tuple[list[Chunk], np.ndarray]], int]:
        """Chunks and their vectors per document, and how many chunks took a vector from
        `known` (chunk text -> the vector stored for it) instead of the embedder: a chunk's
        vector depends on its text alone, so an upsert that changes a document's metadata,
        or part of its text, embeds only the chunk texts that are new (each once per batch)."""
        embedder = self._embedder()
        if self._chunker is None:
            self._chunker = chunker_for(self.col, embedder)
        chunked = self._chunker.chunk_many([(d.doc_id, d.text) for d in docs])
        reused = sum(c.text in known for chunks in chunked for c in chunks)
        new = list(dict.fromkeys(c.text for chunks in chunked for c in chunks if c.text not in known))
        if new:
            known = {**known, **dict(zip(new, embedder.embed(new)))}
        dim = self.col.settings["dim"]
        out = [(chunks, np.array([known[c.text] for c in chunks], np.float32).reshape(len(chunks), dim))
               for chunks in chunked]
        return out, reused


def _batch(col: Collection, local: _Local, docs: list[Document | Prepared], report: IngestReport) -> None:
    # Later duplicates of an id in one batch win, as if sent one after another.
    by_id: dict[str, Document | Prepared] = {}
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
            todo.append((d.reload() if isinstance(d, Prepared) and d.chunks is None else d, h))
    if not todo:
        return
    here = [d for d, _ in todo if isinstance(d, Document)]
    done: Iterable = ()
    if here:  # the chunk texts these documents have stored now (updates) need no embedding
        done, reused = local.chunk_embed(here, col.store.chunk_vectors([d.doc_id for d in here if d.doc_id in stored]))
        report.chunks_reused += reused
    done = iter(done)
    records_in = []
    for d, h in todo:
        chunks, vectors = next(done) if isinstance(d, Document) else (d.chunks, d.vectors)
        report.chunks_reused += d.reused if isinstance(d, Prepared) else 0
        if not chunks:
            report.fail(Failure(d.source, "no indexable text (no tokens after tokenization)"), d.doc_id)
            continue
        records_in.append((d, h, chunks, vectors))
    if not records_in:
        return
    records = [DocumentRecord(d.doc_id, d.source, h, d.metadata,
                              len(d.text) if isinstance(d, Document) else d.n_chars, chunks, vectors)
               for d, h, chunks, vectors in records_in]
    change = col.commit(records)
    for d, _, chunks, _ in records_in:
        if d.doc_id in stored:
            report.documents_updated += 1
            report.results[d.doc_id] = ("updated", len(chunks), "")
        else:
            report.documents_added += 1
            report.results[d.doc_id] = ("added", len(chunks), "")
    report.chunks_added += len(change.added_keys)
    report.chunks_removed += len(change.removed_keys)


def delete(col: Collection, doc_ids, filter: dict | None = None) -> int:
    """Delete documents by id, or (`filter`) every document whose metadata matches, as the
    write finds them; returns how many existed. Unknown ids are not an error."""
    if isinstance(doc_ids, str):
        raise InvalidInput("doc_ids must be a list of ids, not one string")
    if filter and len(doc_ids):
        raise InvalidInput("give document ids or a filter to delete by, not both")
    with col.write_lock:
        chosen = col.store.filter_documents(filter) if filter else dict.fromkeys(doc_ids)
        present = [d for d in chosen if col.store.has_document(d)]
        if not present:
            return 0
        col.commit([], deletes=present)
        return len(present)
