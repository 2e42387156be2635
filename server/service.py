"""Servicers of rag.v1: translate messages to engine calls and engine results to messages."""

from __future__ import annotations

import functools
import inspect
import itertools
import os
import socket
import struct
import tempfile
import threading
import time

import grpc

from engine.documents import Document, Failure, check_document_size, parse_bytes
from engine.config import MAX_TOP_K
from engine.errors import FailedPrecondition, InvalidInput
from engine.plan import cpu_key
from engine.rag import Answer, AnswerStart
from engine.search import MAX_QUERY_CHARS, at_least, check_min_cosine

from .convert import (PB_TO_DTYPE, STATUS_TO_PB, answer_done_pb, batch_filters, check_top_k, document_metadata,
                      document_text_pb, export_messages, export_settings, hit_pb, info_pb, message_records, page_size,
                      request_filter, sampling_params, search_mode, sources_pb, stored_document_pb)
from .errors import abort
from .stubs import pb, rpc

VERSION = "0.1.0"
# GetInfoResponse.features: request fields older servers ignore, which clients check for.
FEATURES = ["filter_groups", "query_filters", "metadata_json", "min_cosine", "list_contains", "filter_not"]


def optional(message, field: str):
    """A message's optional field, or None where it is unset."""
    return getattr(message, field) if message.HasField(field) else None


