"""Scale-out on Ray: ingest, batch answers and batch search over a Ray cluster.

Ray is an optional extra (`pip install -e '.[ray]'`); only `--ray` imports this module.

Ingest (`rag ingest ... --ray [ADDRESS]`) is a Ray Data pipeline whose one writer is the
driver:
  listing (driver: names, and the split points of a JSONL file over JSONL_PART_BYTES, found
  by one scan counting its line breaks) -> read, parse, hash check, chunk (Ray tasks, a file
  or a part of whole lines each, tokenizer only) -> embed (an actor pool: `map_batches`
  with a callable class, each actor one onnxruntime session with its threads) -> the
  driver, in input order, which commits through engine/ingest.py exactly as a
  single-process ingest does: the same batches, upsert decisions (content hash), report
  and write-ahead log. Workers write nothing, so
  an actor that dies costs only its batch, which Ray Data retries on a restarted actor
  (`max_restarts=-1`); nothing half-written is ever visible.

A worker skips chunking and embedding a document whose stored hash equals its own (the
nightly re-ingest of an unchanged corpus costs the parse only), and hands the actors the
stored vectors of a changed document's chunk texts that are stored already, so that only the
new ones are embedded (as engine/ingest.py does in one process). If the writer finds the
hash changed meanwhile (an earlier input with the same id), it embeds that one itself.

Batch answers and batch search: actors open the collection read-only (a shared
filesystem) and answer shards of the questions with the batched generator; the driver
writes the results in input order. Greedy answers equal the single-process ones: the
scheduler's rows are batch-invariant (tests/test_scheduler.py).

Every node needs this package (the same virtual environment) and the same data and
models paths (a shared filesystem); the driver checks the address before it reads a file.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from . import ingest as ingestion
from .chunk import Chunk, Chunker
from .config import Config
from .documents import Document, Failure, check_document, check_jsonl_fields, iter_files, jsonl_parts, read_file
from .errors import InvalidInput, RagError, Unavailable
from .ingest import IngestReport, Prepared, ProgressFn

INSTALL_HINT = "install the extra: pip install -e '.[ray]'"
# Documents per embedding-actor call, and questions per answering-actor call (times the
# scheduler's rows): small enough to spread over actors, large enough to batch.
EMBED_BATCH_DOCS = 64
ANSWER_SHARD_ROWS = 2
CONNECT_TIMEOUT_S = 5.0
# A JSONL file bigger than this is read by several tasks, a part of whole lines each.
JSONL_PART_BYTES = 16 * 1024 * 1024
PARSE_CPUS = 4


# ------------------------------------------------------------------ the cluster
def connect(address: str | None = None, *, num_cpus: int | None = None):
    """The `ray` module, connected: to `address` ("HOST:PORT", "ray://HOST:PORT", "auto"),
    or to a local Ray started for this run when `address` is None. A cluster that cannot be
    reached is an Unavailable error before anything is read."""
    try:
        import ray
    except ImportError:
        raise Unavailable(f"--ray needs Ray, which is not installed here; {INSTALL_HINT}") from None
    local = address in (None, "", "local")
    if not local:
        _check_reachable(address)
        _use_token_if_found()
    if ray.is_initialized():
        if local or address in ("auto", ray.get_runtime_context().gcs_address):
            return ray
        ray.shutdown()  # connected elsewhere (a Python caller switching clusters)
    kw = ({"address": "local", "num_cpus": num_cpus, "include_dashboard": False} if local
          else {"address": address})
    try:
        ray.init(log_to_driver=False, configure_logging=False, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise Unavailable(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
    return ray


def _use_token_if_found() -> None:
    """Token auth, as Ray's CLI and ray.init("auto") turn it on when a token is where Ray looks
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) and RAY_AUTH_MODE is unset; an
    explicit address does not by itself. A token sent to a cluster without auth is ignored
    (checked with Ray 2.60)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # another Ray version: its own rules apply
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _check_reachable(address: str) -> None:
    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidInput(f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise Unavailable(f"cannot reach a Ray cluster at {address!r} ({e.strerror or e}); start one with "
                          "`ray start --head` there, or leave out the address to run a local Ray") from None


def parse_tasks(ray) -> int:
    """Parse-and-chunk tasks at once: they take no CPU reservation (the embedding actors hold
    the cores), so they are capped, one per PARSE_CPUS cores; an uncapped pool starts a Python
    worker per file, which on 2 cores cost more than the embedding itself."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // PARSE_CPUS)


def pool_size(ray, actors: int | None, actor_threads: int) -> int:
    """Actors to start: `actors`, or as many as the cluster's CPUs hold at `actor_threads` each."""
    if actor_threads < 1 or (actors is not None and actors < 1):
        raise InvalidInput(f"--ray-actors and --ray-actor-threads must be at least 1, got {actors} and {actor_threads}")
    return actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // actor_threads)


def _data_context(ray):
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # results come back in input order
    ctx.enable_progress_bars = False  # the driver shows its own, and its report
    # Ray Data configures its loggers when it is imported; its full logs stay in the Ray
    # session's folder (/tmp/ray/session_*/logs/ray-data).
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return ctx


# ------------------------------------------------------------------ ingest
def ingest(engine, name: str, paths: Sequence[str | Path], *, text_field: str = "text", id_field: str = "id",
           actors: int | None = None, actor_threads: int = 1, progress: ProgressFn | None = None,
           address: str | None = None) -> IngestReport:
    """Upsert files into collection `name` of `engine` (its writer) with Ray doing the work;
    the same result and report as `engine.ingest_paths` (see the module docstring)."""
    check_jsonl_fields(text_field, id_field)
    ray = connect(address)
    col = engine._writer(name)
    config = engine.config
    actors = pool_size(ray, actors, actor_threads)
    items = []
    for f in iter_files(paths):  # names, and a big JSONL file's split points: the workers read the files
        if isinstance(f, Failure):
            items.append(_item(len(items), f.source, failure=f.reason))
            continue
        for start, end, line in _parts(f):
            items.append(_item(len(items), str(f), start, end, line))
    if not items:
        return ingestion.ingest(col, lambda: engine.embedder, (), progress=progress)
    _data_context(ray)
    settings = {"folder": str(col.folder), "model_dir": str(config.embed_model_dir), "text_field": text_field,
                "id_field": id_field, "chunk_tokens": col.settings["chunk_tokens"],
                "chunk_overlap": col.settings["chunk_overlap"]}
    ds = (ray.data.from_items(items, override_num_blocks=min(len(items), 4096))
          .flat_map(_parse_chunk, fn_kwargs=settings, num_cpus=0,
                    compute=ray.data.TaskPoolStrategy(size=parse_tasks(ray)))
          .map_batches(_EmbedChunks, fn_constructor_kwargs={"config": config.replace(threads=actor_threads)},
                       batch_size=EMBED_BATCH_DOCS, batch_format="numpy",
                       compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=actor_threads))
    dim = col.settings["dim"]

    def rows() -> Iterator[Document | Prepared | Failure]:
        seen = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            out = list(_items(batch, dim, text_field, id_field))
            seen += len(out)
            yield from out
            if progress:
                progress(seen, None)

    try:
        return ingestion.ingest(col, lambda: engine.embedder, rows())
    except RagError:
        raise
    except Exception as e:  # a Ray task that failed for good (retries exhausted)
        raise _unwrap(e, "ingest") from e


def _parts(f: Path) -> list[tuple[int, int | None, int]]:
    """A file's parts: a JSONL file over JSONL_PART_BYTES in parts of whole lines (each read
    by its own task, in order), any other file whole."""
    try:
        big = f.suffix.lower() == ".jsonl" and f.stat().st_size > JSONL_PART_BYTES
        return jsonl_parts(f, JSONL_PART_BYTES) if big else [(0, None, 1)]
    except OSError:  # the worker reading it reports why
        return [(0, None, 1)]


def _item(order: int, path: str, start: int = 0, end: int | None = None, line: int = 1, failure: str = "") -> dict:
    # Every item has every column (Ray Data blocks need one schema): end -1 is the file's end.
    return {"order": order, "path": path, "failure": failure, "start": start, "end": -1 if end is None else end,
            "line": line}


def _part(row) -> tuple[int, int | None, int]:
    return int(row["start"]), None if int(row["end"]) < 0 else int(row["end"]), int(row["line"])


def _parse_chunk(item: dict, *, folder: str, model_dir: str, text_field: str, id_field: str, chunk_tokens: int,
                 chunk_overlap: int) -> list[dict]:
    """One listed file (or part of a JSONL file) -> one row per document (or failure): read,
    parse, hash, chunk."""
    from .store import Store

    if item["failure"]:
        return [_row(item, 0, "failure", source=item["path"], reason=item["failure"])]
    docs = list(read_file(item["path"], text_field=text_field, id_field=id_field, part=_part(item)))
    ok = [d for d in docs if isinstance(d, Document) and isinstance(d.doc_id, str)]
    stored, known = {}, {}
    if ok:
        store = Store(Path(folder), read_only=True)
        try:
            stored = store.hashes([d.doc_id for d in ok])
            # a changed document's chunk texts stored already keep their vectors (as in engine/ingest.py)
            known = store.chunk_vectors([d.doc_id for d in ok
                                         if d.doc_id in stored and stored[d.doc_id] != d.content_hash])
        finally:
            store.close()
    chunker = _chunker(model_dir, chunk_tokens, chunk_overlap)
    out, todo = [], []
    for j, d in enumerate(docs):
        if isinstance(d, Failure):
            out.append(_row(item, j, "failure", source=d.source, reason=d.reason, doc_id=d.doc_id or ""))
            continue
        try:
            check_document(d)
        except InvalidInput as e:
            out.append(_row(item, j, "failure", source=d.source, reason=str(e),
                            doc_id=d.doc_id if isinstance(d.doc_id, str) else ""))
            continue
        h = d.content_hash
        meta = json.dumps(d.metadata, ensure_ascii=False)
        kind = "unchanged" if stored.get(d.doc_id) == h else "doc"
        out.append(_row(item, j, kind, source=d.source, doc_id=d.doc_id, hash=h, metadata=meta,
                        n_chars=len(d.text), path=item["path"]))
        if kind == "doc":
            todo.append((len(out) - 1, d))
    for (row, _), chunks in zip(todo, chunker.chunk_many([(d.doc_id, d.text) for _, d in todo])):
        out[row]["chunks"] = json.dumps([[c.ordinal, c.start, c.end, c.n_tokens, c.text] for c in chunks],
                                        ensure_ascii=False)
        kept = [i for i, c in enumerate(chunks) if c.text in known]
        out[row]["known"] = json.dumps(kept)
        out[row]["known_vectors"] = b"".join(np.ascontiguousarray(known[chunks[i].text], np.float32).tobytes()
                                             for i in kept)
    return out


def _row(item: dict, j: int, kind: str, *, source: str, reason: str = "", doc_id: str = "", hash: str = "",
         metadata: str = "{}", n_chars: int = 0, chunks: str = "[]", path: str = "") -> dict:
    # Every row has every column: Ray Data blocks need one schema. `j`: the document's place
    # in its file's part (start, end, line), which _reload reads again if it must.
    # `known`: indices of chunks whose vectors (`known_vectors`, in that order) the store had.
    return {"order": item["order"], "j": j, "kind": kind, "source": source, "reason": reason, "doc_id": doc_id,
            "hash": hash, "metadata": metadata, "n_chars": n_chars, "chunks": chunks, "path": path,
            "start": item["start"], "end": item["end"], "line": item["line"], "known": "[]", "known_vectors": b""}


@functools.lru_cache(maxsize=4)
def _chunker(model_dir: str, chunk_tokens: int, chunk_overlap: int) -> Chunker:
    # Cached per worker process: a Ray worker runs many tasks.
    from .embed import Tokenizers

    t = Tokenizers(model_dir)
    return Chunker(t.raw_tokenizer, target=chunk_tokens, overlap=chunk_overlap, window=t.max_length - t.special_tokens)


class _EmbedChunks:
    """An embedding actor: one onnxruntime session (config.threads threads) for its life."""

    def __init__(self, config: Config) -> None:
        from .embed import Embedder

        c = config
        self.embedder = Embedder(c.embed_model_dir, variant=c.embed_variant, provider=c.provider, threads=c.threads,
                                 batch_max_tokens=c.batch_max_tokens, max_batch=c.max_batch)

    def __call__(self, batch: dict) -> dict:
        """Every row's chunk vectors: those the store had (`known`) as they are, the rest
        embedded here, in one call."""
        dim = self.embedder.dim
        chunks = [json.loads(c) for c in batch["chunks"]]
        kept = [dict(zip(json.loads(k), np.frombuffer(v, np.float32).reshape(-1, dim)))
                for k, v in zip(batch["known"], batch["known_vectors"])]
        texts = [c[4] for doc, have in zip(chunks, kept) for i, c in enumerate(doc) if i not in have]
        vectors = iter(self.embedder.embed(texts) if texts else ())
        out = []
        for doc, have in zip(chunks, kept):
            rows = np.array([have[i] if i in have else next(vectors) for i in range(len(doc))], np.float32)
            out.append(np.ascontiguousarray(rows.reshape(len(doc), dim)).tobytes())
        batch["vectors"] = np.array(out, dtype=object)
        return batch


def _items(batch: dict, dim: int, text_field: str, id_field: str) -> Iterator[Document | Prepared | Failure]:
    """Rows back from the actors -> what engine/ingest.py commits."""
    for i in range(len(batch["kind"])):
        kind, source, doc_id = str(batch["kind"][i]), str(batch["source"][i]), str(batch["doc_id"][i])
        if kind == "failure":
            yield Failure(source, str(batch["reason"][i]), doc_id or None)
            continue
        if kind == "unchanged":
            chunks, vectors = None, None
        else:
            chunks = [Chunk(doc_id, o, s, e, n, t) for o, s, e, n, t in json.loads(batch["chunks"][i])]
            vectors = np.frombuffer(batch["vectors"][i], dtype=np.float32).reshape(len(chunks), dim)
        yield Prepared(doc_id, source, str(batch["hash"][i]), json.loads(batch["metadata"][i]),
                       int(batch["n_chars"][i]), chunks, vectors,
                       functools.partial(_reload, str(batch["path"][i]), int(batch["j"][i]), text_field, id_field,
                                         _part({c: batch[c][i] for c in ("start", "end", "line")})),
                       reused=len(json.loads(batch["known"][i])))


def _reload(path: str, j: int, text_field: str, id_field: str, part: tuple[int, int | None, int]) -> Document:
    doc = next(itertools.islice(read_file(path, text_field=text_field, id_field=id_field, part=part), j, None),
               None)
    if not isinstance(doc, Document):
        raise Unavailable(f"{path} changed while it was being ingested; ingest it again")
    return doc


# ------------------------------------------------------------------ batch answers and search
class _Reader:
    """An actor with a read-only engine over the shared data dir: answers or searches shards."""

    def __init__(self, config: Config, name: str, kind: str, options: dict) -> None:
        from .pipeline import Engine

        self.engine = Engine(config.replace(read_only=True), owner={"command": "rag (Ray actor)"})
        self.name, self.kind, self.options = name, kind, options

    def __call__(self, batch: dict) -> dict:
        own = [str(f) for f in batch["filter"]]  # "" for none at all: the batch's filter only
        filters = None if all(f == "" for f in own) else [json.loads(f or "{}") for f in own]
        batch["result"] = np.array(run_shard(self.engine, self.name, self.kind, list(batch["text"]), self.options,
                                             filters), dtype=object)
        return batch


def run_shard(engine, name: str, kind: str, texts: list[str], options: dict,
              filters: Sequence | None = None) -> list[str]:
    """One shard of a batch: JSON per input, the same in one process and on Ray actors.
    `filters`: each input's own metadata filter (or None), with options["filter"]."""
    if kind == "answer":
        answers = engine.answer_batch(name, texts, k=options.get("k"), params=options.get("params"),
                                      filter=options.get("filter"), filters=filters,
                                      min_cosine=options.get("min_cosine"))
        return [json.dumps(a.to_json(), ensure_ascii=False) for a in answers]
    from dataclasses import asdict

    hits = engine.search_batch(name, texts, options.get("k") or 5, mode=options.get("mode"),
                               filter=options.get("filter"), filters=filters, min_cosine=options.get("min_cosine"))
    return [json.dumps({"query": q, "hits": [asdict(h) for h in hs]}, ensure_ascii=False)
            for q, hs in zip(texts, hits)]


def map_readers(config: Config, name: str, kind: str, texts: Sequence[str], options: dict, *,
                actors: int | None = None, actor_threads: int = 1, address: str | None = None,
                progress: Callable[[int], None] | None = None,
                filters: Sequence | None = None) -> Iterator[str]:
    """run_shard over `texts` (each with its filter from `filters`, if given) on Ray actors;
    yields one JSON string per text, in input order."""
    ray = connect(address)
    if kind not in ("answer", "search"):
        raise InvalidInput(f"unknown batch kind {kind!r}")
    actors = pool_size(ray, actors, actor_threads)
    _data_context(ray)
    shard = max(1, config.max_concurrent_generations * ANSWER_SHARD_ROWS) if kind == "answer" else 256
    own = [""] * len(texts) if filters is None else [json.dumps(f) if f else "{}" for f in filters]
    ds = (ray.data.from_items([{"i": i, "text": t, "filter": f} for i, (t, f) in enumerate(zip(texts, own))],
                              override_num_blocks=max(1, min(len(texts) // shard + 1, 4096)))
          .map_batches(_Reader, fn_constructor_kwargs={"config": config.replace(threads=actor_threads), "name": name,
                                                       "kind": kind, "options": options},
                       batch_size=shard, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                       num_cpus=actor_threads))
    done = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for r in batch["result"]:
                yield str(r)
            done += len(batch["result"])
            if progress:
                progress(done)
    except RagError:
        raise
    except Exception as e:
        raise _unwrap(e, kind) from e


def _unwrap(e: Exception, what: str) -> Exception:
    """A RagError raised in an actor (an unknown collection, say) as itself; else Unavailable."""
    cause = getattr(e, "cause", None)
    seen = 0
    while cause is not None and seen < 8:
        if isinstance(cause, RagError):
            return cause
        cause, seen = getattr(cause, "cause", None) or cause.__cause__, seen + 1
    return Unavailable(f"the Ray {what} failed: {type(e).__name__}: {e}")


def shutdown() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


__all__ = ["connect", "ingest", "map_readers", "run_shard", "shutdown"]
