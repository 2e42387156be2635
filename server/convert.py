"""Conversions between rag.v1 messages and engine values, in both directions.

The servicers (server/service.py) stay a list of RPCs: each reads its request through
these functions, calls the engine, and builds its response with them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from engine.chunk import Chunk
from engine.config import MAX_LIST_PAGE, MAX_TOP_K
from engine.errors import InvalidInput
from engine.filters import RANGE_OPS, group_parts, meta_wire
from engine.generate import SamplingParams
from engine.store import DocumentRecord

from .stubs import pb

DTYPE_TO_PB = {"f32": pb.VECTOR_D_TYPE_F32, "f16": pb.VECTOR_D_TYPE_F16, "i8": pb.VECTOR_D_TYPE_I8}
PB_TO_DTYPE = {v: k for k, v in DTYPE_TO_PB.items()}
FINISH_TO_PB = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS,
                "stop_sequence": pb.FINISH_REASON_STOP_SEQUENCE, "no_context": pb.FINISH_REASON_NO_CONTEXT,
                "cancelled": pb.FINISH_REASON_CANCELLED}
SEARCH_MODES_PB = {pb.SEARCH_MODE_UNSPECIFIED: None, pb.SEARCH_MODE_HYBRID: "hybrid", pb.SEARCH_MODE_DENSE: "dense",
                   pb.SEARCH_MODE_EXACT: "exact"}
STATUS_TO_PB = {"added": pb.DOCUMENT_STATUS_ADDED, "updated": pb.DOCUMENT_STATUS_UPDATED,
                "unchanged": pb.DOCUMENT_STATUS_UNCHANGED, "failed": pb.DOCUMENT_STATUS_FAILED}


def search_mode(value: int) -> str | None:
    if value not in SEARCH_MODES_PB:
        raise InvalidInput(f"unknown search mode {value}; use SEARCH_MODE_HYBRID, SEARCH_MODE_DENSE or SEARCH_MODE_EXACT")
    return SEARCH_MODES_PB[value]


def check_top_k(k: int) -> int:
    if not 1 <= k <= MAX_TOP_K:
        raise InvalidInput(f"top_k must be in [1, {MAX_TOP_K}], got {k}")
    return k


def page_size(n: int) -> int:
    if n > MAX_LIST_PAGE:
        raise InvalidInput(f"page_size must be in [1, {MAX_LIST_PAGE}] (0 = 100), got {n}")
    return n or 100


def request_filter(request) -> dict | None:
    """A request's (or QueryFilter's) `filter` (equalities), `where` (FieldCondition) and
    groups of filters (any_of_filters: $or, all_of_filters: $and, none_of_filters: $not) as
    one metadata filter for the engine (engine/filters.py), which checks the rest."""
    out: dict = dict(request.filter)
    for c in request.where:
        if not c.field:
            raise InvalidInput("where: every condition needs a field name")
        ops = {op: getattr(c, op[1:]) for op in RANGE_OPS if c.HasField(op[1:])}
        if c.any_of:
            ops["$in"] = list(c.any_of)
        if c.none_of:
            ops["$nin"] = list(c.none_of)
        if c.contains:
            ops["$contains"] = list(c.contains)
        if c.contains_any:
            ops["$contains_any"] = list(c.contains_any)
        if not ops:
            raise InvalidInput(f"where: the condition on {c.field!r} sets nothing; set any_of, none_of, "
                               "contains, contains_any or a bound (gt, gte, lt, lte)")
        have = out.get(c.field, {})
        have = have if isinstance(have, dict) else {"$eq": have}
        if twice := sorted(set(have) & set(ops)):
            raise InvalidInput(f"where: field {c.field!r} gets {twice[0].lstrip('$')} from two conditions; "
                               "give each part once")
        out[c.field] = {**have, **ops}
    for name, op in (("any_of_filters", "$or"), ("all_of_filters", "$and"), ("none_of_filters", "$not")):
        if group := getattr(request, name, ()):  # requests have any_of_filters; QueryFilter all three
            out[op] = group_parts(name, group, request_filter, "give each filter of the group a filter, where "
                                                                "or a group")
    return out or None


def batch_filters(request, field: str, n: int, what: tuple[str, str]) -> list | None:
    """A batch request's per-query filters (`field`: its repeated QueryFilter, empty or one
    per query, in order) as engine filters; None when it has none. `what`: ("query",
    "queries") or ("question", "questions")."""
    items = getattr(request, field)
    if not items:
        return None
    if len(items) != n:
        raise InvalidInput(f"{field} has {len(items)} entries for {n} {what[1]}; give one per {what[0]}, "
                           "in order (an empty QueryFilter for none), or leave it empty")
    out = []
    for i, f in enumerate(items):
        try:
            out.append(request_filter(f))
        except InvalidInput as e:
            raise InvalidInput(f"{field}[{i}]: {e}") from None
    return out


def document_metadata(d) -> dict:
    """A Document's metadata: its string map, or the JSON object in metadata_json (values
    keep their JSON types). InvalidInput when both are given or the JSON is not an object."""
    if not d.metadata_json:
        return dict(d.metadata)
    if d.metadata:
        raise InvalidInput(f"document {d.id!r}: give metadata or metadata_json, not both")
    return json_object(d.metadata_json, f"document {d.id!r}: metadata_json")


def json_object(text: str, what: str) -> dict:
    """`text` read as a JSON object; InvalidInput naming `what` otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{what} is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