def guarded(fn):
    """Run a handler; typed engine errors become their status code (server/errors.py).
    Works for unary handlers and for server-streaming ones (generators) alike."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(self, request, context):
            try:
                yield from fn(self, request, context)
            except grpc.RpcError:
                raise
            except Exception as e:  # noqa: BLE001 - typed errors map to codes; others are INTERNAL, logged once
                abort(context, e)
        return stream

    @functools.wraps(fn)
    def unary(self, request, context):
        try:
            return fn(self, request, context)
        except grpc.RpcError:
            raise
        except Exception as e:  # noqa: BLE001
            abort(context, e)
    return unary


SPOOL_MEMORY_BYTES = 16 * 1024 * 1024
_LEN = struct.Struct("<I")


def end_if_gone(context, when: str) -> None:
    """Abort a call whose deadline has passed or whose client cancelled (say, while it waited
    for a worker thread): its client already sees it as failed, so do no work and change nothing."""
    remaining = context.time_remaining()  # None: no deadline
    if remaining is not None and remaining <= 0:
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"the deadline passed {when}; nothing was changed")
    if not context.is_active():
        context.abort(grpc.StatusCode.CANCELLED, f"the call was cancelled {when}; nothing was changed")


class Servicer(rpc.CollectionServiceServicer, rpc.IngestServiceServicer, rpc.RetrieveServiceServicer,
               rpc.AnswerServiceServicer, rpc.InfoServiceServicer):
    def __init__(self, engine, batcher, metrics=None) -> None:
        self.engine = engine
        self.config = engine.config
        self.batcher = batcher
        self.metrics = metrics
        self._write_lock = threading.Lock()

    # ------------------------------------------------------------------ collections
    @guarded
    def CreateCollection(self, request, context):
        dtype = PB_TO_DTYPE.get(request.dtype) if request.dtype else None
        if request.dtype and dtype is None:
            raise InvalidInput(f"unknown dtype {request.dtype}")
        info = self.engine.create_collection(request.name, index_dtype=dtype,
                                             connectivity=optional(request, "connectivity"),
                                             expansion_add=optional(request, "expansion_add"),
                                             expansion_search=optional(request, "expansion_search"),
                                             chunk_tokens=optional(request, "chunk_tokens"),
                                             chunk_overlap=optional(request, "chunk_overlap"))
        return pb.CreateCollectionResponse(collection=info_pb(info))

    @guarded
    def ListCollections(self, request, context):
        return pb.ListCollectionsResponse(collections=[info_pb(i) for i in self.engine.list_collections()])

    @guarded
    def DescribeCollection(self, request, context):
        return pb.DescribeCollectionResponse(collection=info_pb(self.engine.describe(request.name)))

    @guarded
    def DropCollection(self, request, context):
        self.engine.drop_collection(request.name)
        return pb.DropCollectionResponse()

    @guarded
    def CopyCollection(self, request, context):
        if self.config.read_only:
            raise FailedPrecondition(f"this server is read-only (a replica); collection {request.new_name!r} "
                                     "cannot be made here: copy on the collection's writer")
        return pb.CopyCollectionResponse(collection=info_pb(self.engine.copy_collection(request.name,
                                                                                        request.new_name)))

    @guarded
    def ExportCollection(self, request, context):
        settings, batches = self.engine.export_collection(request.name)
        yield from export_messages(settings, batches)

    @guarded
    def ImportCollection(self, request_iterator, context):
        if self.config.read_only:
            raise FailedPrecondition("this server is read-only (a replica); a collection cannot be imported here: "
                                     "import it on the collections' writer")
        requests = iter(request_iterator)
        first = next(requests, None)
        if first is None or not first.name:
            raise InvalidInput("the first ImportCollection message names the new collection (name); "
                               + ("the stream was empty" if first is None else "this one has no name"))
        name, settings = first.name, export_settings(first.part)

        def parts():
            yield first.part
            for req in requests:
                if req.name and req.name != name:
                    raise InvalidInput(f"all messages of one ImportCollection name {name!r} (or leave name empty); "
                                       f"one names {req.name!r}")
                yield req.part
        records = message_records(parts(), settings.get("dim"))
        return pb.ImportCollectionResponse(collection=info_pb(self.engine.import_collection(name, settings, records)))

    # ------------------------------------------------------------------ ingestion
    def _documents(self, requests, order: list[str], state: dict):
        for req in requests:
            if req.collection:
                if state.get("collection") not in (None, req.collection):
                    raise InvalidInput("all messages of one IngestStream must name the same collection")
                state["collection"] = req.collection
            d = req.document
            doc_id = d.id
            order.append(doc_id)
            source = d.source or doc_id
            if not doc_id.strip():
                yield Failure(f"#{len(order)}", "document id is empty; give every document an id")
                continue
            try:
                meta = document_metadata(d)
            except InvalidInput as e:
                yield Failure(doc_id, str(e))
                continue
            kind = d.WhichOneof("content")
            if kind is not None:
                try:
                    check_document_size(doc_id, getattr(d, kind), self.config.max_document_bytes)
                except InvalidInput as e:
                    yield Failure(doc_id, str(e))
                    continue
            if kind == "text":
                yield Document(doc_id=doc_id, text=d.text, source=source, metadata=meta)
            elif kind == "data":
                try:
                    yield from parse_bytes(d.data, d.media_type or "text/plain", source, doc_id=doc_id, metadata=meta)
                except InvalidInput as e:
                    yield Failure(doc_id, str(e))
            else:
                yield Failure(doc_id, "document has neither text nor data")

    def _spool(self, first, rest, context):
        """Read the whole stream before anything is stored: a stream that turns out bad
        (a malformed message, another collection, a passed deadline) changes nothing, however
        many documents came first. Messages wait in a temporary file (in memory up to
        SPOOL_MEMORY_BYTES), not all in RAM."""
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)
        try:
            for req in itertools.chain([first], rest):
                if req.collection and req.collection != first.collection:
                    raise InvalidInput("all messages of one IngestStream must name the same collection "
                                       f"({first.collection!r}, then {req.collection!r}); nothing was stored")
                data = req.SerializeToString()
                spool.write(_LEN.pack(len(data)))
                spool.write(data)
            # A stream cut off by its deadline can end like a finished one (grpc's request
            # iterator may stop instead of raising): check before anything is stored.
            end_if_gone(context, "while the stream was read")
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool

    @staticmethod
    def _unspool(spool):
        while head := spool.read(_LEN.size):
            (n,) = _LEN.unpack(head)
            yield pb.IngestStreamRequest.FromString(spool.read(n))

    @guarded
    def IngestStream(self, request_iterator, context):
        order: list[str] = []
        state: dict = {}
        it = iter(request_iterator)
        first = next(it, None)
        if first is None:
            raise InvalidInput("the stream had no documents")
        if not first.collection:
            raise InvalidInput("the first IngestStreamRequest must name the collection")
        t0 = time.perf_counter_ns()
        with self._spool(first, it, context) as spool:
            report = self.engine.ingest(first.collection, self._documents(self._unspool(spool), order, state))
        results = []
        for i, doc_id in enumerate(order, start=1):
            # documents without an id are reported by position ("#3")
            status, chunks, error = report.results.get(doc_id) or report.results.get(
                f"#{i}", ("failed", 0, "not processed"))
            results.append(pb.DocumentResult(id=doc_id, status=STATUS_TO_PB[status], chunks=chunks, error=error))
        return pb.IngestStreamResponse(results=results, chunks_added=report.chunks_added,
                                       chunks_removed=report.chunks_removed, chunks_reused=report.chunks_reused,
                                       documents_added=report.documents_added,
                                       documents_updated=report.documents_updated,
                                       documents_unchanged=report.documents_unchanged,
                                       ingest_time_ns=time.perf_counter_ns() - t0)

    @guarded
    def DeleteDocuments(self, request, context):
        n = self.engine.delete_documents(request.collection, list(request.ids), filter=request_filter(request))
        return pb.DeleteDocumentsResponse(deleted=n)

    @guarded
    def ListDocuments(self, request, context):
        docs, after = self.engine.list_documents(request.collection, filter=request_filter(request),
                                                 limit=page_size(request.page_size), after=request.page_token or None)
        return pb.ListDocumentsResponse(documents=[stored_document_pb(d) for d in docs], next_page_token=after or "")

    @guarded
    def GetDocuments(self, request, context):
        found, missing = self.engine.get_documents(request.collection, list(request.ids))
        response = pb.GetDocumentsResponse(documents=[document_text_pb(d) for d in found], missing_ids=missing)
        if (size := response.ByteSize()) > self.config.max_message_bytes:
            raise InvalidInput(f"the {len(found)} documents asked for come to {size} bytes, over the server's "
                               f"{self.config.max_message_bytes}-byte message limit; ask for fewer at a time")
        return response

    # ------------------------------------------------------------------ retrieval
    def _check_batch(self, n: int, what: str) -> None:
        if n == 0:
            raise InvalidInput(f"no {what} given")
        if n > self.config.max_batch_request:
            raise InvalidInput(f"{n} {what} in one request; the limit is {self.config.max_batch_request}")

    @guarded
    def Embed(self, request, context):
        texts = list(request.texts)
        self._check_batch(len(texts), "texts")
        for i, t in enumerate(texts):
            if len(t) > MAX_QUERY_CHARS:  # the model reads only its first few hundred tokens anyway
                raise InvalidInput(f"text {i} is {len(t)} characters; the limit is {MAX_QUERY_CHARS}")
        t0 = time.perf_counter_ns()
        vectors, queue_ns, embed_ns = self.batcher.embed(texts)
        return pb.EmbedResponse(vectors=[pb.Vector(values=v.tolist()) for v in vectors], model=self.engine.embedder.name,
                                timings=pb.Timings(queue_time_ns=max(queue_ns, 0), embed_time_ns=embed_ns,
                                                   total_time_ns=time.perf_counter_ns() - t0))

    @guarded
    def Search(self, request, context):
        t0 = time.perf_counter_ns()
        floor = check_min_cosine(optional(request, "min_cosine"))
        hits, queue_ns, embed_ns, search_ns = self.batcher.search(
            request.collection, request.query, check_top_k(request.top_k), request_filter(request),
            search_mode(request.mode))
        return pb.SearchResponse(hits=[hit_pb(h) for h in at_least(hits, floor)],
                                 timings=pb.Timings(queue_time_ns=max(queue_ns, 0), embed_time_ns=embed_ns,
                                                    search_time_ns=search_ns,
                                                    total_time_ns=time.perf_counter_ns() - t0))

    @guarded
    def SearchBatch(self, request, context):
        queries = list(request.queries)
        self._check_batch(len(queries), "queries")
        floor = check_min_cosine(optional(request, "min_cosine"))
        t0 = time.perf_counter_ns()
        found = self.engine.searcher.search(request.collection, queries, check_top_k(request.top_k),
                                            filter=request_filter(request), mode=search_mode(request.mode),
                                            filters=batch_filters(request, "query_filters", len(queries),
                                                                  ("query", "queries")))
        return pb.SearchBatchResponse(results=[pb.HitList(hits=[hit_pb(h) for h in at_least(hits, floor)])
                                               for hits in found.hits],
                                      timings=pb.Timings(embed_time_ns=found.embed_ns, search_time_ns=found.search_ns,
                                                         total_time_ns=time.perf_counter_ns() - t0))

    # ------------------------------------------------------------------ answers
    @guarded
    def Answer(self, request, context):
        t0 = time.perf_counter_ns()
        params = sampling_params(request.options, self.config.max_new_tokens)
        k = check_top_k(request.top_k) if request.HasField("top_k") else None
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        first_token_at = None
        # The scheduler (engine/scheduler.py) batches this answer with every other one; it
        # leaves the batch at the next step once the client cancels or the deadline passes.
        stream = self.engine.answer_stream(request.collection, request.question, k=k, params=params,
                                           filter=request_filter(request), min_cosine=optional(request, "min_cosine"),
                                           cancelled=lambda: not context.is_active(), deadline=deadline)
        try:
            for ev in stream:
                if not context.is_active():
                    break  # closing the stream (below) frees the row
                if isinstance(ev, AnswerStart):
                    yield pb.AnswerResponse(sources=pb.AnswerSources(sources=sources_pb(ev.sources)))
                elif isinstance(ev, Answer):
                    if self.metrics:
                        self.metrics.answered(ev)
                    yield pb.AnswerResponse(done=answer_done_pb(ev, time.perf_counter_ns() - t0))
                else:
                    if first_token_at is None:
                        first_token_at = time.perf_counter_ns()
                        if self.metrics:
                            self.metrics.ttft.observe((first_token_at - t0) / 1e9)
                    yield pb.AnswerResponse(delta=pb.AnswerDelta(text=ev))
        finally:
            stream.close()

    @guarded
    def AnswerBatch(self, request, context):
        questions = list(request.questions)
        self._check_batch(len(questions), "questions")
        params = sampling_params(request.options, self.config.max_new_tokens)
        k = check_top_k(request.top_k) if request.HasField("top_k") else None
        t0 = time.perf_counter_ns()
        answers = self.engine.answer_batch(request.collection, questions, k=k, params=params,
                                           filter=request_filter(request), min_cosine=optional(request, "min_cosine"),
                                           filters=batch_filters(request, "question_filters", len(questions),
                                                                 ("question", "questions")))
        total = time.perf_counter_ns() - t0
        if self.metrics:
            for a in answers:
                self.metrics.answered(a)
        return pb.AnswerBatchResponse(answers=[
            pb.BatchAnswer(text=a.text, sources=sources_pb(a.sources), done=answer_done_pb(a, total))
            for a in answers])

    # ------------------------------------------------------------------ info
    @guarded
    def GetInfo(self, request, context):
        c = self.config
        emb = self.engine.embedder
        gen_name, window = c.gen_model, c.context_window
        plan = self.engine.execution_plan
        if self.engine.generator_loaded:
            gen_name, window = self.engine.generator.name, self.engine.generator.window
        return pb.GetInfoResponse(version=VERSION, embedding_model=emb.name, embedding_dims=emb.dim,
                                  embedding_max_tokens=emb.max_length, generation_model=gen_name,
                                  context_window=window, max_top_k=MAX_TOP_K, max_batch=c.max_batch_request,
                                  max_message_bytes=c.max_message_bytes,
                                  max_concurrent_generations=c.max_concurrent_generations,
                                  execution_provider=c.provider, max_document_bytes=c.max_document_bytes,
                                  search_mode=c.search_mode, cpu=cpu_key(),
                                  execution_plan=plan.describe() if plan else "",
                                  max_queued_generations=c.max_queued_generations, fusion=c.fusion,
                                  read_only=c.read_only, server_id=f"{socket.gethostname()} pid {os.getpid()}",
                                  scheduler=self.engine.scheduler_description, features=FEATURES)
