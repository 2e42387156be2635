"""`rag` command line: ingest files, search, manage collections.

Environment variables are read here and only here (RAG_DATA_DIR, RAG_MODELS_DIR), then
passed on inside the one Config object; RAG_HUGE_PAGES acts before any Config, at the
start of `rag serve` (restart_with_huge_pages).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .config import (DEFAULT_CONTEXT_BUDGET_TOKENS, DEFAULT_FUSION_ALPHA, DEFAULT_GEN_MODEL, EMBED_VARIANTS, FUSIONS, GEN_PREFILL_VARIANTS,
                     GEN_VARIANTS, INDEX_DTYPES, MAX_LIST_PAGE, PLAN_OBJECTIVES, PROVIDERS, SEARCH_MODES,
                     WAL_FSYNC_POLICIES, Config)
from .errors import InvalidInput, NotFound, RagError


class Progress:
    """A tqdm progress bar on stderr (documents read, chunks added), only on a terminal."""

    def __init__(self, label: str, enabled: bool, unit: str = "docs", total: int | None = None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=label, unit=f" {unit}", total=total, disable=not enabled, file=sys.stderr,
                        dynamic_ncols=True, mininterval=0.2)

    def __call__(self, docs: int, chunks: int | None = None) -> None:
        self.bar.update(docs - self.bar.n)
        if chunks is not None:
            self.bar.set_postfix(chunks=chunks, refresh=False)

    def done(self) -> None:
        self.bar.close()


SERVER_HELP = ("{verb} through a running `rag serve` (its API, server/remote.py) instead of in this process; "
               "several addresses (read-only replicas) are used in turn (gRPC round_robin)")


def add_server_args(s: argparse.ArgumentParser, verb: str) -> None:
    s.add_argument("--server", metavar="HOST:PORT[,HOST:PORT...]", default=None, help=SERVER_HELP.format(verb=verb))
    s.add_argument("--token", default=None, help="bearer token for --server (default: $RAG_AUTH_TOKEN)")
    s.add_argument("--tls-ca", type=Path, default=None, metavar="CA.pem",
                   help="with --server: connect over TLS, trusting this certificate authority")
    s.add_argument("--tls-client-cert", type=Path, default=None, metavar="CERT.pem",
                   help="with --server and --tls-ca: this client certificate (a server that requires mTLS)")
    s.add_argument("--tls-client-key", type=Path, default=None, metavar="KEY.pem")


def add_ray_args(s: argparse.ArgumentParser, what: str) -> None:
    s.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help=f"{what}. ADDRESS: a running cluster (HOST:PORT, ray://HOST:PORT or auto); none: a local "
                        "Ray started for this run. Needs pip install -e '.[ray]'")
    s.add_argument("--ray-actors", type=int, default=None,
                   help="Ray actors doing the work (default: the cluster's CPUs / --ray-actor-threads)")
    s.add_argument("--ray-actor-threads", type=int, default=1, help="onnxruntime threads of each actor (default 1)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rag", description="Retrieval-augmented generation engine.")
    p.add_argument("--data-dir", default=None,
                   help="where collections live (default: $RAG_DATA_DIR or ./data)")
    p.add_argument("--models-dir", default=None,
                   help="where exported models live (default: $RAG_MODELS_DIR or the repo's models/)")
    p.add_argument("--gen-model", default=None,
                   help=f"generation model: a folder in the models dir (default {DEFAULT_GEN_MODEL}; "
                        "python -m engine.export_lm --preset ... builds others)")
    p.add_argument("--provider", choices=PROVIDERS, default="cpu", help="onnxruntime execution provider")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    p.add_argument("--embed-variant", choices=EMBED_VARIANTS, default=None,
                   help="embedding model variant (default int8)")
    p.add_argument("--gen-variant", choices=GEN_VARIANTS, default=None,
                   help="generator weights that decode (default auto: this machine's plan, see rag info)")
    p.add_argument("--gen-prefill-variant", choices=GEN_PREFILL_VARIANTS, default=None,
                   help="generator weights that prefill prompts (default auto: this machine's plan, see rag info)")
    p.add_argument("--gen-verify-variant", choices=GEN_VARIANTS, default=None,
                   help="generator weights of speculative decoding's verify runs (default auto: this machine's "
                        "plan, see rag info)")
    p.add_argument("--plan-objective", choices=PLAN_OBJECTIVES, default=None,
                   help="decode and verify drafts on the weights fastest for one stream alone (latency, the "
                        "default) or for a full batch of concurrent answers (throughput); with --gen-variant auto")
    p.add_argument("--speculative-tokens", type=int, default=None,
                   help="tokens a greedy answer drafts from its prompt per run of the model, checked at "
                        "once (0 = off; default with --plan-objective latency: the count the plan measured best here, 3 or "
                        "7; with throughput 0 unless full verify runs make more tokens/s here, see rag info)")
    p.add_argument("--fusion", choices=FUSIONS, default=None,
                   help="how hybrid search fuses the dense and BM25 rankings (default convex)")
    p.add_argument("--fusion-alpha", type=float, default=None,
                   help=f"weight of the dense ranking in convex and weighted_rrf fusion (default {DEFAULT_FUSION_ALPHA})")
    p.add_argument("--context-budget-tokens", type=int, default=None,
                   help="pack only the retrieved chunks' sentences closest to the question, up to this many "
                        f"tokens of passages; 0: whole chunks (default {DEFAULT_CONTEXT_BUDGET_TOKENS or 0})")
    p.add_argument("--wal-fsync", choices=WAL_FSYNC_POLICIES, default=None,
                   help="when the write-ahead log is synced before a write is acknowledged (default batch: "
                        "every write; interval: every --wal-fsync-interval-ms; off: left to the OS)")
    p.add_argument("--wal-fsync-interval-ms", type=float, default=None)
    p.add_argument("--snapshot-wal-bytes", type=int, default=None,
                   help="snapshot a collection when its log passes this size (default 64 MiB)")
    p.add_argument("--snapshot-interval-s", type=float, default=None,
                   help="the server snapshots collections with logged writes this often (default 300)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("ingest", help="add files or directory trees to a collection (created if missing)")
    s.add_argument("paths", nargs="+", help=".txt .md .html .pdf .jsonl files or directories; - reads stdin "
                                            "(with --stdin-type)")
    s.add_argument("--stdin-type", choices=sorted(STDIN_TYPES), default=None,
                   help="what stdin (-) holds: JSONL records, read a line at a time, or one document")
    s.add_argument("--stdin-name", default="stdin",
                   help="the source name of what stdin holds: a document's id, or NAME#id for JSONL records "
                        "(default: stdin)")
    s.add_argument("--collection", "-c", required=True)
    s.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    s.add_argument("--id-field", default="id",
                   help="JSONL field naming each record (default: id; a record without it is named by its line)")
    s.add_argument("--dtype", choices=INDEX_DTYPES, default=None, help="vector dtype for a new collection")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    add_server_args(s, "read the files here and ingest them")
    add_ray_args(s, "parse and chunk in Ray tasks and embed in a pool of Ray actors; this process commits")

    s = sub.add_parser("search", help="print the chunks nearest to a question")
    s.add_argument("query", nargs="?", help="the query (or use --batch)")
    s.add_argument("--collection", "-c", required=True)
    add_filter_arg(s, "search only chunks of documents")
    s.add_argument("-k", type=int, default=5, help="number of results (default 5)")
    s.add_argument("--min-cosine", type=float, default=None, metavar="X",
                   help="leave out hits whose cosine similarity to the query is below X (in [-1, 1]; fewer than "
                        "k may come back)")
    s.add_argument("--json", action="store_true", help="one JSON object per hit")
    s.add_argument("--mode", choices=SEARCH_MODES, default=None,
                   help="hybrid (default): dense and BM25 rankings fused; dense: HNSW only; "
                        "exact: every stored vector scored, no index (exact recall, slower on large collections)")
    s.add_argument("--batch", metavar="QUERIES.jsonl",
                   help='search many queries: one JSON per line, {"query": ..., "id": ...} or a string')
    s.add_argument("--out", metavar="HITS.jsonl", help="where --batch writes results (default stdout)")
    add_server_args(s, "search")
    add_ray_args(s, "with --batch: search shards of the queries on Ray actors (collections on a shared filesystem)")

    s = sub.add_parser("ask", help="answer a question from a collection, streamed as it is generated")
    s.add_argument("question", nargs="?", help="the question (or use --batch)")
    s.add_argument("--collection", "-c", required=True)
    add_filter_arg(s, "answer from only chunks of documents")
    s.add_argument("-k", type=int, default=None, help="chunks to retrieve (as many as fit are used)")
    s.add_argument("--min-cosine", type=float, default=None, metavar="X",
                   help="show the generator only passages whose cosine similarity to the question is at least X "
                        "(in [-1, 1]; default 0.2: config answer_min_score); none left: no answer (no_context)")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    s.add_argument("--batch", metavar="QUESTIONS.jsonl",
                   help='answer many questions: one JSON per line, {"question": ..., "id": ...} or a string')
    s.add_argument("--out", metavar="ANSWERS.jsonl", help="where --batch writes answers (default stdout)")
    s.add_argument("--batch-size", type=int, default=None,
                   help="answers decoded together by the scheduler (default 8: config max_concurrent_generations)")
    s.add_argument("--max-new-tokens", type=int, default=None)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    add_server_args(s, "answer")
    add_ray_args(s, "with --batch: answer shards of the questions on Ray actors (collections on a shared filesystem)")

    s = sub.add_parser("serve", help="run the gRPC server (rag.v1)")
    s.add_argument("--address", default=None, help="HOST:PORT to bind (default 127.0.0.1:50051)")
    s.add_argument("--auth-token", default=None,
                   help="require 'authorization: Bearer TOKEN' (default: $RAG_AUTH_TOKEN, else no auth)")
    s.add_argument("--tls-cert", type=Path, default=None)
    s.add_argument("--tls-key", type=Path, default=None)
    s.add_argument("--tls-client-ca", type=Path, default=None, help="require client certificates (mTLS)")
    s.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    s.add_argument("--max-concurrent-generations", type=int, default=None,
                   help="answers decoded together in one batch by the scheduler (default 8)")
    s.add_argument("--max-queued-generations", type=int, default=None,
                   help="answers waiting for a row before RESOURCE_EXHAUSTED (default 64)")
    s.add_argument("--kv-budget-tokens", type=int, default=None,
                   help="KV cache token slots of the batch: rows x longest prompt + max_new_tokens (default 16384)")
    s.add_argument("--prefill-chunk", type=int, default=None,
                   help="most prompt tokens prefilled at once (default 256)")
    s.add_argument("--prefill-stall-ms", type=float, default=None,
                   help="while answers decode, a newcomer's prefill chunk (or the verify run it rides in) "
                        "holds them up about this long at most: smaller for steadier streams, larger for "
                        "prompt throughput (default 500)")
    s.add_argument("--prefix-cache-mb", type=float, default=None,
                   help="memory for the KV of shared prompt prefixes (default 256; 0 = off)")
    s.add_argument("--batch-window-ms", type=float, default=None, help="micro-batching window for Search/Embed")
    s.add_argument("--lazy-generator", action="store_true",
                   help="load the generation model on the first Answer instead of at start")
    s.add_argument("--read-only", action="store_true",
                   help="open collections as a reader beside their writer; refuse every write (FAILED_PRECONDITION)")

    s = sub.add_parser("info", help="models, this machine's CPU and the generator's execution plan")
    s.add_argument("--json", action="store_true")
    add_server_args(s, "describe the server's models, CPU, plan and limits")

    s = sub.add_parser("collections", help="list collections with their counts and settings")
    s.add_argument("--json", action="store_true")
    add_server_args(s, "list")

    s = sub.add_parser("create", help="create an empty collection")
    s.add_argument("name")
    s.add_argument("--dtype", choices=INDEX_DTYPES, default=None)
    s.add_argument("--connectivity", type=int, default=None, help="HNSW M")
    s.add_argument("--expansion-add", type=int, default=None, help="HNSW ef_construction")
    s.add_argument("--expansion-search", type=int, default=None, help="HNSW ef")
    add_server_args(s, "create")

    s = sub.add_parser("drop", help="delete a collection and everything in it")
    s.add_argument("name")
    add_server_args(s, "drop")

    s = sub.add_parser("copy", help="copy a collection as it is now, beside a running writer too: to a new name, "
                                    "into another data dir (a backup), or between this machine and a server")
    s.add_argument("name")
    s.add_argument("new_name")
    s.add_argument("--to", metavar="DATA_DIR", default=None,
                   help="the data dir to copy into (default: this one); with --server, a data dir here to copy the "
                        "server's collection into (a backup off the server)")
    s.add_argument("--from", dest="from_dir", metavar="DATA_DIR", default=None,
                   help="the data dir to copy from (default: this one), to restore a backup; with --server, a data "
                        "dir here whose collection is copied to the server")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    add_server_args(s, "copy in the server's data dir, or with --to / --from between it and this machine")

    s = sub.add_parser("export", help="write a collection as it is now to one backup file (documents, chunks, "
                                      "vectors, settings; FILE.gz compressed)")
    s.add_argument("name")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    add_server_args(s, "export the server's collection to a file here")

    s = sub.add_parser("import", help="make a new collection from a backup file `rag export` wrote (nothing "
                                      "embedded again)")
    s.add_argument("file", metavar="FILE")
    s.add_argument("name")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    add_server_args(s, "import a file here into a collection of the server")

    s = sub.add_parser("documents", help="list a collection's documents (ids, sources, metadata, sizes)")
    s.add_argument("--collection", "-c", required=True)
    add_filter_arg(s, "list only documents")
    s.add_argument("--limit", type=int, default=100, help=f"documents in the page (1..{MAX_LIST_PAGE}; default 100)")
    s.add_argument("--after", default=None, metavar="DOC_ID", help="start after this id (the page before's last)")
    s.add_argument("--all", action="store_true", help="every page, one after another (--limit documents each)")
    s.add_argument("--json", action="store_true", help="one JSON object per document")
    add_server_args(s, "list")

    s = sub.add_parser("get", help="print documents by id: their text (rebuilt from the stored chunks), source and "
                                   "metadata")
    s.add_argument("doc_ids", nargs="+", metavar="DOC_ID")
    s.add_argument("--collection", "-c", required=True)
    s.add_argument("--json", action="store_true", help="one JSON object per document, with its chunks' spans")
    add_server_args(s, "read")

    s = sub.add_parser("delete", help="delete documents by id, or by metadata (--filter)")
    s.add_argument("doc_ids", nargs="*")
    s.add_argument("--collection", "-c", required=True)
    add_filter_arg(s, "delete every document")
    add_server_args(s, "delete")
    return p


def make_config(args: argparse.Namespace) -> Config:
    kw = {"data_dir": Path(args.data_dir or os.environ.get("RAG_DATA_DIR") or "data"), "provider": args.provider}
    models = args.models_dir or os.environ.get("RAG_MODELS_DIR")
    if models:
        kw["models_dir"] = Path(models)
    if args.threads:
        kw["threads"] = args.threads
    if args.embed_variant:
        kw["embed_variant"] = args.embed_variant
    for name in ("wal_fsync", "wal_fsync_interval_ms", "snapshot_wal_bytes", "snapshot_interval_s", "fusion",
                 "fusion_alpha", "gen_model", "gen_variant", "gen_prefill_variant", "gen_verify_variant",
                 "plan_objective",
                 "speculative_tokens", "context_budget_tokens"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return Config(**kw)


def snippet(text: str, width: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


# Commands that read their collections (copy and export: their source; copy writes only
# its new collection).
READ_COMMANDS = ("search", "ask", "collections", "info", "documents", "get", "copy", "export")


STDIN_TYPES = {"jsonl": "application/jsonl", "txt": "text/plain", "md": "text/markdown", "html": "text/html",
               "pdf": "application/pdf"}


def check_ingest_inputs(args: argparse.Namespace) -> None:
    """`rag ingest`'s inputs, checked before anything is read or created."""
    from .documents import check_jsonl_fields

    check_jsonl_fields(args.text_field, args.id_field)
    stdin = args.paths.count("-")
    if stdin > 1:
        raise InvalidInput("give - (stdin) once")
    if stdin and args.stdin_type is None:
        raise InvalidInput(f"reading stdin (-) needs --stdin-type: {', '.join(sorted(STDIN_TYPES))}")
    if args.stdin_type and not stdin:
        raise InvalidInput("--stdin-type is for reading stdin: give - among the paths")
    if stdin and getattr(args, "ray", None):
        raise InvalidInput("--ray reads the files on the cluster, and stdin (-) is read here: drop --ray")