# ExportCollection's messages stay near this size (under every gRPC client's default 4 MiB
# receive limit); a collection is built from them in batches of about BUILD_BATCH_CHUNKS.
EXPORT_MESSAGE_BYTES = 1024 * 1024
BUILD_BATCH_CHUNKS = 4096


def export_messages(settings: dict, batches: Iterable[Sequence[DocumentRecord]],
                    budget: int = EXPORT_MESSAGE_BYTES) -> Iterator["pb.ExportCollectionResponse"]:
    """An exported collection (Engine.export_collection) as ExportCollection's messages: the
    settings, then documents in messages of about `budget` bytes."""
    yield pb.ExportCollectionResponse(settings_json=json.dumps(settings, sort_keys=True))
    out, size, total = [], 0, 0
    for batch in batches:
        for rec in batch:
            total += 1
            for piece in record_pbs(rec, budget):
                n = piece.ByteSize() + 8
                if out and size + n > budget:
                    yield pb.ExportCollectionResponse(documents=out)
                    out, size = [], 0
                out.append(piece)
                size += n
    yield pb.ExportCollectionResponse(documents=out, total_documents=total)


def record_pbs(rec: DocumentRecord, budget: int) -> Iterator["pb.DocumentRecord"]:
    """A document as one DocumentRecord, or as several (`continued`) of about `budget`
    bytes each when its chunks and vectors are larger."""
    vectors = np.ascontiguousarray(rec.vectors, dtype="<f4")
    row = vectors.shape[1] * 4
    head = {"source": rec.source, "content_hash": rec.content_hash, "chars": rec.n_chars,
            "metadata_json": json.dumps(rec.metadata, ensure_ascii=False)}
    i, n = 0, len(rec.chunks)
    while i < n:
        j = i
        size = pb.DocumentRecord(id=rec.doc_id, **(head if i == 0 else {})).ByteSize() + 16
        while j < n:
            more = row + len(rec.chunks[j].text.encode("utf-8", "surrogatepass")) + 24
            if j > i and size + more > budget:
                break
            size += more
            j += 1
        chunks = [pb.RecordChunk(start=c.start, end=c.end, tokens=c.n_tokens, text=c.text) for c in rec.chunks[i:j]]
        yield pb.DocumentRecord(id=rec.doc_id, chunks=chunks, vectors=vectors[i:j].tobytes(), continued=j < n,
                                **(head if i == 0 else {}))
        i = j


def export_settings(message) -> dict:
    """The settings of an export's first message (an ExportCollectionResponse)."""
    if not message.settings_json:
        raise InvalidInput("an export's first message carries its settings (settings_json); this one has none")
    return json_object(message.settings_json, "settings_json")


def message_records(messages: Iterable, dim: int) -> Iterator[list[DocumentRecord]]:
    """The documents of an export's messages (ExportCollectionResponse, the first included:
    it may hold documents too, and be the last), a continued document joined up, in batches
    of about BUILD_BATCH_CHUNKS chunks. Vectors are read as they are; Collections.receive
    checks each record."""
    batch, n_chunks, doc = [], 0, None  # doc: a continued document's parts so far
    total, seen = None, 0
    for i, m in enumerate(messages):
        if m.settings_json and i:
            raise InvalidInput("settings_json comes in an export's first message only")
        if total is not None:
            raise InvalidInput("a message came after the export's last one (the one with total_documents)")
        if m.HasField("total_documents"):
            total = m.total_documents
        for r in m.documents:
            if doc is not None:
                if r.id != doc["id"]:
                    raise InvalidInput(f"document {doc['id']!r} was marked continued, but the next record is "
                                       f"{r.id!r}; a continued document's records come one after another")
                if r.source or r.content_hash or r.metadata_json or r.chars:
                    raise InvalidInput(f"document {r.id!r}: a continuing record repeats the id only; leave "
                                       "source, content_hash, metadata_json and chars empty")
            else:
                doc = {"id": r.id, "source": r.source, "content_hash": r.content_hash, "chars": r.chars,
                       "metadata": json_object(r.metadata_json or "{}", f"document {r.id!r}: metadata_json"),
                       "chunks": [], "vectors": []}
            if len(r.vectors) != len(r.chunks) * dim * 4:
                raise InvalidInput(f"document {r.id!r}: {len(r.vectors)} bytes of vectors for {len(r.chunks)} "
                                   f"chunks; each needs {dim} float32 values ({dim * 4} bytes)")
            base = len(doc["chunks"])
            doc["chunks"] += [Chunk(r.id, base + i, c.start, c.end, c.tokens, c.text) for i, c in enumerate(r.chunks)]
            doc["vectors"].append(np.frombuffer(r.vectors, dtype="<f4").reshape(len(r.chunks), dim))
            if r.continued:
                continue
            vectors = np.concatenate(doc["vectors"]).astype(np.float32, copy=False)  # a copy of the message's bytes
            batch.append(DocumentRecord(doc["id"], doc["source"], doc["content_hash"], doc["metadata"],
                                        doc["chars"], doc["chunks"], vectors))
            n_chunks += len(doc["chunks"])
            seen += 1
            doc = None
            if n_chunks >= BUILD_BATCH_CHUNKS:
                yield batch
                batch, n_chunks = [], 0
    if doc is not None:
        raise InvalidInput(f"the export ended inside document {doc['id']!r} (its last record was marked continued)")
    if total is None:
        raise InvalidInput("the export ended without its last message (the one with total_documents): it was cut "
                           "short; export it again")
    if seen != total:
        raise InvalidInput(f"the export holds {total} documents but {seen} came; export it again")
    if batch:
        yield batch


