"""Bad input against a real server (issue 5, item 4): one table of bad requests.

Each row sends one bad request to a server running the real default models and checks
  - the gRPC status code,
  - that the details (or, for a document that fails inside an IngestStream, its per-document
    error) name the problem,
  - that every collection is unchanged: its rows, the float32 vectors of its live chunks,
    its counts and what its index returns,
  - and that the server still answers a good Search right after.
The server requires a bearer token, so the same table also covers wrong and missing tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from engine.config import DEFAULT_MAX_DOCUMENT_BYTES, DEFAULT_MAX_MESSAGE_BYTES
from engine.errors import RagError
from engine.generate import MAX_STOP_SEQUENCES
from engine.pipeline import MAX_QUERY_CHARS, Engine
from server.app import create_server
from server.client import RagClient
from server.errors import status_for
from server.stubs import pb

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "corpus"
TEXTS = {p.name: p.read_text() for p in CORPUS.rglob("*") if p.is_file() and p.suffix in (".txt", ".md")}
TOKEN = "bad-input-token"
MB = 1000 * 1000
Code = grpc.StatusCode
METHODS = {m.name: m for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}


@dataclasses.dataclass
class Rig:
    engine: Engine
    client: RagClient  # sends the right token
    channel: grpc.Channel  # for raw bytes; sends only what a call passes as metadata
    auth: list


@pytest.fixture(scope="module")
def rig(tmp_path_factory, config, embedder, generator):
    cfg = config.replace(data_dir=tmp_path_factory.mktemp("badinput"), auth_token=TOKEN)
    engine = Engine(cfg, embedder=embedder, generator=generator)
    srv, port = create_server(cfg, "127.0.0.1:0", engine=engine)
    address = f"127.0.0.1:{port}"
    client = RagClient(address, token=TOKEN, timeout=120)
    client.create_collection("docs")
    client.ingest("docs", [{"id": name, "text": text} for name, text in TEXTS.items()])
    client.create_collection("spare", dtype="i8")
    client.ingest("spare", [{"id": "kettle", "text": "A kettle boils water for tea."}])
    big = 2 * DEFAULT_MAX_MESSAGE_BYTES  # so the server, not this channel, judges message sizes
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", big),
                                                      ("grpc.max_receive_message_length", big)])
    yield Rig(engine, client, channel, [("authorization", f"Bearer {TOKEN}")])
    channel.close()
    client.close()
    srv.stop(0)


# ---------------------------------------------------------------------- calls
def raw(name: str, data: bytes | list[bytes], *, metadata: list | None = None, timeout: float = 120):
    """Call RPC `name` with already-serialized request bytes (a list of messages for a stream)."""
    def call(r: Rig):
        m = METHODS[name]
        path = f"/{m.containing_service.full_name}/{m.name}"
        parse = getattr(pb, m.output_type.name).FromString
        kw = {"metadata": r.auth if metadata is None else metadata, "timeout": timeout}
        if m.client_streaming:
            return r.channel.stream_unary(path, request_serializer=None, response_deserializer=parse)(
                iter(data if isinstance(data, list) else [data]), **kw)
        if m.server_streaming:
            return list(r.channel.unary_stream(path, request_serializer=None, response_deserializer=parse)(data, **kw))
        return r.channel.unary_unary(path, request_serializer=None, response_deserializer=parse)(data, **kw)
    return call


def ingest(*docs: pb.Document, collection: str = "docs"):
    """IngestStream of `docs`, the first message naming `collection`."""
    return raw("IngestStream", [pb.IngestStreamRequest(collection=collection if i == 0 else "", document=d)
                                .SerializeToString() for i, d in enumerate(docs)])


def sent(message, placeholder: bytes = b"", replacement: bytes = b"") -> bytes:
    """`message` serialized, with `placeholder` (inside a string field) swapped for raw bytes."""
    data = message.SerializeToString()
    assert placeholder in data
    return data.replace(placeholder, replacement)


NEG_ONE = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"  # varint of -1: what an int32 -1 looks like on the wire
BAD_UTF8 = b"\xff\xfe\xfd\xfc"
GARBAGE = b"\xff\xff\xff\xff"  # an unterminated varint where a field tag belongs

# A collection of one document as ExportCollection sends it (settings as the server makes
# them, a unit vector for its one chunk), all in one message.
EXPORT_SETTINGS = {"index_dtype": "i8", "connectivity": 16, "expansion_add": 128, "expansion_search": 64,
                   "chunk_tokens": 256, "chunk_overlap": 32, "dim": 384, "embed_model": "all-MiniLM-L6-v2"}
UNIT = np.eye(1, 384, dtype="<f4")


def import_request(name="imported", settings=None, total=1, vectors=UNIT, end=13) -> "pb.ImportCollectionRequest":
    record = pb.DocumentRecord(id="kettle", source="kettle.txt", content_hash="0" * 32, metadata_json="{}", chars=13,
                               chunks=[pb.RecordChunk(start=0, end=end, tokens=4, text="Kettles sing."[:end])],
                               vectors=vectors.tobytes())
    part = pb.ExportCollectionResponse(settings_json=json.dumps(settings or EXPORT_SETTINGS), documents=[record],
                                       total_documents=total)
    if total is None:
        part.ClearField("total_documents")
    return pb.ImportCollectionRequest(name=name, part=part)


def import_call(*messages):
    return raw("ImportCollection", [m.SerializeToString() for m in messages])


# One good request per RPC: it would change state (or answer) if it were let through.
GOOD = {
    "CreateCollection": pb.CreateCollectionRequest(name="fresh"),
    "ListCollections": pb.ListCollectionsRequest(),
    "DescribeCollection": pb.DescribeCollectionRequest(name="docs"),
    "DropCollection": pb.DropCollectionRequest(name="spare"),
    "CopyCollection": pb.CopyCollectionRequest(name="docs", new_name="docs-copy"),
    "ExportCollection": pb.ExportCollectionRequest(name="docs"),
    "ImportCollection": import_request(),
    "IngestStream": pb.IngestStreamRequest(collection="docs", document=pb.Document(id="new", text="Kettles sing.")),
    "DeleteDocuments": pb.DeleteDocumentsRequest(collection="docs", ids=["tea.txt"]),
    "ListDocuments": pb.ListDocumentsRequest(collection="docs", page_size=2),
    "GetDocuments": pb.GetDocumentsRequest(collection="docs", ids=["tea.txt", "nope"]),
    "Embed": pb.EmbedRequest(texts=["green tea"]),
    "Search": pb.SearchRequest(collection="docs", query="green tea", top_k=3),
    "SearchBatch": pb.SearchBatchRequest(collection="docs", queries=["green tea", "bread"], top_k=3),
    "Answer": pb.AnswerRequest(collection="docs", question="How long does black tea steep?",
                               options=pb.GenerationOptions(max_new_tokens=4)),
    "AnswerBatch": pb.AnswerBatchRequest(collection="docs", questions=["How long does black tea steep?"],
                                         options=pb.GenerationOptions(max_new_tokens=4)),
    "GetInfo": pb.GetInfoRequest(),
}
assert set(GOOD) == set(METHODS), "every RPC needs a good request"


def search(collection="docs", query="tea", top_k=3, **kw):
    return raw("Search", pb.SearchRequest(collection=collection, query=query, top_k=top_k, **kw).SerializeToString())


def search_batch(queries, collection="docs", top_k=3):
    return raw("SearchBatch", pb.SearchBatchRequest(collection=collection, queries=queries, top_k=top_k)
               .SerializeToString())


def embed(texts):
    return raw("Embed", pb.EmbedRequest(texts=texts).SerializeToString())


def answer(question="How long does black tea steep?", collection="docs", top_k=None, **options):
    req = pb.AnswerRequest(collection=collection, question=question, top_k=top_k,
                           options=pb.GenerationOptions(**options))
    return raw("Answer", req.SerializeToString())


def answer_batch(questions=("How long does black tea steep?",), collection="docs", top_k=None, **options):
    req = pb.AnswerBatchRequest(collection=collection, questions=list(questions), top_k=top_k,
                                options=pb.GenerationOptions(**options))
    return raw("AnswerBatch", req.SerializeToString())


def create(name="fresh", **settings):
    return raw("CreateCollection", pb.CreateCollectionRequest(name=name, **settings).SerializeToString())


def describe(name):
    return raw("DescribeCollection", pb.DescribeCollectionRequest(name=name).SerializeToString())


def drop(name):
    return raw("DropCollection", pb.DropCollectionRequest(name=name).SerializeToString())


def delete(collection, ids=("tea.txt",)):
    return raw("DeleteDocuments", pb.DeleteDocumentsRequest(collection=collection, ids=list(ids)).SerializeToString())


def ingest_then_stall(r: Rig, *, deadline_s: float, stall_s: float):
    """IngestStream that sends one good document, then stalls past its deadline."""
    def requests():
        yield GOOD["IngestStream"].SerializeToString()
        time.sleep(stall_s)

    m = METHODS["IngestStream"]
    call = r.channel.stream_unary(f"/{m.containing_service.full_name}/{m.name}", request_serializer=None,
                                  response_deserializer=pb.IngestStreamResponse.FromString)
    return call(requests(), metadata=r.auth, timeout=deadline_s)


def engine_call(fn):
    """A call into the engine library itself, for input no RPC accepts (query vectors)."""
    return lambda r: fn(r.engine)


def text_doc(text, doc_id="bad"):
    return pb.Document(id=doc_id, text=text)


def data_doc(data, media_type="text/plain", doc_id="bad"):
    return pb.Document(id=doc_id, data=data, media_type=media_type)


MANY_GOOD = [pb.IngestStreamRequest(collection="docs" if i == 0 else "",
                                   document=pb.Document(id=f"many-{i}", text=f"Good document number {i}.")
                                   ).SerializeToString() for i in range(300)]


# ---------------------------------------------------------------------- the table
OK = Code.OK  # IngestStream reports a failing document in its result, not as the call's status
INVALID, NOT_FOUND, EXISTS = Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS
ONE_MB = "q" * (1024 * 1024)
LIMIT = f"the limit is {MAX_QUERY_CHARS}"
DOC_LIMIT = f"over the {DEFAULT_MAX_DOCUMENT_BYTES}-byte limit"
BIG_TEXT = "All work and no play. " * (50 * MB // 22 + 1)  # 50 MB of text
assert len(BIG_TEXT) >= 50 * MB


def case(id: str, call: Callable, code: Code, says: str):
    return pytest.param(call, code, says, id=id)


CASES = [
    # --- empty and whitespace-only
    case("search-empty-query", search(query=""), INVALID, "query is empty"),
    case("search-whitespace-query", search(query=" \t\n "), INVALID, "query is empty"),
    case("search-empty-message", raw("Search", b""), INVALID, "top_k"),
    case("searchbatch-no-queries", search_batch([]), INVALID, "no queries"),
    case("searchbatch-empty-query", search_batch(["tea", ""]), INVALID, "query 1 is empty"),
    case("searchbatch-whitespace-query", search_batch(["tea", "\u3000 \n"]), INVALID, "query 1 is empty"),
    case("embed-no-texts", embed([]), INVALID, "no texts"),
    case("embed-empty-text", embed(["tea", ""]), INVALID, "text 1 is empty"),
    case("embed-whitespace-text", embed(["  "]), INVALID, "text 0 is empty"),
    case("answer-empty-question", answer(""), INVALID, "query is empty"),
    case("answer-whitespace-question", answer("\n\t "), INVALID, "query is empty"),
    case("answerbatch-no-questions", answer_batch([]), INVALID, "no questions"),
    case("answerbatch-whitespace-question", answer_batch(["tea?", " "]), INVALID, "query 1 is empty"),
    case("ingest-empty-stream", raw("IngestStream", []), INVALID, "no documents"),
    case("ingest-no-collection", ingest(text_doc("Tea."), collection=""), INVALID, "must name the collection"),
    case("ingest-empty-text", ingest(text_doc("")), OK, "no text"),
    case("ingest-whitespace-text", ingest(text_doc(" \n\t ")), OK, "no text"),
    case("ingest-empty-data", ingest(data_doc(b"")), OK, "no text"),
    case("ingest-empty-id", ingest(text_doc("Tea.", doc_id="")), OK, "id is empty"),
    case("ingest-whitespace-id", ingest(text_doc("Tea.", doc_id="  ")), OK, "id is empty"),
    case("ingest-no-content", ingest(pb.Document(id="bad")), OK, "neither text nor data"),
    case("create-empty-name", create(""), INVALID, "collection name '' is invalid"),
    case("create-whitespace-name", create("  "), INVALID, "collection name '  ' is invalid"),
    case("describe-empty-name", describe(""), INVALID, "collection name"),
    case("drop-empty-name", drop(""), INVALID, "collection name"),
    case("delete-empty-collection", delete(""), INVALID, "collection name"),
    case("delete-ids-and-filter", raw("DeleteDocuments", pb.DeleteDocumentsRequest(
        collection="docs", ids=["tea.txt"], filter={"kind": "txt"}).SerializeToString()), INVALID,
         "give document ids or a filter to delete by, not both"),
    case("delete-filter-empty-field", raw("DeleteDocuments", pb.DeleteDocumentsRequest(
        collection="docs", filter={"": "txt"}).SerializeToString()), INVALID,
         "filter field names must be non-empty strings"),
    case("search-empty-collection", search(collection=""), INVALID, "collection name"),
    case("list-documents-empty-collection", raw("ListDocuments", pb.ListDocumentsRequest().SerializeToString()),
         INVALID, "collection name"),
    case("list-documents-missing-collection", raw("ListDocuments", pb.ListDocumentsRequest(
        collection="nope").SerializeToString()), NOT_FOUND, "'nope'"),
    case("list-documents-page-size-huge", raw("ListDocuments", pb.ListDocumentsRequest(
        collection="docs", page_size=5000).SerializeToString()), INVALID, r"page_size must be in \[1, 1000\] \(0 = 100\), got 5000"),
    case("list-documents-where-sets-nothing", raw("ListDocuments", pb.ListDocumentsRequest(
        collection="docs", where=[pb.FieldCondition(field="kind")]).SerializeToString()), INVALID, "sets nothing"),
    case("search-batch-query-filters-count", raw("SearchBatch", pb.SearchBatchRequest(
        collection="docs", queries=["green tea", "bread"], top_k=3,
        query_filters=[pb.QueryFilter(filter={"kind": "txt"})]).SerializeToString()), INVALID,
         r"query_filters has 1 entries for 2 queries; give one per query"),
    case("search-batch-query-filter-sets-nothing", raw("SearchBatch", pb.SearchBatchRequest(
        collection="docs", queries=["green tea", "bread"], top_k=3,
        query_filters=[pb.QueryFilter(), pb.QueryFilter(where=[pb.FieldCondition(field="kind")])]
    ).SerializeToString()), INVALID, r"query_filters\[1\]: where: the condition on 'kind' sets nothing"),
    case("search-batch-query-filter-contradicts", raw("SearchBatch", pb.SearchBatchRequest(
        collection="docs", queries=["green tea"], top_k=3, filter={"kind": "txt"},
        query_filters=[pb.QueryFilter(filter={"kind": "md"})]).SerializeToString()), INVALID, "kind"),
    case("copy-to-existing", raw("CopyCollection", pb.CopyCollectionRequest(name="docs", new_name="spare")
                                 .SerializeToString()), EXISTS, "'spare' already exists"),
    case("copy-missing", raw("CopyCollection", pb.CopyCollectionRequest(name="nope", new_name="x")
                             .SerializeToString()), NOT_FOUND, "'nope' does not exist"),
    case("copy-bad-name", raw("CopyCollection", pb.CopyCollectionRequest(name="docs", new_name="bad name")
                              .SerializeToString()), INVALID, "collection name 'bad name' is invalid"),
    case("search-min-cosine-above-one", search(min_cosine=1.5), INVALID, r"min_cosine must be a number in \[-1, 1\]"),
    case("search-min-cosine-nan", search(min_cosine=math.nan), INVALID, "min_cosine .* got nan"),
    case("search-batch-min-cosine-below", raw("SearchBatch", pb.SearchBatchRequest(
        collection="docs", queries=["green tea"], top_k=3, min_cosine=-3).SerializeToString()), INVALID, "got -3"),
    case("answer-min-cosine-above-one", raw("Answer", pb.AnswerRequest(
        collection="docs", question="How long does black tea steep?", min_cosine=1.5).SerializeToString()),
         INVALID, r"min_cosine must be a number in \[-1, 1\], got 1.5"),
    case("answerbatch-min-cosine-nan", raw("AnswerBatch", pb.AnswerBatchRequest(
        collection="docs", questions=["How long does black tea steep?"], min_cosine=math.nan).SerializeToString()),
         INVALID, "min_cosine .* got nan"),
    case("get-no-ids", raw("GetDocuments", pb.GetDocumentsRequest(collection="docs").SerializeToString()),
         INVALID, "give 1 to 1000 document ids, got 0"),
    case("get-too-many-ids", raw("GetDocuments", pb.GetDocumentsRequest(
        collection="docs", ids=[f"d{i}" for i in range(1001)]).SerializeToString()), INVALID, "got 1001"),
    case("get-empty-id", raw("GetDocuments", pb.GetDocumentsRequest(collection="docs", ids=["tea.txt", ""])
                             .SerializeToString()), INVALID, "non-empty strings"),
    case("get-missing-collection", raw("GetDocuments", pb.GetDocumentsRequest(collection="nope", ids=["a"])
                                       .SerializeToString()), NOT_FOUND, "'nope' does not exist"),
    case("export-missing", raw("ExportCollection", pb.ExportCollectionRequest(name="nope").SerializeToString()),
         NOT_FOUND, "'nope' does not exist"),
    case("import-empty-stream", import_call(), INVALID, "the stream was empty"),
    case("import-no-name", import_call(import_request(name="")), INVALID, "names the new collection"),
    case("import-to-existing", import_call(import_request(name="spare")), EXISTS, "'spare' already exists"),
    case("import-cut-short", import_call(import_request(total=None)), INVALID, "ended without its last message"),
    case("import-count-wrong", import_call(import_request(total=2)), INVALID, "holds 2 documents but 1 came"),
    case("import-other-model", import_call(import_request(settings={**EXPORT_SETTINGS, "embed_model": "bge-small"})),
         Code.FAILED_PRECONDITION, "embedded with bge-small"),
    case("import-settings-unknown-key", import_call(import_request(settings={**EXPORT_SETTINGS, "shards": 2})),
         INVALID, "unknown keys 'shards'"),
    case("import-vector-not-unit", import_call(import_request(vectors=2 * UNIT)), INVALID, "vector has length 2"),
    case("import-vector-short", import_call(import_request(vectors=UNIT[:, :100])), INVALID, "bytes of vectors"),
    case("import-chunk-past-end", import_call(import_request(end=20)), INVALID, "not inside the document"),
    case("search-any-of-filters-empty-part", search(any_of_filters=[pb.QueryFilter(filter={"kind": "txt"}),
                                                                   pb.QueryFilter()]),
         INVALID, r"any_of_filters\[1\] is empty"),
    case("search-all-of-filters-bad-part", search(any_of_filters=[pb.QueryFilter(all_of_filters=[
        pb.QueryFilter(where=[pb.FieldCondition(field="kind")])])]),
         INVALID, r"any_of_filters\[0\]: all_of_filters\[0\]: where: the condition on 'kind' sets nothing"),
    case("search-none-of-filters-empty-part", search(any_of_filters=[pb.QueryFilter(none_of_filters=[
        pb.QueryFilter(filter={"kind": "txt"}), pb.QueryFilter()])]),
         INVALID, r"any_of_filters\[0\]: none_of_filters\[1\] is empty"),
    case("search-filter-dollar-field", search(filter={"$or": "x"}), INVALID, r"\$or takes a non-empty list"),
    case("delete-any-of-filters-empty", raw("DeleteDocuments", pb.DeleteDocumentsRequest(
        collection="docs", any_of_filters=[pb.QueryFilter()]).SerializeToString()), INVALID, "is empty"),
    case("answer-batch-question-filters-count", raw("AnswerBatch", pb.AnswerBatchRequest(
        collection="docs", questions=["How long does black tea steep?"],
        options=pb.GenerationOptions(max_new_tokens=4),
        question_filters=[pb.QueryFilter(), pb.QueryFilter()]).SerializeToString()), INVALID,
         "question_filters has 2 entries for 1 questions; give one per question"),
    case("ingest-metadata-json-not-json", ingest(pb.Document(id="bad", text="Kettles sing.", metadata_json="{year: 1}")),
         OK, "metadata_json is not valid JSON"),
    case("ingest-metadata-json-not-object", ingest(pb.Document(id="bad", text="Kettles sing.", metadata_json="[1, 2]")),
         OK, "metadata_json must be a JSON object, got list"),
    case("ingest-metadata-and-metadata-json", ingest(pb.Document(id="bad", text="Kettles sing.", metadata={"a": "b"},
                                                                 metadata_json='{"year": 1}')),
         OK, "give metadata or metadata_json, not both"),
    # --- not UTF-8, not text
    case("ingest-data-not-utf8", ingest(data_doc(b"caf\xe9 au lait")), OK, "not valid UTF-8 at byte 3"),
    case("ingest-html-not-utf8", ingest(data_doc(b"<p>\xff\xfe</p>", "text/html")), OK, "not valid UTF-8"),
    case("ingest-data-binary", ingest(data_doc(b"\x00\x01\x02PNG")), OK, "binary"),
    case("ingest-text-nul", ingest(text_doc("tea\x00time")), OK, "NUL"),
    case("ingest-bad-pdf", ingest(data_doc(b"%PDF-1.4 not really", "application/pdf")), OK, "unreadable PDF"),
    case("ingest-unknown-media-type", ingest(data_doc(b"\x89PNG", "image/png")), OK, "unsupported media type"),
    case("search-query-not-utf8", raw("Search", sent(pb.SearchRequest(collection="docs", query="QQQQ", top_k=3),
                                                     b"QQQQ", BAD_UTF8)),
         INVALID, r"parsed as rag\.v1\.SearchRequest.*UTF-8"),
    case("answer-question-not-utf8", raw("Answer", sent(pb.AnswerRequest(collection="docs", question="QQQQ"),
                                                        b"QQQQ", BAD_UTF8)),
         INVALID, r"parsed as rag\.v1\.AnswerRequest.*UTF-8"),
    case("ingest-text-not-utf8", raw("IngestStream", sent(GOOD["IngestStream"], b"Kettles", b"\xffettles")),
         INVALID, r"parsed as rag\.v1\.IngestStreamRequest.*UTF-8"),
    case("create-name-not-utf8", raw("CreateCollection", sent(pb.CreateCollectionRequest(name="QQQQ"),
                                                              b"QQQQ", BAD_UTF8)),
         INVALID, r"parsed as rag\.v1\.CreateCollectionRequest.*UTF-8"),
    # --- too large
    case("ingest-50MB-text", ingest(text_doc(BIG_TEXT)), OK, DOC_LIMIT),
    case("ingest-50MB-data", ingest(data_doc(BIG_TEXT.encode())), OK, DOC_LIMIT),
    case("ingest-multibyte-text-over-limit", ingest(text_doc("€" * (DEFAULT_MAX_DOCUMENT_BYTES // 3 + 1))),
         OK, DOC_LIMIT),
    case("ingest-70MB-over-message-limit", ingest(data_doc(b"x" * (70 * MB))), Code.RESOURCE_EXHAUSTED,
         rf"larger than max \(\d+ vs\. {DEFAULT_MAX_MESSAGE_BYTES}\)"),
    case("search-1MB-query", search(query=ONE_MB), INVALID, f"query is {len(ONE_MB)} characters; {LIMIT}"),
    case("searchbatch-1MB-query", search_batch(["tea", ONE_MB]), INVALID, f"query 1 is .*{LIMIT}"),
    case("embed-1MB-text", embed([ONE_MB]), INVALID, f"text 0 is .*{LIMIT}"),
    case("answer-1MB-question", answer(ONE_MB), INVALID, LIMIT),
    case("answerbatch-1MB-question", answer_batch(["tea?", ONE_MB]), INVALID, f"query 1 is .*{LIMIT}"),
    case("searchbatch-too-many-queries", search_batch(["tea"] * 1025), INVALID, "1025 queries .* limit is 1024"),
    case("embed-too-many-texts", embed(["tea"] * 1025), INVALID, "1025 texts .* limit is 1024"),
    case("answerbatch-too-many-questions", answer_batch(["tea?"] * 1025), INVALID, "limit is 1024"),
    # --- vectors: no RPC takes vectors, the engine's search_batch does
    case("engine-query-vector-wrong-dim",
         engine_call(lambda e: e.search_batch("docs", ["tea"], 3, vectors=np.ones((1, 383), np.float32))),
         INVALID, r"shape \(1, 383\).*expects \(1, 384\)"),
    case("engine-query-vectors-wrong-dim-batch",
         engine_call(lambda e: e.search_batch("docs", ["tea", "pot"], 3, vectors=np.ones((2, 768), np.float32))),
         INVALID, r"shape \(2, 768\).*expects \(2, 384\)"),
    # --- unknown and duplicate collections
    case("search-unknown-collection", search(collection="nope"), NOT_FOUND, "'nope' does not exist"),
    case("searchbatch-unknown-collection", search_batch(["tea"], collection="nope"), NOT_FOUND, "'nope'"),
    case("answer-unknown-collection", answer(collection="nope"), NOT_FOUND, "'nope' does not exist"),
    case("answerbatch-unknown-collection", answer_batch(collection="nope"), NOT_FOUND, "'nope'"),
    case("ingest-unknown-collection", ingest(text_doc("Tea."), collection="nope"), NOT_FOUND, "'nope'"),
    case("delete-unknown-collection", delete("nope"), NOT_FOUND, "'nope' does not exist"),
    case("describe-unknown-collection", describe("nope"), NOT_FOUND, "'nope' does not exist"),
    case("drop-unknown-collection", drop("nope"), NOT_FOUND, "'nope' does not exist"),
    case("drop-path-traversal", drop("../badinput"), INVALID, "collection name"),
    case("describe-path-traversal", describe("docs/../spare"), INVALID, "collection name"),
    case("ingest-switches-collection", raw("IngestStream", [  # the first, good, document is not stored
        pb.IngestStreamRequest(collection="docs", document=text_doc("Tea is good.", "ok")).SerializeToString(),
        pb.IngestStreamRequest(collection="spare", document=text_doc("Bread.", "ok2")).SerializeToString()]),
         INVALID, "same collection"),
    case("create-duplicate", create("docs"), EXISTS, "'docs' already exists"),
    case("create-duplicate-other-settings", create("spare", dtype=pb.VECTOR_D_TYPE_F32, connectivity=8),
         EXISTS, "'spare' already exists"),
    # --- collection settings
    case("create-name-too-long", create("a" * 65), INVALID, "1-64 letters"),
    case("create-name-bad-char", create("bad name"), INVALID, "collection name 'bad name'"),
    case("create-unknown-dtype", create(dtype=99), INVALID, "unknown dtype 99"),
    case("create-connectivity-zero", create(connectivity=0), INVALID, r"connectivity must be .*\[1, 4096\]"),
    case("create-connectivity-huge", create(connectivity=2**32 - 1), INVALID, "connectivity must be"),
    case("create-chunk-tokens-zero", create(chunk_tokens=0), INVALID, "chunk_tokens must be"),
    case("create-overlap-not-below-chunk", create(chunk_tokens=64, chunk_overlap=64), INVALID,
         r"chunk_overlap must be in \[0, chunk_tokens=64\)"),
    # --- top_k
    case("search-top-k-zero", search(top_k=0), INVALID, r"top_k must be in \[1, 1000\], got 0"),
    case("search-top-k-huge", search(top_k=1001), INVALID, "top_k .* got 1001"),
    case("search-top-k-max-uint32", search(top_k=2**32 - 1), INVALID, "top_k .* got 4294967295"),
    case("search-top-k-negative", raw("Search", pb.SearchRequest(collection="docs", query="tea").SerializeToString()
                                      + b"\x18" + NEG_ONE), INVALID, "top_k .* got 4294967295"),
    case("search-filter-empty-field", search(filter={"": "md"}), INVALID,
         "filter field names must be non-empty strings, got ''"),
    case("search-where-no-field", search(where=[pb.FieldCondition(any_of=["md"])]), INVALID,
         "where: every condition needs a field name"),
    case("search-where-sets-nothing", search(where=[pb.FieldCondition(field="kind")]), INVALID,
         "the condition on 'kind' sets nothing; set any_of, none_of, contains, contains_any or a bound"),
    case("search-where-mixed-bounds", search(where=[pb.FieldCondition(field="n", gt="1", lt="z")]), INVALID,
         "range bounds must all be numbers or all text"),
    case("search-where-twice", search(filter={"kind": "md"}, where=[
        pb.FieldCondition(field="kind", gte="a"), pb.FieldCondition(field="kind", gte="b")]), INVALID,
         "field 'kind' gets gte from two conditions"),
    case("search-where-empty-field", search(where=[pb.FieldCondition(field="", gt="1")]), INVALID,
         "every condition needs a field name"),
    case("delete-where-sets-nothing", raw("DeleteDocuments", pb.DeleteDocumentsRequest(
        collection="docs", where=[pb.FieldCondition(field="kind")]).SerializeToString()), INVALID,
         "sets nothing"),
    case("delete-ids-and-where", raw("DeleteDocuments", pb.DeleteDocumentsRequest(
        collection="docs", ids=["tea.txt"], where=[pb.FieldCondition(field="kind", any_of=["txt"])])
        .SerializeToString()), INVALID, "give document ids or a filter to delete by, not both"),
    case("answer-where-mixed-bounds", raw("Answer", pb.AnswerRequest(
        collection="docs", question="tea?", where=[pb.FieldCondition(field="n", gte="2020", lte="x")])
        .SerializeToString()), INVALID, "range bounds must all be numbers or all text"),
    case("searchbatch-top-k-zero", search_batch(["tea"], top_k=0), INVALID, "top_k"),
    case("searchbatch-top-k-huge", search_batch(["tea"], top_k=5000), INVALID, "top_k .* got 5000"),
    case("answer-top-k-zero", answer(top_k=0), INVALID, "top_k .* got 0"),
    case("answer-filter-empty-field", raw("Answer", pb.AnswerRequest(
        collection="docs", question="tea?", filter={"": "md"}).SerializeToString()), INVALID,
         "filter field names must be non-empty strings"),
    case("answerbatch-filter-empty-field", raw("AnswerBatch", pb.AnswerBatchRequest(
        collection="docs", questions=["tea?"], filter={"": "md"}).SerializeToString()), INVALID,
         "filter field names must be non-empty strings"),
    case("answer-top-k-huge", answer(top_k=1001), INVALID, "top_k .* got 1001"),
    case("answer-top-k-negative", raw("Answer", pb.AnswerRequest(collection="docs", question="tea?")
                                      .SerializeToString() + b"\x18" + NEG_ONE), INVALID, "top_k .* got 4294967295"),
    case("answerbatch-top-k-huge", answer_batch(top_k=1001), INVALID, "top_k .* got 1001"),
    # --- sampling parameters
    case("answer-temperature-negative", answer(temperature=-1.0), INVALID, "temperature must be >= 0"),
    case("answer-temperature-nan", answer(temperature=math.nan), INVALID, "temperature .* got nan"),
    case("answer-temperature-inf", answer(temperature=math.inf), INVALID, "temperature .* got inf"),
    case("answer-top-p-zero", answer(top_p=0.0), INVALID, r"top_p must be in \(0, 1\]"),
    case("answer-top-p-above-one", answer(top_p=1.5), INVALID, "top_p .* got 1.5"),
    case("answer-top-p-nan", answer(top_p=math.nan), INVALID, "top_p .* got nan"),
    case("answer-repetition-penalty-zero", answer(repetition_penalty=0.0), INVALID, "repetition_penalty must be > 0"),
    case("answer-repetition-penalty-negative", answer(repetition_penalty=-2.0), INVALID, "repetition_penalty"),
    case("answer-max-new-tokens-zero", answer(max_new_tokens=0), INVALID, r"max_new_tokens must be .*got 0"),
    case("answer-max-new-tokens-huge", answer(max_new_tokens=100000), INVALID, "max_new_tokens .* got 100000"),
    case("answer-empty-stop", answer(stop=[""]), INVALID, "stop must be"),
    case("answer-too-many-stops", answer(stop=[f"s{i}" for i in range(MAX_STOP_SEQUENCES + 1)]), INVALID,
         f"at most {MAX_STOP_SEQUENCES}"),
    case("answerbatch-temperature-negative", answer_batch(temperature=-0.5), INVALID, "temperature"),
    case("answerbatch-top-p-zero", answer_batch(top_p=0.0), INVALID, "top_p"),
    case("answerbatch-max-new-tokens-huge", answer_batch(max_new_tokens=2**32 - 1), INVALID, "max_new_tokens"),
    # --- malformed protobuf: every RPC, plus a truncated message and a stream gone bad midway
    *[case(f"malformed-{name}", raw(name, GARBAGE), INVALID,
           rf"could not be parsed as rag\.v1\.{METHODS[name].input_type.name}") for name in GOOD],
    case("malformed-truncated-search", raw("Search", GOOD["Search"].SerializeToString()[:5]), INVALID,
         r"could not be parsed as rag\.v1\.SearchRequest \(wire format was corrupt\)"),
    # More good documents than one engine commit batch (256) before the bad message: the
    # server reads the whole stream before storing anything, so none of them is stored.
    case("malformed-ingest-after-300-documents", raw("IngestStream", MANY_GOOD + [GARBAGE]),
         INVALID, r"could not be parsed as rag\.v1\.IngestStreamRequest"),
    case("ingest-switches-collection-after-300-documents", raw("IngestStream", MANY_GOOD + [
        pb.IngestStreamRequest(collection="spare", document=text_doc("Bread.", "ok2")).SerializeToString()]),
         INVALID, "same collection"),
    case("malformed-ingest-second-message", raw("IngestStream", [GOOD["IngestStream"].SerializeToString(), GARBAGE]),
         INVALID, r"could not be parsed as rag\.v1\.IngestStreamRequest"),
    # --- an expired deadline: every RPC, with a request that would otherwise succeed. The
    # deadline is already in the past: gRPC rounds a sub-millisecond timeout up to about 1 ms
    # (with timeout=1e-6, 283 of 300 fast calls succeeded), so a tiny timeout is not expired.
    *[case(f"deadline-{name}", raw(name, [m.SerializeToString()] if METHODS[name].client_streaming
                                   else m.SerializeToString(), timeout=-1.0),
           Code.DEADLINE_EXCEEDED, "deadline") for name, m in GOOD.items()],
    # ... and one that passes on the server, with a good document received but not yet stored
    case("deadline-IngestStream-passes-mid-stream", lambda r: ingest_then_stall(r, deadline_s=0.3, stall_s=1.5),
         Code.DEADLINE_EXCEEDED, "deadline"),
    # --- a wrong or missing token: every RPC, with a request that would otherwise succeed
    *[case(f"{which}-token-{name}", raw(name, [m.SerializeToString()] if METHODS[name].client_streaming
                                        else m.SerializeToString(), metadata=md),
           Code.UNAUTHENTICATED, "bearer token")
      for name, m in GOOD.items()
      for which, md in (("wrong", [("authorization", "Bearer nope")]), ("missing", []))],
]


# ---------------------------------------------------------------------- what must not change
def collection_digest(engine: Engine, name: str) -> tuple:
    """(documents, chunks, sha256 of rows and live vectors, index answer to a probe)."""
    db = engine.root / name / "store.sqlite"
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        h = hashlib.sha256()
        for table, order in (("meta", "key"), ("documents", "doc_id"), ("chunks", "key")):
            h.update(table.encode())
            for row in con.execute(f"SELECT * FROM {table} ORDER BY {order}"):  # noqa: S608 - fixed names
                h.update(repr(row).encode())
        keys = np.array([k for (k,) in con.execute("SELECT key FROM chunks ORDER BY key")], dtype=np.int64)
        docs = con.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
    finally:
        con.close()
    h.update(np.ascontiguousarray(engine.collections.get(name).store.vectors()[keys], dtype=np.float32).tobytes())
    probe = np.zeros((1, engine.embedder.dim), np.float32)
    probe[0, 0] = 1.0
    hits = (engine.search_batch(name, ["probe"], max(1, min(10, len(keys))), mode="dense", vectors=probe)[0]
            if len(keys) else [])
    return docs, len(keys), h.hexdigest(), [(hit.key, round(hit.score, 5)) for hit in hits]


def snapshot(r: Rig) -> dict:
    root = r.engine.root
    state = {"folders": sorted(p.name for p in root.iterdir())}  # leftover temp folders count too
    for info in r.engine.list_collections():
        state[info.name] = collection_digest(r.engine, info.name)
        d = r.client.describe(info.name)
        assert (d.documents, d.chunks) == state[info.name][:2]
    return state


def outcome(call: Callable, r: Rig) -> tuple[Code, str]:
    """(status code, what the server said) of one call; for an IngestStream that succeeded,
    every document must have failed, and what it said is the documents' errors."""
    try:
        result = call(r)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    except RagError as e:  # an engine call: the status the server's one table gives it
        return status_for(e), str(e)
    assert isinstance(result, pb.IngestStreamResponse), f"the call succeeded: {result}"
    assert result.results and all(d.status == pb.DOCUMENT_STATUS_FAILED for d in result.results), result
    assert result.chunks_added == result.chunks_removed == 0
    return Code.OK, "; ".join(d.error for d in result.results)


@pytest.mark.parametrize("call, code, says", CASES)
def test_bad_input(rig, call, code, says):
    before = snapshot(rig)
    got, details = outcome(call, rig)
    assert got == code, details
    assert re.search(says, details, re.IGNORECASE), f"{details!r} does not match {says!r}"
    assert snapshot(rig) == before, "a failed request changed the store or index"
    assert rig.client.search("docs", "How hot for green tea?", 1)[0].doc_id == "tea.txt", "the server keeps serving"


def test_every_good_request_succeeds(rig):
    """The control: the requests that the deadline and token rows send are fine otherwise,
    so those rows failed for their deadline or token alone. Runs last: it changes the store."""
    for name, message in GOOD.items():
        data = [message.SerializeToString()] if METHODS[name].client_streaming else message.SerializeToString()
        raw(name, data)(rig)
    assert {c.name for c in rig.client.list_collections()} == {"docs", "fresh", "docs-copy", "imported"}
    assert rig.client.describe("docs").documents == len(TEXTS)  # one deleted, one added