def ingest_documents(args: argparse.Namespace):
    """The documents `rag ingest` reads, in order: its paths' files, and stdin for -."""
    from .documents import iter_documents, read_stream

    for p in args.paths:
        if p == "-":
            yield from read_stream(sys.stdin.buffer, STDIN_TYPES[args.stdin_type], args.stdin_name,
                                   text_field=args.text_field, id_field=args.id_field)
        else:
            yield from iter_documents([p], text_field=args.text_field, id_field=args.id_field)


def print_ingest(collection: str, report) -> int:
    """An ingest's report (engine/ingest.IngestReport) on stdout, its skips on stderr; the exit
    code: 1 when documents failed and none was stored."""
    for f in report.failures:
        print(f"skipped {f.source}: {f.reason}", file=sys.stderr)
    print(f"{collection}: {report.documents_added} added, {report.documents_updated} updated, "
          f"{report.documents_unchanged} unchanged, {len(report.failures)} skipped; "
          f"{report.chunks_added} chunks added"
          f"{f' ({report.chunks_reused} with vectors already stored)' if report.chunks_reused else ''}, "
          f"{report.chunks_removed} removed "
          f"in {report.seconds:.1f}s")
    ok = report.documents_added + report.documents_updated + report.documents_unchanged
    return 1 if report.failures and not ok else 0