def hit_pb(h) -> "pb.Hit":
    return pb.Hit(rank=h.rank, score=h.score, cosine=h.cosine, doc_id=h.doc_id, source=h.source,
                  ordinal=h.ordinal, start=h.start, end=h.end, text=h.text,
                  metadata={k: meta_wire(v) for k, v in h.metadata.items()},
                  metadata_json=json.dumps(h.metadata, ensure_ascii=False))


def stored_document_pb(d) -> "pb.StoredDocument":
    return pb.StoredDocument(id=d.doc_id, source=d.source, content_hash=d.content_hash,
                             metadata={k: meta_wire(v) for k, v in d.metadata.items()},
                             metadata_json=json.dumps(d.metadata, ensure_ascii=False), chars=d.n_chars,
                             chunks=d.n_chunks, ingested_unix_s=d.ingested_at)


def document_text_pb(d) -> "pb.DocumentText":
    return pb.DocumentText(document=stored_document_pb(d.document), text=d.text, text_exact=d.exact,
                           chunks=[pb.ChunkSpan(start=s, end=e, tokens=t) for s, e, t in d.chunks])


def sources_pb(sources) -> list:
    return [pb.Source(number=s.number, hit=hit_pb(s.hit)) for s in sources]


def info_pb(i) -> "pb.CollectionInfo":
    return pb.CollectionInfo(name=i.name, documents=i.documents, chunks=i.chunks, dims=i.dim,
                             embedding_model=i.embed_model, dtype=DTYPE_TO_PB[i.index_dtype],
                             connectivity=i.connectivity, expansion_add=i.expansion_add,
                             expansion_search=i.expansion_search, chunk_tokens=i.chunk_tokens,
                             chunk_overlap=i.chunk_overlap, disk_bytes=i.disk_bytes,
                             index_memory_bytes=i.index_memory_bytes)


def sampling_params(o, default_max_new_tokens: int) -> SamplingParams:
    """GenerationOptions -> SamplingParams; unset fields take the engine's defaults."""
    has = o.HasField
    return SamplingParams(
        max_new_tokens=o.max_new_tokens if has("max_new_tokens") else default_max_new_tokens,
        temperature=o.temperature if has("temperature") else 0.0,
        top_k=o.top_k if has("top_k") else 0,
        top_p=o.top_p if has("top_p") else 1.0,
        repetition_penalty=o.repetition_penalty if has("repetition_penalty") else 1.0,
        seed=o.seed if has("seed") else None,
        stop=tuple(o.stop),
        ignore_eos=o.ignore_eos,
        speculative_tokens=o.speculative_tokens if has("speculative_tokens") else None)


def answer_done_pb(a, total_ns: int) -> "pb.AnswerDone":
    t = a.timings_ns
    return pb.AnswerDone(finish_reason=FINISH_TO_PB.get(a.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                         usage=pb.Usage(prompt_tokens=a.prompt_tokens, completion_tokens=a.completion_tokens,
                                        cached_tokens=a.cached_tokens,
                                        accepted_prediction_tokens=a.accepted_prediction_tokens,
                                        rejected_prediction_tokens=a.rejected_prediction_tokens),
                         timings=pb.Timings(queue_time_ns=t.get("queue", 0), embed_time_ns=t["embed"],
                                            search_time_ns=t["search"], prompt_time_ns=t["prompt"],
                                            prefill_time_ns=t["prefill"], decode_time_ns=t["decode"],
                                            total_time_ns=total_ns),
                         cited=a.cited, text=a.text, support=[support_pb(x) for x in a.support],
                         extracted=a.extracted, degenerate=a.degenerate, retries=a.retries)


def support_pb(x) -> "pb.SentenceSupport":
    return pb.SentenceSupport(answer_start=x.answer_start, answer_end=x.answer_end, supported=x.supported,
                              score=x.score, overlap=x.overlap, source=x.source, doc_id=x.doc_id, start=x.start,
                              end=x.end, text=x.text)
