"""The engine facade: one object a caller (the CLI, the server, Python code) holds.

It owns the configuration, the lazily loaded models and the collection registry, and
delegates each pipeline arrow to its module:
  engine/collection.py  collections: open (one writer per collection), create, list, drop
  engine/ingest.py      documents -> chunk -> embed -> commit, with a report
  engine/search.py      question -> hybrid (or dense) ranking -> hits
  engine/rag.py         hits -> prompt with numbered sources -> generated answer
It imports nothing from gRPC: the server calls these methods and maps the typed errors of
engine/errors.py to status codes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from . import ingest as ingestion
from . import kernels
from .collection import Collection, CollectionInfo, Collections, check_index_settings, check_name, check_settings
from .config import MAX_GET_DOCUMENTS, MAX_LIST_PAGE, Config
from .documents import Document, Failure, check_jsonl_fields, iter_documents, rebuild_text
from .errors import FailedPrecondition, InvalidInput
from .ingest import IngestReport, ProgressFn
from .rag import Answer, Answerer, AnswerStart, Source
from .filters import check_filter
from .search import (MAX_QUERY_CHARS, Hit, Searcher, SearchResult, at_least, check_k, check_min_cosine, check_query,
                     hit_to_json)
from .store import DocumentRecord, DocumentText, StoredDocument

__all__ = ["Answer", "AnswerStart", "Collection", "CollectionInfo", "DocumentText", "Engine", "Hit", "IngestReport",
           "MAX_QUERY_CHARS", "SearchResult", "Source", "StoredDocument", "hit_to_json"]


class Engine:
    """Retrieval engine over the collections in `config.data_dir`.

    `owner` describes this process to a second writer that finds a collection locked
    ({"command": "rag serve", "address": "127.0.0.1:50051"}; engine/lock.py).
    """

    def __init__(self, config: Config | None = None, *, embedder=None, generator=None,
                 owner: dict | None = None) -> None:
        self.config = config or Config()
        self._embedder = embedder
        self._generator = generator
        self._scheduler = None
        self._plan = None  # the generator's execution plan (engine/plan.py), once it is loaded
        self._lock = threading.RLock()
        self.collections = Collections(self.config, owner=owner)
        self.searcher = Searcher(self.config, self.collections, lambda: self.embedder)
        self.answerer = Answerer(self.config, self.searcher, lambda: self.generator, lambda: self.scheduler,
                                 lambda: self.embedder)

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
                from .plan import for_config

                c = self.config
                plan = for_config(c)
                self._generator = Generator(c.gen_model_dir, variant=plan.decode, provider=c.provider,
                                            threads=c.threads, context_window=c.context_window,
                                            prefill_variant=plan.prefill, verify_variant=plan.verify,
                                            stop_spinning=c.stop_spinning)
                self._plan = plan
            return self._generator

    @property
    def generator_loaded(self) -> bool:
        return self._generator is not None

    @property
    def execution_plan(self):
        """Which weights prefill and which decode (engine/plan.py); None before the generator loads."""
        if self._plan is None and self._generator is not None:
            from .plan import Plan, cpu_key

            g = self._generator
            self._plan = Plan(g.prefill_variant, g.variant, "config", cpu_key(), verify=g.verify_variant)
        return self._plan

    @property
    def scheduler(self):
        """The generation scheduler (engine/scheduler.py): every answer goes through it."""
        with self._lock:
            if self._scheduler is None:
                from .scheduler import Scheduler

                c = self.config
                generator = self.generator  # and the plan it runs (execution_plan)
                self._scheduler = Scheduler(generator, max_rows=c.max_concurrent_generations,
                                            max_queue=c.max_queued_generations, kv_budget_tokens=c.kv_budget_tokens,
                                            prefill_chunk=c.prefill_chunk, block_tokens=c.prefix_block_tokens,
                                            prefix_cache_mb=c.prefix_cache_mb, prefill_stall_ms=c.prefill_stall_ms,
                                            draft_tokens=c.draft_tokens, adaptive_drafts=c.adaptive_drafts,
                                            draft_worth=self.execution_plan.draft_worth())
            return self._scheduler

    @property
    def scheduler_description(self) -> str:
        """What the scheduler measured on this machine (Scheduler.describe); "" before it starts."""
        s = self._scheduler
        return s.describe() if s is not None else ""

    def generation_load(self) -> tuple[int, int]:
        """(answers being generated, answers queued); (0, 0) before the first answer."""
        s = self._scheduler
        return (s.running, s.waiting) if s is not None else (0, 0)

    def generation_usage(self) -> dict:
        """Where the generation loop's time went (Scheduler.usage); zeros before the first answer."""
        from .scheduler import empty_usage

        s = self._scheduler
        return s.usage() if s is not None else empty_usage()

    def warmup(self, generation: bool = False) -> None:
        kernels.warmup()
        self.embedder.warmup()
        if generation:
            self.generator.warmup()

    # ------------------------------------------------------------------ collections
    @property
    def root(self) -> Path:
        return self.collections.root

    def create_collection(self, name: str, *, index_dtype: str | None = None, connectivity: int | None = None,
                          expansion_add: int | None = None, expansion_search: int | None = None,
                          chunk_tokens: int | None = None, chunk_overlap: int | None = None) -> CollectionInfo:
        """Create an empty collection; its settings are fixed for its lifetime."""
        check_name(name)
        c = self.config

        def pick(value, default):
            return default if value is None else value

        settings = check_index_settings({
            "index_dtype": pick(index_dtype, c.index_dtype),
            "connectivity": pick(connectivity, c.connectivity),
            "expansion_add": pick(expansion_add, c.expansion_add),
            "expansion_search": pick(expansion_search, c.expansion_search),
            "chunk_tokens": pick(chunk_tokens, c.chunk_tokens),
            "chunk_overlap": pick(chunk_overlap, c.chunk_overlap),
        })
        emb = self.embedder
        settings.update(dim=emb.dim, embed_model=emb.name, created_at=time.time())
        self.collections.create(name, settings)
        return self.describe(name)

    def list_collections(self) -> list[CollectionInfo]:
        return [self.describe(n) for n in self.collections.names()]

    def describe(self, name: str) -> CollectionInfo:
        return self.collections.get(name).info()

    def drop_collection(self, name: str) -> None:
        self.collections.drop(name)

    def copy_collection(self, name: str, new_name: str, *, data_dir: str | Path | None = None,
                        source_dir: str | Path | None = None,
                        progress: Callable[[int], None] | None = None) -> CollectionInfo:
        """Copy collection `name` (its documents, chunks, stored vectors and settings) to
        `new_name`, from this data dir or `source_dir`, into this data dir or `data_dir` (a
        backup; restore one by copying it back). The copy is of one moment, read beside any
        writer of `name`, which goes on (engine/store.py Store.export); nothing is embedded
        again. It appears complete or not at all (Collections.build). `progress(documents)`
        after each batch."""
        check_name(new_name)
        with self._registry(source_dir, write=False) as src_cols, self._registry(data_dir, write=True) as dest:
            src = src_cols.get(name)  # a reader where another process writes it (or a read-only engine)
            dest.build(new_name, {**src.store.settings, "created_at": time.time()}, src.store.export(), progress)
            return dest.get(new_name).info()

    @contextlib.contextmanager
    def _registry(self, data_dir: str | Path | None, *, write: bool) -> Iterator[Collections]:
        """This engine's collections when `data_dir` is None or this data dir (and they can be
        written, if `write`), else a registry of `data_dir`'s own, closed after use."""
        here = data_dir is None or Path(data_dir).resolve() == Path(self.config.data_dir).resolve()
        if here and not (write and self.collections.read_only):
            yield self.collections
            return
        other = Collections(self.config.replace(data_dir=Path(data_dir or self.config.data_dir), read_only=not write),
                            owner=self.collections.owner)
        try:
            yield other
        finally:
            other.close()

    def export_collection(self, name: str, *, batch_chunks: int = 4096) -> tuple[dict, Iterator[list[DocumentRecord]]]:
        """Collection `name`'s settings and its documents with their chunks and stored vectors,
        as of one moment (Store.export: the read starts at the first batch), in batches of
        about `batch_chunks` chunks: a backup to keep elsewhere or a copy for another engine
        (import_collection there)."""
        store = self.collections.get(name).store
        return dict(store.settings), store.export(batch_chunks)

    def import_collection(self, new_name: str, settings: dict, batches: Iterable[Sequence[DocumentRecord]], *,
                          progress: Callable[[int], None] | None = None) -> CollectionInfo:
        """Make collection `new_name` from an exported one (export_collection, here or on
        another engine): its settings and every record checked as they arrive (InvalidInput
        naming the first bad one), its vectors used as they are. FailedPrecondition if they
        come from another embedding model than this engine's, which could not search them.
        The collection appears complete or not at all."""
        check_name(new_name)
        check = check_settings(settings)
        emb = self.embedder
        if (check["embed_model"], check["dim"]) != (emb.name, emb.dim):
            raise FailedPrecondition(f"the collection was embedded with {check['embed_model']} (dim {check['dim']}) "
                                     f"but this engine runs {emb.name} (dim {emb.dim}), so it could not search it; "
                                     "import it where that model runs, or ingest its documents here")
        self.collections.receive(new_name, settings, batches, progress)
        return self.describe(new_name)

    # ------------------------------------------------------------------ ingestion
    def _writer(self, name: str) -> Collection:
        col = self.collections.get(name, write=True)
        self.searcher.check_model(col)
        return col

    def ingest(self, name: str, documents: Iterable[Document | Failure], *,
               progress: ProgressFn | None = None) -> IngestReport:
        """Upsert documents (engine/ingest.py): unchanged ones skipped, changed ones replaced."""
        return ingestion.ingest(self._writer(name), lambda: self.embedder, documents, progress=progress)

    def ingest_paths(self, name: str, paths: Sequence[str | Path], *, text_field: str = "text",
                     id_field: str = "id", progress: ProgressFn | None = None) -> IngestReport:
        """Upsert the documents of files and directory trees (a JSONL record's text in its
        `text_field`, its id in `id_field`)."""
        check_jsonl_fields(text_field, id_field)
        return self.ingest(name, iter_documents(paths, text_field=text_field, id_field=id_field), progress=progress)

    def get_documents(self, name: str, ids: Sequence[str]) -> tuple[list[DocumentText], list[str]]:
        """The documents of `ids` (1..MAX_GET_DOCUMENTS ids, each once) with their text rebuilt
        from their chunks, exactly where the stored content hash confirms it (DocumentText), in
        the order asked; and the ids the collection does not hold."""
        if isinstance(ids, str) or not isinstance(ids, Sequence) or not 1 <= len(ids) <= MAX_GET_DOCUMENTS:
            raise InvalidInput(f"give 1 to {MAX_GET_DOCUMENTS} document ids, got "
                               f"{len(ids) if isinstance(ids, Sequence) and not isinstance(ids, str) else repr(ids)}")
        if bad := [i for i in ids if not isinstance(i, str) or not i.strip()]:
            raise InvalidInput(f"document ids must be non-empty strings, got {bad[0]!r}")
        ids = list(dict.fromkeys(ids))
        found = self.collections.get(name).store.documents_with_chunks(ids)
        out = []
        for doc, chunks in found:
            text, exact = rebuild_text(doc.doc_id, chunks, doc.n_chars, doc.metadata, doc.content_hash)
            out.append(DocumentText(doc, text, exact, [(c.start, c.end, c.n_tokens) for c in chunks]))
        have = {d.document.doc_id for d in out}
        return out, [i for i in ids if i not in have]

    def list_documents(self, name: str, *, filter: dict | None = None, limit: int = 100,
                       after: str | None = None) -> tuple[list[StoredDocument], str | None]:
        """One page of a collection's documents, in id order: up to `limit` (1..MAX_LIST_PAGE)
        whose ids sort after `after` (None: from the first), those `filter` matches if given
        (as search's); and the `after` of the next page, None when this one is the last.
        Each carries its id, source, content hash, metadata, size in characters and chunks,
        and when it was stored."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_PAGE:
            raise InvalidInput(f"limit must be an integer in [1, {MAX_LIST_PAGE}], got {limit!r}")
        if after is not None and not isinstance(after, str):
            raise InvalidInput(f"after must be a document id (the previous page's next token), got {after!r}")
        filter = check_filter(filter)
        docs = self.collections.get(name).store.list_documents(filter, after or "", limit + 1)
        return docs[:limit], docs[limit - 1].doc_id if len(docs) > limit else None

    def delete_documents(self, name: str, doc_ids: Sequence[str] = (), *, filter: dict | None = None) -> int:
        """Delete documents by id, or every document whose metadata matches `filter` (as
        search's; not both); returns how many existed. Unknown ids are not an error."""
        return ingestion.delete(self.collections.get(name, write=True), doc_ids, check_filter(filter))

    def save(self) -> None:
        """Snapshot every open collection: store and index synced, write-ahead log emptied.
        Not needed for durability (the log gives that); it makes the next start quick."""
        for col in self.collections.opened():
            col.snapshot()

    def close(self) -> None:
        with self._lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.close()
        self.save()
        self.collections.close()

    # ------------------------------------------------------------------ search
    check_query = staticmethod(check_query)
    check_k = staticmethod(check_k)

    def check_mode(self, mode: str | None) -> str:
        return self.searcher.check_mode(mode)

    def search(self, name: str, query: str, k: int = 5, *, filter: dict | None = None,
               mode: str | None = None, min_cosine: float | None = None) -> list[Hit]:
        return self.search_batch(name, [query], k, filter=filter, mode=mode, min_cosine=min_cosine)[0]

    def search_batch(self, name: str, queries: Sequence[str], k: int = 5, *,
                     filter: dict | None = None, mode: str | None = None,
                     vectors: np.ndarray | None = None, filters: Sequence[dict | None] | None = None,
                     min_cosine: float | None = None) -> list[list[Hit]]:
        """Top-k hits per query (engine/search.py): one embedding batch (unless `vectors`
        are given), one index batch search, exact rescoring, and (mode "hybrid", the
        default) fusion with a BM25 ranking of the same collection. `filters`: each
        query's own filter (or None), to hold with `filter`. `min_cosine`: leave out hits
        less similar to their query (so fewer than k may come back)."""
        floor = check_min_cosine(min_cosine)
        found = self.searcher.search(name, queries, k, filter=filter, mode=mode, vectors=vectors, filters=filters)
        return [at_least(hits, floor) for hits in found.hits]

    # ------------------------------------------------------------------ answers
    def relevant(self, hits: Sequence[Hit]) -> list[Hit]:
        return self.answerer.relevant(hits)

    def build_prompt(self, question: str, hits: Sequence[Hit], max_new_tokens: int, *, vector=None):
        """`vector`: the question's embedding if the caller has it (SearchResult.vectors)."""
        return self.answerer.build_prompt(question, hits, max_new_tokens, vector=vector)

    def answer_stream(self, name: str, question: str, *, k: int | None = None, params=None,
                      filter: dict | None = None, cancelled: Callable[[], bool] | None = None,
                      deadline: float | None = None, min_cosine: float | None = None):
        """Yields AnswerStart (sources), then text deltas (str), then the final Answer.
        `filter`: retrieve only chunks whose metadata matches (as search). `deadline`
        (time.monotonic()) and `cancelled()` stop generation at the next step. `min_cosine`:
        passages less similar to the question are not shown to the generator (default
        config.answer_min_score; none left: the answer finishes no_context)."""
        return self.answerer.stream(name, question, k=k, params=params, filter=filter, cancelled=cancelled,
                                    deadline=deadline, min_cosine=min_cosine)

    def answer(self, name: str, question: str, **kw) -> Answer:
        *_, final = self.answer_stream(name, question, **kw)
        return final

    def answer_batch(self, name: str, questions: Sequence[str], *, k: int | None = None, params=None,
                     filter: dict | None = None, progress: Callable[[int], None] | None = None,
                     filters: Sequence[dict | None] | None = None, min_cosine: float | None = None) -> list[Answer]:
        """Answers for many questions, batched by the scheduler (up to
        config.max_concurrent_generations rows at a time); results in input order.
        `filters`: each question's own filter for its retrieval (or None), with `filter`.
        `min_cosine`: as answer_stream's."""
        return self.answerer.batch(name, questions, k=k, params=params, filter=filter, progress=progress,
                                   filters=filters, min_cosine=min_cosine)