def print_collections(rows: list[dict], as_json: bool, none: str) -> None:
    """Collections (CollectionInfo as dicts): one JSON object each, or one line each."""
    if not rows and not as_json:
        print(none)
    for i in rows:
        print(json.dumps(i) if as_json else
              f"{i['name']}\t{i['documents']} docs\t{i['chunks']} chunks\t{i['index_dtype']}\tdim {i['dim']}\t"
              f"{i['embed_model']}\t{i['disk_bytes'] / 1e6:.1f} MB")


def created_line(i: dict) -> str:
    return f"created {i['name']} ({i['index_dtype']}, M={i['connectivity']})"


def copied_line(args: argparse.Namespace, documents: int, chunks: int, seconds: float, source: str | None = None,
                dest: str | None = None) -> str:
    """`rag copy`'s last line; `source` / `dest`: where the collection came from and went
    (a data dir, a server), when not here."""
    return (f"copied {args.name}{f' from {source}' if source else ''} to {args.new_name}"
            f"{f' in {dest}' if dest else ''} ({documents} documents, {chunks} chunks) in {seconds:.1f}s")


def exported_line(args: argparse.Namespace, documents: int, chunks: int, size: int, seconds: float) -> str:
    return (f"exported {args.name} to {args.file} ({documents} documents, {chunks} chunks, {size / 1e6:.1f} MB) "
            f"in {seconds:.1f}s")


