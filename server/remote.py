"""`rag COMMAND --server HOST:PORT`: the CLI's commands done by a running server, through its
gRPC API (server/client.py), printing what the same command prints when it runs in this
process (engine/cli.py).

A server holds its collections' writer locks, so while it runs this is how the CLI writes to
them: `rag ingest` reads and parses the files here (the same documents, ids and metadata as a
local ingest) and streams them to the server, in streams of at most STREAM_BYTES each (each
stream is stored whole or not at all, and a long ingest shows its progress); batches of
queries or questions go out in requests the server's limits allow (GetInfo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from engine.cli import (Counted, Progress, copied_line, created_line, delete_filter, deleted_line, exported_line,
                        flag_filter, imported_line, ingest_documents, line_filters, make_config, print_answer_footer,
                        print_collections, print_documents, print_ingest, print_search, print_texts, read_questions,
                        write_lines)
from engine.collection import Collections
from engine.documents import Document, Failure, check_document_size
from engine.errors import InvalidInput
from engine.ingest import IngestReport
from engine.pipeline import Engine
from engine.support import source_label

from . import backup
from .client import RagClient
from .convert import FINISH_TO_PB, PB_TO_DTYPE
from .stubs import pb

# One IngestStream carries documents up to this many bytes of text (or STREAM_DOCS documents):
# below the server's in-memory spool (16 MiB), and large enough that embedding, not the
# per-stream commit, is what an ingest spends its time on.
STREAM_BYTES = 8 * 1024 * 1024
STREAM_DOCS = 2000
# Hits per SearchBatch response at most (its queries x k): ~2 KB a hit keeps a response far
# below the message limit whatever k is.
HITS_PER_REQUEST = 8192
FINISH_FROM_PB = {pb.FINISH_REASON_UNSPECIFIED: "", **{v: k for k, v in FINISH_TO_PB.items()}}


def run_remote(args: argparse.Namespace) -> int:
    """Run `args.command` through the server(s) at `args.server`; gRPC errors are printed
    as `error: CODE: details` (exit 2), as the CLI prints its own errors."""
    if getattr(args, "ray", None):
        raise InvalidInput("--ray runs the work here, on Ray; --server sends it to a running server: give one")
    client = connect(args)
    try:
        return COMMANDS[args.command](client, args)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    finally:
        client.close()


def connect(args: argparse.Namespace) -> RagClient:
    """A client of `--server` with `--token` and, if given, TLS (`--tls-ca`, mTLS's client pair)."""
    tls = {}
    if args.tls_client_cert or args.tls_client_key:
        if not (args.tls_client_cert and args.tls_client_key and args.tls_ca):
            raise InvalidInput("--tls-client-cert and --tls-client-key go together, with --tls-ca")
    if args.tls_ca:
        names = {"root_certificates": args.tls_ca, "certificate_chain": args.tls_client_cert,
                 "private_key": args.tls_client_key}
        for key, path in names.items():
            if path is not None:
                try:
                    tls[key] = path.read_bytes()
                except OSError as e:
                    raise InvalidInput(f"cannot read {path} ({e.strerror})") from None
    return RagClient(args.server, token=args.token or os.environ.get("RAG_AUTH_TOKEN"), **tls)


# ---------------------------------------------------------------- collections and info
def collection_json(c) -> dict:
    """A CollectionInfo message as engine/collection.CollectionInfo's fields (`rag collections --json`)."""
    return {"name": c.name, "documents": c.documents, "chunks": c.chunks, "dim": c.dims,
            "embed_model": c.embedding_model, "index_dtype": PB_TO_DTYPE.get(c.dtype, "?"),
            "connectivity": c.connectivity, "expansion_add": c.expansion_add, "expansion_search": c.expansion_search,
            "chunk_tokens": c.chunk_tokens, "chunk_overlap": c.chunk_overlap, "disk_bytes": c.disk_bytes,
            "index_memory_bytes": c.index_memory_bytes}


def collections(client: RagClient, args: argparse.Namespace) -> int:
    print_collections([collection_json(c) for c in client.list_collections()], args.json,
                      f"no collections on {args.server}")
    return 0


def create(client: RagClient, args: argparse.Namespace) -> int:
    settings = {k: v for k, v in (("connectivity", args.connectivity), ("expansion_add", args.expansion_add),
                                  ("expansion_search", args.expansion_search)) if v is not None}
    print(created_line(collection_json(client.create_collection(args.name, args.dtype, **settings))))
    return 0


def drop(client: RagClient, args: argparse.Namespace) -> int:
    client.drop_collection(args.name)
    print(f"dropped {args.name}")
    return 0


def copy(client: RagClient, args: argparse.Namespace) -> int:
    """In the server's data dir; with --to, from the server into a data dir here
    (ExportCollection, built here as a local copy builds); with --from, from a data dir
    here to the server (ImportCollection)."""
    if args.to and args.from_dir:
        raise InvalidInput("with --server give --to (copy the server's collection here) or --from (copy one from "
                           "here to the server), not both")
    bar = Progress(f"copy {args.name}", enabled=not args.quiet and sys.stderr.isatty())
    t0 = time.perf_counter()
    if args.to:
        settings, batches = client.export_collection(args.name)
        cols = Collections(make_config(args).replace(data_dir=Path(args.to), read_only=False))
        try:
            cols.receive(args.new_name, settings, batches, bar)
            got = cols.get(args.new_name).info()
        finally:
            cols.close()
        documents, chunks, source, dest = got.documents, got.chunks, args.server, args.to
    elif args.from_dir:
        engine = Engine(make_config(args).replace(data_dir=Path(args.from_dir), read_only=True))
        try:
            settings, batches = engine.export_collection(args.name)
            info = client.import_collection(args.new_name, settings, Counted(batches, bar))
        finally:
            engine.close()
        documents, chunks, source, dest = info.documents, info.chunks, args.from_dir, args.server
    else:
        info = client.copy_collection(args.name, args.new_name)
        documents, chunks, source, dest = info.documents, info.chunks, None, None
    bar.done()
    print(copied_line(args, documents, chunks, time.perf_counter() - t0, source, dest))
    return 0


def export(client: RagClient, args: argparse.Namespace) -> int:
    """The server's collection into a backup file here: ExportCollection's messages as they come."""
    bar = Progress(f"export {args.name}", enabled=not args.quiet and sys.stderr.isatty())
    t0 = time.perf_counter()
    n = {"documents": 0, "chunks": 0}

    def counted():
        for m in client.export_messages(args.name):
            n["documents"] += sum(not r.continued for r in m.documents)
            n["chunks"] += sum(len(r.chunks) for r in m.documents)
            bar(n["documents"], n["chunks"])
            yield m
    size = backup.write(args.file, counted())
    bar.done()
    print(exported_line(args, n["documents"], n["chunks"], size, time.perf_counter() - t0))
    return 0


def import_(client: RagClient, args: argparse.Namespace) -> int:
    """A backup file here into a new collection of the server (ImportCollection), which
    checks every record."""
    t0 = time.perf_counter()
    info = client.import_messages(args.name, backup.opened(args.file)[1])
    print(imported_line(args, info.documents, info.chunks, time.perf_counter() - t0))
    return 0


def info(client: RagClient, args: argparse.Namespace) -> int:
    """GetInfo's fields, each by its proto name (`rag info --json`: one object)."""
    msg = client.info()
    out = {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}
    out = {k: v if isinstance(v, (str, int, float, bool)) else list(v) for k, v in out.items()}  # repeated: lists
    if args.json:
        print(json.dumps(out))
        return 0
    for k, v in out.items():
        print(f"{k:>26}: {v}")
    return 0


# ---------------------------------------------------------------- documents
def stored_json(d) -> dict:
    """A StoredDocument message as engine/store.StoredDocument's fields (metadata with its JSON types)."""
    return {"doc_id": d.id, "source": d.source, "content_hash": d.content_hash,
            "metadata": json.loads(d.metadata_json) if d.metadata_json else dict(d.metadata),
            "n_chars": d.chars, "n_chunks": d.chunks, "ingested_at": d.ingested_unix_s}


def documents(client: RagClient, args: argparse.Namespace) -> int:
    def page(filt, after):
        r = client.list_documents(args.collection, filter=filt, page_size=args.limit, page_token=after or "")
        return [stored_json(d) for d in r.documents], r.next_page_token or None
    return print_documents(page, args)


def get(client: RagClient, args: argparse.Namespace) -> int:
    r = client.get_documents(args.collection, args.doc_ids)
    return print_texts([{**stored_json(d.document), "text": d.text, "text_exact": d.text_exact,
                         "chunks": [[c.start, c.end, c.tokens] for c in d.chunks]} for d in r.documents],
                       list(r.missing_ids), args)


def delete(client: RagClient, args: argparse.Namespace) -> int:
    filt = delete_filter(args)
    print(deleted_line(client.delete(args.collection, args.doc_ids, filter=filt), args, filt))
    return 0


def ingest(client: RagClient, args: argparse.Namespace) -> int:
    """Read the files here, stream their documents to the server a stream at a time, and
    print the sum of its reports as a local ingest prints its own."""
    t0 = time.perf_counter()
    limit = client.info().max_document_bytes
    try:
        client.describe(args.collection)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise
        client.create_collection(args.collection, args.dtype)
        print(f"created collection {args.collection}", file=sys.stderr)
    report = IngestReport()
    bar = Progress(f"ingest {args.collection}", enabled=not args.quiet and sys.stderr.isatty())
    sent = 0
    try:
        for docs in streams(ingest_documents(args), limit, report):
            r = client.ingest(args.collection, ({"id": d.doc_id, "text": d.text, "source": d.source,
                                                 "metadata": d.metadata} for d in docs))
            report.failures += [Failure(d.source, res.error or "failed", d.doc_id)
                                for d, res in zip(docs, r.results) if res.status == pb.DOCUMENT_STATUS_FAILED]
            report.documents_added += r.documents_added
            report.documents_updated += r.documents_updated
            report.documents_unchanged += r.documents_unchanged
            report.chunks_added += r.chunks_added
            report.chunks_removed += r.chunks_removed
            report.chunks_reused += r.chunks_reused
            sent += len(docs)
            bar(sent, report.chunks_added)
    finally:
        bar.done()
    report.seconds = time.perf_counter() - t0
    return print_ingest(args.collection, report)


def streams(items: Iterator[Document | Failure], limit: int, report: IngestReport) -> Iterator[list[Document]]:
    """`items`' documents in groups of at most STREAM_BYTES of text (or STREAM_DOCS); files
    that failed here, and documents over the server's `limit`, go to `report` instead."""
    group: list[Document] = []
    size = 0
    for d in items:
        if isinstance(d, Failure):
            report.failures.append(d)
            continue
        try:
            check_document_size(d.doc_id, d.text, limit)
        except InvalidInput as e:
            report.failures.append(Failure(d.source, str(e), d.doc_id))
            continue
        n = len(d.text)  # characters: the bound is loose by UTF-8's width, as intended
        if group and (size + n > STREAM_BYTES or len(group) >= STREAM_DOCS):
            yield group
            group, size = [], 0
        group.append(d)
        size += n
    if group:
        yield group


# ---------------------------------------------------------------- search and answers
def hit_json(h) -> dict:
    """A Hit message as a local `rag search --json` prints one (without the store's internal key)."""
    return {"rank": h.rank, "score": h.score, "cosine": h.cosine, "doc_id": h.doc_id, "source": h.source,
            "ordinal": h.ordinal, "start": h.start, "end": h.end, "text": h.text,
            "metadata": json.loads(h.metadata_json) if h.metadata_json else dict(h.metadata)}


def answer_json(question: str, sources, done) -> dict:
    """An answer (its Source messages and AnswerDone) as engine/rag.Answer.to_json makes it."""
    t = done.timings
    return {"question": question, "answer": done.text, "finish_reason": FINISH_FROM_PB.get(done.finish_reason, ""),
            "extracted": done.extracted, "degenerate": done.degenerate, "retries": done.retries,
            "support": [{"answer_span": [x.answer_start, x.answer_end], "supported": x.supported,
                         "score": round(x.score, 4), "overlap": round(x.overlap, 4), "source": x.source,
                         "doc_id": x.doc_id, "span": [x.start, x.end], "text": x.text} for x in done.support],
            "sources": [{"number": s.number, "label": source_label(s.hit), "source": s.hit.source,
                         "doc_id": s.hit.doc_id, "span": [s.hit.start, s.hit.end], "score": s.hit.score,
                         "cosine": s.hit.cosine, "cited": s.number in done.cited} for s in sources],
            "usage": {"prompt_tokens": done.usage.prompt_tokens, "completion_tokens": done.usage.completion_tokens,
                      "cached_tokens": done.usage.cached_tokens,
                      "accepted_prediction_tokens": done.usage.accepted_prediction_tokens,
                      "rejected_prediction_tokens": done.usage.rejected_prediction_tokens},
            "timings_ns": {"queue": t.queue_time_ns, "embed": t.embed_time_ns, "search": t.search_time_ns,
                           "prompt": t.prompt_time_ns, "prefill": t.prefill_time_ns, "decode": t.decode_time_ns}}


def search(client: RagClient, args: argparse.Namespace) -> int:
    if args.batch:
        return search_batch(client, args)
    if args.query is None:
        raise InvalidInput("give a query, or --batch QUERIES.jsonl")
    hits = client.search(args.collection, args.query, args.k, mode=args.mode, filter=flag_filter(args),
                         min_cosine=args.min_cosine)
    return print_search(hits, args, lambda h: json.dumps(hit_json(h), ensure_ascii=False))


def search_batch(client: RagClient, args: argparse.Namespace) -> int:
    """`rag search --batch --server`: SearchBatch requests within the server's limits, each
    line's own filter sent with it; output lines as a local batch writes them."""
    if args.query:
        raise InvalidInput("give either a query or --batch, not both")
    items = read_questions(args.batch, "query")
    flag = flag_filter(args)
    filters = line_filters(items, flag, args.batch)
    step = max(1, min(client.info().max_batch, HITS_PER_REQUEST // max(args.k, 1)))

    def lines():
        for i in range(0, len(items), step):
            part = items[i:i + step]
            found = client.search_batch(args.collection, [q for _, q, _ in part], args.k, mode=args.mode,
                                        filter=flag if filters is None else None, min_cosine=args.min_cosine,
                                        filters=None if filters is None else filters[i:i + step])
            for (qid, q, _), hits in zip(part, found):
                yield json.dumps({"id": qid, "query": q, "hits": [hit_json(h) for h in hits]}, ensure_ascii=False)
    write_lines(args.out, lines())
    return 0


def options(args: argparse.Namespace) -> dict:
    """GenerationOptions fields from `rag ask`'s flags (the server's defaults where unset)."""
    out = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
           "repetition_penalty": args.repetition_penalty, "stop": args.stop}
    if args.max_new_tokens is not None:
        out["max_new_tokens"] = args.max_new_tokens
    if args.seed is not None:
        out["seed"] = args.seed
    if args.speculative_tokens is not None:  # this answer's own setting, over the server's default
        out["speculative_tokens"] = args.speculative_tokens
    return out


def ask(client: RagClient, args: argparse.Namespace) -> int:
    if args.batch:
        return ask_batch(client, args)
    if not args.question:
        raise InvalidInput("give a question, or --batch QUESTIONS.jsonl")
    sources, done = [], None
    for msg in client.answer(args.collection, args.question, k=args.k, filter=flag_filter(args),
                             min_cosine=args.min_cosine, **options(args)):
        kind = msg.WhichOneof("event")
        if kind == "sources":
            sources = list(msg.sources.sources)
        elif kind == "delta" and not args.json:
            sys.stdout.write(msg.delta.text)
            sys.stdout.flush()
        elif kind == "done":
            done = msg.done
    if done is None:
        raise InvalidInput("the server ended the answer without its final message")
    answer = answer_json(args.question, sources, done)
    if args.json:
        print(json.dumps(answer, ensure_ascii=False))
    else:
        print_answer_footer(answer)
    return 0


def ask_batch(client: RagClient, args: argparse.Namespace) -> int:
    """`rag ask --batch --server`: AnswerBatch requests of a few batches' rows each (the server
    decodes them together, and the progress line moves), each line's own filter sent with it."""
    if args.question:
        raise InvalidInput("give either a question or --batch, not both")
    items = read_questions(args.batch)
    flag = flag_filter(args)
    filters = line_filters(items, flag, args.batch)
    info = client.info()
    step = max(1, min(info.max_batch, 4 * (args.batch_size or info.max_concurrent_generations or 8)))
    bar = Progress("ask", enabled=not args.quiet and sys.stderr.isatty(), unit="answers", total=len(items))

    def lines():
        for i in range(0, len(items), step):
            part = items[i:i + step]
            answers = client.answer_batch(args.collection, [q for _, q, _ in part], k=args.k,
                                          filter=flag if filters is None else None,
                                          filters=None if filters is None else filters[i:i + step],
                                          min_cosine=args.min_cosine, **options(args))
            for (qid, q, _), a in zip(part, answers):
                yield json.dumps({"id": qid, **answer_json(q, a.sources, a.done)}, ensure_ascii=False)
            bar(min(i + step, len(items)))
    try:
        write_lines(args.out, lines())
    finally:
        bar.done()
    return 0


COMMANDS = {"ingest": ingest, "search": search, "ask": ask, "documents": documents, "get": get, "delete": delete,
            "collections": collections, "create": create, "drop": drop, "copy": copy, "export": export,
            "import": import_, "info": info}