def imported_line(args: argparse.Namespace, documents: int, chunks: int, seconds: float) -> str:
    return f"imported {args.file} as {args.name} ({documents} documents, {chunks} chunks) in {seconds:.1f}s"


class Counted:
    """Batches of DocumentRecords passed through as they are, counting their documents and
    chunks (and showing them on `progress`)."""

    def __init__(self, batches: Iterable, progress: Progress) -> None:
        self.batches, self.progress, self.documents, self.chunks = batches, progress, 0, 0

    def __iter__(self) -> Iterator:
        for batch in self.batches:
            yield batch
            self.documents += len(batch)
            self.chunks += sum(len(r.chunks) for r in batch)
            self.progress(self.documents, self.chunks)


def delete_filter(args: argparse.Namespace) -> dict | None:
    """`rag delete`'s --filter, refusing a delete that names nothing."""
    filt = flag_filter(args)
    if not args.doc_ids and not filt:
        raise InvalidInput("give the ids of the documents to delete, or --filter FIELD=VALUE")
    return filt


def deleted_line(n: int, args: argparse.Namespace, filt: dict | None) -> str:
    return f"deleted {n} documents matching the filter" if filt else f"deleted {n} of {len(args.doc_ids)} documents"


def print_search(hits, args: argparse.Namespace, to_json) -> int:
    """`rag search`'s output: one JSON object per hit (`to_json`) with --json, else lines."""
    if args.json:
        for h in hits:
            print(to_json(h))
        return 0
    if not hits:
        print("no results (no chunk matches the filter)" if args.filter or args.filter_json else
              "no results (the collection is empty)")
    print_hits(hits)
    return 0


def print_hits(hits) -> None:
    """Hits in rank order, with the score they were ranked by and their cosine similarity."""
    for h in hits:
        print(f"{h.rank:>3}  score {h.score:.4f}  cosine {h.cosine:.4f}  {h.source}  [{h.start}:{h.end}]")
        print(f"     {snippet(h.text)}")


def run(args: argparse.Namespace) -> int:
    from .pipeline import Engine, hit_to_json

    if args.command == "serve":
        return serve(args)
    if args.command == "ingest":
        check_ingest_inputs(args)  # before Ray starts, a server is called or a collection made
    if getattr(args, "server", None):
        from server.remote import run_remote  # the same command, through a running server's API

        return run_remote(args)
    config = make_config(args)
    # Reading commands open collections as readers: they work beside a server (or an ingest)
    # that writes the same collection, and never hold its writer lock.
    if args.command in READ_COMMANDS:
        config = config.replace(read_only=True)
    if args.command == "ask" and args.batch_size:
        config = config.replace(max_concurrent_generations=args.batch_size)
    distributed = None
    if getattr(args, "ray", None):
        if args.command in ("ask", "search") and not args.batch:
            raise InvalidInput(f"--ray works with `rag {args.command} --batch`; a single "
                               f"{'question' if args.command == 'ask' else 'query'} runs here")
        from . import distributed

        distributed.connect(None if args.ray == "local" else args.ray)  # before anything is read
    engine = Engine(config, owner={"command": f"rag {args.command}"})
    try:
        if args.command == "collections":
            print_collections([dataclasses.asdict(i) for i in engine.list_collections()], args.json,
                              f"no collections in {engine.root}")
            return 0
        if args.command == "info":
            return show_info(engine, args)
        if args.command == "create":
            info = engine.create_collection(args.name, index_dtype=args.dtype, connectivity=args.connectivity,
                                            expansion_add=args.expansion_add,
                                            expansion_search=args.expansion_search)
            print(created_line(dataclasses.asdict(info)))
            return 0
        if args.command == "drop":
            engine.drop_collection(args.name)
            print(f"dropped {args.name}")
            return 0
        if args.command == "copy":
            bar = Progress(f"copy {args.name}", enabled=not args.quiet and sys.stderr.isatty())
            t0 = time.perf_counter()
            info = engine.copy_collection(args.name, args.new_name, data_dir=args.to, source_dir=args.from_dir,
                                          progress=bar)
            bar.done()
            print(copied_line(args, info.documents, info.chunks, time.perf_counter() - t0, args.from_dir, args.to))
            return 0
        if args.command == "export":
            from server import backup
            from server.convert import export_messages

            bar = Progress(f"export {args.name}", enabled=not args.quiet and sys.stderr.isatty())
            t0 = time.perf_counter()
            settings, batches = engine.export_collection(args.name)
            size = backup.write(args.file, export_messages(settings, records := Counted(batches, bar)))
            bar.done()
            print(exported_line(args, records.documents, records.chunks, size, time.perf_counter() - t0))
            return 0
        if args.command == "import":
            from server import backup

            bar = Progress(f"import {args.file}", enabled=not args.quiet and sys.stderr.isatty())
            t0 = time.perf_counter()
            info = engine.import_collection(args.name, *backup.read(args.file), progress=bar)
            bar.done()
            print(imported_line(args, info.documents, info.chunks, time.perf_counter() - t0))
            return 0
        if args.command == "documents":
            def page(filt, after):
                docs, after = engine.list_documents(args.collection, filter=filt, limit=args.limit, after=after)
                return [dataclasses.asdict(d) for d in docs], after
            return print_documents(page, args)
        if args.command == "get":
            found, missing = engine.get_documents(args.collection, args.doc_ids)
            return print_texts([{**dataclasses.asdict(d.document), "text": d.text, "text_exact": d.exact,
                                 "chunks": d.chunks} for d in found], missing, args)
        if args.command == "delete":
            filt = delete_filter(args)
            print(deleted_line(engine.delete_documents(args.collection, args.doc_ids, filter=filt), args, filt))
            return 0
        if args.command == "ingest":
            try:
                engine.describe(args.collection)
            except NotFound:
                engine.create_collection(args.collection, index_dtype=args.dtype)
                print(f"created collection {args.collection}", file=sys.stderr)
            bar = Progress(f"ingest {args.collection}", enabled=not args.quiet and sys.stderr.isatty())
            if args.ray:
                report = distributed.ingest(engine, args.collection, args.paths, text_field=args.text_field,
                                            id_field=args.id_field,
                                            actors=args.ray_actors, actor_threads=args.ray_actor_threads,
                                            progress=bar)
            else:
                report = engine.ingest(args.collection, ingest_documents(args), progress=bar)
            bar.done()
            return print_ingest(args.collection, report)
        if args.command == "ask":
            return ask(engine, args)
        if args.command == "search" and args.batch:
            return search_batch(engine, args)
        if args.command == "search":
            if args.query is None:
                raise InvalidInput("give a query, or --batch QUERIES.jsonl")
            hits = engine.search(args.collection, args.query, args.k, mode=args.mode, filter=flag_filter(args),
                                 min_cosine=args.min_cosine)
            return print_search(hits, args, hit_to_json)
        raise AssertionError(args.command)  # argparse restricts the choices
    finally:
        engine.close()
        if distributed is not None:
            distributed.shutdown()


def serve(args: argparse.Namespace) -> int:
    from server.app import serve as run_server

    from .config import DEFAULT_ADDRESS

    kw = {}
    for name in ("max_concurrent_generations", "max_queued_generations", "kv_budget_tokens", "prefill_chunk",
                 "prefill_stall_ms", "prefix_cache_mb", "batch_window_ms", "metrics_port",
                 "tls_cert", "tls_key", "tls_client_ca"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    token = args.auth_token or os.environ.get("RAG_AUTH_TOKEN")
    if token:
        kw["auth_token"] = token
    if args.lazy_generator:
        kw["warm_generator"] = False
    if args.read_only:
        kw["read_only"] = True
    config = make_config(args).replace(**kw)
    run_server(config, args.address or os.environ.get("RAG_ADDRESS") or DEFAULT_ADDRESS)
    return 0


def show_info(engine, args: argparse.Namespace) -> int:
    """`rag info`: what this machine runs, without loading the generator (its plan is on disk)."""
    from .export_lm import ROW_SLOTS, rows_file
    from .generate import VARIANT_FILES
    from .plan import cpu_key, for_config

    c = engine.config
    plan = for_config(c)
    # speculating rows verified together (the verify weights' row-slots copy), else one a run
    rows = ROW_SLOTS if (c.gen_model_dir / rows_file(VARIANT_FILES.get(plan.verify, ""))).exists() else 1
    out = {"embedding_model": c.embed_model, "embedding_variant": c.embed_variant,
           "generation_model": c.gen_model, "cpu": cpu_key(), "execution_plan": plan.describe(),
           "prefill_variant": plan.prefill, "decode_variant": plan.decode, "verify_variant": plan.verify,
           "verify_rows_per_run": rows, "plan_source": plan.source,
           "plan_objective": plan.objective,
           "measured_rates": plan.rates, "provider": c.provider, "threads": c.threads,
           "search_mode": c.search_mode, "fusion": c.fusion, "fusion_alpha": c.fusion_alpha,
           "max_concurrent_generations": c.max_concurrent_generations,
           "max_queued_generations": c.max_queued_generations, "kv_budget_tokens": c.kv_budget_tokens,
           "prefix_cache_mb": c.prefix_cache_mb, "speculative_tokens": c.draft_tokens}
    if args.json:
        print(json.dumps(out))
        return 0
    for k, v in out.items():
        if k == "measured_rates":
            for variant, r in v.items():
                extra = "".join(f", {label} {r[key]:.1f} tok/s" for key, label in
                                (("batch_decode", "full batch"), ("verify", "verify runs"),
                                 ("verify_full", "full verify runs")) if key in r)
                print(f"{'  ' + variant:>26}: prefill {r['prefill']:.0f} tok/s, decode {r['decode']:.1f} tok/s{extra}")
            continue
        print(f"{k:>26}: {v}")
    return 0


def read_questions(path: str, field: str = "question") -> list[tuple[object, str, dict | None]]:
    """(id, text, filter) from a JSONL file of strings or objects with `field` (and "id",
    and "filter": that line's own metadata filter, as engine/filters.py takes it)."""
    from .filters import check_filter

    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInput(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(rec, str):
                out.append((n, rec, None))
            elif isinstance(rec, dict) and isinstance(rec.get(field), str):
                try:
                    own = check_filter(rec.get("filter"))
                except InvalidInput as e:
                    raise InvalidInput(f"{path}:{n}: {e}") from None
                out.append((rec.get("id", n), rec[field], own))
            else:
                raise InvalidInput(f'{path}:{n}: expected a string or an object with a "{field}" string')
    if not out:
        raise InvalidInput(f"{path}: no {field}s")
    return out


def line_filters(items: list, flag_filter: dict | None, path: str) -> list | None:
    """Each batch line's filter with --filter's (both must hold); None where no line has one."""
    from .filters import both

    if all(f is None for _, _, f in items):
        return None
    out = []
    for n, (_, _, f) in enumerate(items, 1):
        try:
            out.append(both(flag_filter, f))
        except InvalidInput as e:
            raise InvalidInput(f"{path}: entry {n}: {e}") from None
    return out


def write_lines(path: str | None, lines) -> None:
    """JSON lines to `path` (written to a temporary name, renamed when complete) or stdout."""
    if not path:
        for line in lines:
            sys.stdout.write(line + "\n")
        return
    tmp = Path(f"{path}.partial")
    with open(tmp, "w", encoding="utf-8") as out:
        for line in lines:
            out.write(line + "\n")
    os.replace(tmp, path)


def print_documents(page, args: argparse.Namespace) -> int:
    """`rag documents`: a page of a collection's documents (or every page, --all), in id order.
    `page(filter, after)` -> (documents as StoredDocument dicts, the next page's `after`)."""
    filt, after, shown = flag_filter(args), args.after, 0
    while True:
        docs, after = page(filt, after)
        for d in docs:
            if args.json:
                print(json.dumps(d, ensure_ascii=False))
            else:
                print(f"{d['doc_id']}\t{d['n_chunks']} chunks\t{d['n_chars']} chars\t"
                      f"{json.dumps(d['metadata'], ensure_ascii=False, sort_keys=True)}")
        shown += len(docs)
        if after is None or not args.all:
            break
    if not shown and not args.json:
        print("no documents" + (" match the filter" if filt else " in the collection"))
    elif after is not None and not args.json:
        server = f" --server {shlex.quote(args.server)}" if args.server else ""
        print(f"more after {after!r}: rag documents -c {args.collection}{server} --after {shlex.quote(after)} "
              "(or --all)")
    return 0


def print_texts(docs: list[dict], missing: list[str], args: argparse.Namespace) -> int:
    """`rag get`: each document (a StoredDocument dict with text, text_exact and chunks) as a
    header line and its text, or one JSON object a line; an id not held on stderr (exit 1)."""
    for d in docs:
        if args.json:
            print(json.dumps(d, ensure_ascii=False))
            continue
        note = "" if d["text_exact"] else " (text rebuilt from its chunks; whitespace between them guessed)"
        print(f"== {d['doc_id']}\t{d['source']}\t{d['n_chars']} chars\t{d['n_chunks']} chunks\t"
              f"{json.dumps(d['metadata'], ensure_ascii=False, sort_keys=True)}{note}")
        print(d["text"].rstrip("\n"))
    for doc_id in missing:
        print(f"error: collection {args.collection!r} holds no document {doc_id!r}", file=sys.stderr)
    return 1 if missing else 0


def add_filter_arg(s: argparse.ArgumentParser, what: str) -> None:
    s.add_argument("--filter", action="append", default=[], metavar="FIELD=VALUE",
                   help=f"{what} whose metadata FIELD equals VALUE; also FIELD!=VALUE, FIELD>=N, "
                        "FIELD>N, FIELD<=N, FIELD<N (numbers numerically, other bounds as text: "
                        "date>=2024-01-01). Repeat: every field's condition must hold; one field "
                        "given =VALUE more than once matches any of them (lang=en --filter lang=fr). "
                        "FIELD~=VALUE: a list FIELD holds VALUE (tags~=news; repeated: any of them). "
                        "Non-string metadata compares as JSON, e.g. year=2020")
    s.add_argument("--filter-json", default=None, metavar="JSON",
                   help="a metadata filter as JSON, with every operator, and $or / $and / $not to combine "
                        """filters, e.g. '{"$or": [{"lang": "fr"}, {"year": {"$gte": 2022}}]}'; """
                        "it holds together with --filter's conditions")


def flag_filter(args: argparse.Namespace) -> dict | None:
    """The metadata filter of --filter's conditions and --filter-json's, both to hold."""
    from .filters import both

    own = parse_filter(args.filter)
    if args.filter_json is None:
        return own
    try:
        extra = json.loads(args.filter_json)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"--filter-json is not valid JSON ({e.msg} at character {e.pos})") from None
    try:
        return both(own, extra)
    except InvalidInput as e:
        raise InvalidInput(f"--filter-json: {e}") from None


CLI_FILTER_OPS = {"~=": "$contains_any", "!=": "$nin", ">=": "$gte", "<=": "$lte", "=": "$in", ">": "$gt",
                  "<": "$lt"}


def parse_filter(items: list[str]) -> dict | None:
    """`--filter FIELD=VALUE ...` (and !=, >=, >, <=, <, and ~= for an element of a list) as
    a metadata filter (engine/filters.py; values as strings, as gRPC sends them)."""
    out: dict = {}
    for item in items:
        at = next((i for i, ch in enumerate(item) if ch in "=!<>"), -1)
        at -= item.startswith("~=", at - 1) and at > 1  # FIELD~=VALUE
        op = next((o for o in CLI_FILTER_OPS if item.startswith(o, at)), None) if at > 0 else None
        if op is None:
            raise InvalidInput(f"--filter takes FIELD=VALUE (or FIELD!=VALUE, FIELD>=VALUE, FIELD>VALUE, "
                               f"FIELD<=VALUE, FIELD<VALUE, FIELD~=VALUE), got {item!r}")
        field, value, key = item[:at], item[at + len(op):], CLI_FILTER_OPS[op]
        cond = out.setdefault(field, {})
        if key in ("$in", "$nin", "$contains_any"):
            cond.setdefault(key, []).append(value)
        elif key in cond:
            raise InvalidInput(f"--filter gives {field}{op} twice ({cond[key]!r} and {value!r}); give each bound once")
        else:
            cond[key] = value
    for cond in out.values():  # one value: equal to it, or one element to hold
        if len(cond.get("$in", ())) == 1:
            cond["$eq"] = cond.pop("$in")[0]
        if len(cond.get("$contains_any", ())) == 1:
            cond["$contains"] = cond.pop("$contains_any")
    return out or None


def search_batch(engine, args: argparse.Namespace) -> int:
    """`rag search --batch`: one JSON line per query, in input order, here or on Ray actors."""
    from . import distributed
    from .search import check_min_cosine

    if args.query:
        raise InvalidInput("give either a query or --batch, not both")
    items = read_questions(args.batch, "query")
    for i, (_, q, _) in enumerate(items):
        engine.check_query(q, i)
    engine.check_k(args.k)
    engine.describe(args.collection)  # NotFound here, not in a worker
    texts = [q for _, q, _ in items]
    flag = flag_filter(args)
    filters = line_filters(items, flag, args.batch)
    options = {"k": args.k, "mode": engine.check_mode(args.mode), "filter": flag if filters is None else None,
               "min_cosine": check_min_cosine(args.min_cosine)}
    if args.ray:
        results = distributed.map_readers(engine.config, args.collection, "search", texts, options,
                                          actors=args.ray_actors, actor_threads=args.ray_actor_threads,
                                          filters=filters)
    else:
        results = distributed.run_shard(engine, args.collection, "search", texts, options, filters)
    write_lines(args.out, (json.dumps({"id": qid, **json.loads(r)}, ensure_ascii=False)
                           for (qid, _, _), r in zip(items, results)))
    return 0


def ask(engine, args: argparse.Namespace) -> int:
    from .generate import SamplingParams
    from .pipeline import Answer, AnswerStart

    params = SamplingParams(max_new_tokens=args.max_new_tokens or engine.config.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop))
    if args.batch:
        if args.question:
            raise InvalidInput("give either a question or --batch, not both")
        items = read_questions(args.batch)
        bar = Progress("ask", enabled=not args.quiet and sys.stderr.isatty(), unit="answers", total=len(items))
        texts = [q for _, q, _ in items]
        flag = flag_filter(args)
        filters = line_filters(items, flag, args.batch)
        flag = flag if filters is None else None  # else within each line's
        if args.ray:
            from . import distributed
            from .search import check_min_cosine

            for i, q in enumerate(texts):
                engine.check_query(q, i)
            engine.describe(args.collection)  # NotFound here, not in a worker
            results = list(distributed.map_readers(engine.config, args.collection, "answer", texts,
                                                   {"k": args.k, "params": params, "filter": flag,
                                                    "min_cosine": check_min_cosine(args.min_cosine)},
                                                   actors=args.ray_actors, actor_threads=args.ray_actor_threads,
                                                   progress=bar, filters=filters))
        else:
            results = [json.dumps(a.to_json(), ensure_ascii=False)
                       for a in engine.answer_batch(args.collection, texts, k=args.k, params=params,
                                                    filter=flag, progress=bar, filters=filters,
                                                    min_cosine=args.min_cosine)]
        bar.done()
        write_lines(args.out, (json.dumps({"id": qid, **json.loads(r)}, ensure_ascii=False)
                               for (qid, _, _), r in zip(items, results)))
        return 0
    if not args.question:
        raise InvalidInput("give a question, or --batch QUESTIONS.jsonl")
    final = None
    for ev in engine.answer_stream(args.collection, args.question, k=args.k, params=params,
                                   filter=flag_filter(args), min_cosine=args.min_cosine):
        if isinstance(ev, Answer):
            final = ev
        elif isinstance(ev, AnswerStart):
            continue
        elif not args.json:
            sys.stdout.write(ev)
            sys.stdout.flush()
    if args.json:
        print(json.dumps(final.to_json(), ensure_ascii=False))
        return 0
    print_answer_footer(final.to_json())
    return 0


def print_answer_footer(a: dict) -> None:
    """What follows a streamed answer (Answer.to_json's dict): how it was made if not plainly,
    each sentence's support, the sources (* cited) and the usage line (stderr)."""
    print("\n")
    how = (a["degenerate"] or "").replace("_", "-")
    if a["extracted"]:
        print(f"(extracted: the generated answer was {how} twice, so this is the "
              "source sentence closest to the question)")
    elif a["retries"]:
        print(f"(generated again: the first answer was {how})")
    if a["support"]:
        print("Support:")
        for x in a["support"]:
            mark = "  supported  " if x["supported"] else "  UNSUPPORTED"
            said = a["answer"][x["answer_span"][0]:x["answer_span"][1]]
            where = f"[{x['source']}] " + next((s["source"] for s in a["sources"] if s["number"] == x["source"]),
                                               x["doc_id"])
            print(f"{mark} {said!r}\n      by {where} [{x['span'][0]}:{x['span'][1]}] (cosine {x['score']:.2f}, "
                  f"words {x['overlap']:.0%}): {x['text']!r}")
    print("Sources:")
    for s in a["sources"]:
        print(f" {'*' if s['cited'] else ' '}[{s['number']}] {s['source']} [{s['span'][0]}:{s['span'][1]}]  "
              f"score {s['score']:.3f}  cosine {s['cosine']:.3f}")
    u, t = a["usage"], a["timings_ns"]
    queue = f"queue {t['queue'] / 1e9:.1f}s, " if t.get("queue") else ""
    print(f"({a['finish_reason']}; {u['prompt_tokens']} prompt tokens, {u['cached_tokens']} of them cached, "
          f"+ {u['completion_tokens']} answer tokens, {u['accepted_prediction_tokens']} of them drafted from the "
          f"prompt; {queue}prefill {t['prefill'] / 1e9:.1f}s, decode {t['decode'] / 1e9:.1f}s)", file=sys.stderr)


# Huge pages for the models' weights (opt-in: RAG_HUGE_PAGES=1). A decode step or a verify
# run reads all the weights (~0.3 GB int4, ~1 GB w8a8 for the 0.5B model), which
# onnxruntime keeps in memory that glibc's malloc maps in 4 KB pages. With the glibc tunable
# below (glibc 2.35+) malloc asks for transparent huge pages (2 MB) for its large blocks;
# glibc reads tunables at process start only, so `rag serve` then starts itself again with it
# set (execve: the same process, same id, before any model loads). Measured against the same
# process without it, six alternating pairs of processes (benchmarks/huge_pages.py, Zen 5
# EPYC): a lone row's one-token run 1.04x and 4-token verify run 1.05x faster (6 of 6),
# prefill and 8-row runs level, loading 3.5 s instead of 1.3 (the kernel gathers, and may
# compact memory for, the huge pages). Not the default: the gain is small, and a server's
# later large allocations (KV buffers as rows join) would fault in huge pages too, which is
# where transparent huge pages are known for latency spikes on a fragmented machine. It does
# nothing where the kernel's transparent huge pages are "never", off Linux or glibc < 2.35,
# or where GLIBC_TUNABLES already says how malloc uses huge pages.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_pages_env(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment a process that loads models should run with for huge pages (HUGE_PAGES_TUNABLE
    added to GLIBC_TUNABLES) when RAG_HUGE_PAGES=1 asks for them, or None if this one has them
    or should not."""
    if environ.get("RAG_HUGE_PAGES", "0").strip().lower() not in ("1", "true", "yes", "on"):
        return None
    if "RAG_HUGE_PAGES_RESTARTED" in environ or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return None  # set already (or stripped by glibc, as for setuid programs: never restart twice)
    try:
        libc, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")  # e.g. "glibc 2.36"
        release = tuple(int(x) for x in version.split(".")[:2])
    except (AttributeError, ValueError, OSError):  # not glibc (musl, macOS, Windows)
        return None
    if not sys.platform.startswith("linux") or libc != "glibc" or release < (2, 35):
        return None
    try:
        if "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
            return None
    except OSError:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE,
            "RAG_HUGE_PAGES_RESTARTED": "1"}


def restart_with_huge_pages() -> None:
    """Start this program again (execve, same arguments) with huge pages for malloc, if
    huge_pages_env says so; returns if not, or if the restart cannot be made."""
    env = huge_pages_env(dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        pass  # run on without


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command == "serve":
        restart_with_huge_pages()  # a program, not a call from Python: it may start itself again
    try:
        return run(args)
    except RagError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader left (`rag documents --all | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
