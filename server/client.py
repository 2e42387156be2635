"""A small Python client of rag.v1, used by `rag ... --server HOST:PORT`."""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Iterable, Iterator, Sequence

import grpc

from engine.errors import InvalidInput
from engine.filters import LIST_OPS, RANGE_OPS, check_filter, fields, meta_str, meta_wire, operators

from .stubs import pb, rpc


MODES = {None: pb.SEARCH_MODE_UNSPECIFIED, "hybrid": pb.SEARCH_MODE_HYBRID, "dense": pb.SEARCH_MODE_DENSE,
         "exact": pb.SEARCH_MODE_EXACT}


# Calls that only read (searches, answers, listings, info) and fail UNAVAILABLE (a server
# that went away, or is shutting down, before the call got any response) are tried again,
# after a short backoff, on the next server of the target; a write is not: after a lost
# connection the client cannot tell whether it was applied.
READ_METHODS = [{"service": "rag.v1.RetrieveService"}, {"service": "rag.v1.AnswerService"},
                {"service": "rag.v1.InfoService"},
                *({"service": "rag.v1.CollectionService", "method": m} for m in ("ListCollections",
                                                                                "DescribeCollection",
                                                                                "ExportCollection")),
                *({"service": "rag.v1.IngestService", "method": m} for m in ("ListDocuments", "GetDocuments"))]
RETRY_READS = {"maxAttempts": 4, "initialBackoff": "0.05s", "maxBackoff": "1s", "backoffMultiplier": 2,
               "retryableStatusCodes": ["UNAVAILABLE"]}
# Calls go to every reachable server of the target in turn (one server: no difference).
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                             "methodConfig": [{"name": READ_METHODS, "retryPolicy": RETRY_READS}]})


def channel_target(address: str | Sequence[str]) -> str:
    """A gRPC target for one address or several (read-only replicas).

    One string is used as given: "HOST:PORT", or any gRPC target such as
    "dns:///replicas.internal:50051" (every A record is a replica) or
    "ipv4:10.0.0.1:50051,10.0.0.2:50051". Several "HOST:PORT" strings (or one with commas)
    are resolved here into one "ipv4:" (or "ipv6:") target listing them all.
    """
    if isinstance(address, str):
        parts = [address] if _has_scheme(address) else [a.strip() for a in address.split(",")]
    else:
        parts = [str(a).strip() for a in address]
    if len(parts) == 1:
        return parts[0]
    v4, v6 = [], []
    for hp in parts:
        host, sep, port = hp.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise InvalidInput(f"server address {hp!r} is not HOST:PORT")
        try:
            infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise InvalidInput(f"cannot resolve server {hp!r}: {e.strerror}") from None
        fam = {i[0] for i in infos}
        if socket.AF_INET in fam:
            v4.append(f"{next(i[4][0] for i in infos if i[0] == socket.AF_INET)}:{port}")
        if socket.AF_INET6 in fam:
            v6.append(f"[{next(i[4][0] for i in infos if i[0] == socket.AF_INET6)}]:{port}")
    if len(v4) == len(parts):
        return "ipv4:" + ",".join(v4)
    if len(v6) == len(parts):
        return "ipv6:" + ",".join(v6)
    raise InvalidInput(f"servers {parts} mix IPv4-only and IPv6-only hosts; give one family")


def _has_scheme(address: str) -> bool:
    return address.split(",", 1)[0].startswith(("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:"))


def filter_pb(filter: dict | None) -> dict:
    """A metadata filter as engine/filters.py takes it -> a request's `filter` (equalities),
    `where` (FieldCondition) and `any_of_filters` ($or; with $and or $not, one alternative
    holding every group) fields; checked here first, so a bad one fails as the server would fail it."""
    f = check_filter(filter) or {}
    plain, where = _conditions(f)
    groups = [query_filter_pb(g) for g in f.get("$or", ())]
    parts = [query_filter_pb(g) for g in f.get("$and", ())]
    if "$not" in f:
        parts.append(pb.QueryFilter(none_of_filters=[query_filter_pb(g) for g in f["$not"]]))
    if parts:
        groups = [pb.QueryFilter(all_of_filters=[*parts, *([pb.QueryFilter(any_of_filters=groups)] if groups else [])])]
    return {"filter": plain, "where": where, "any_of_filters": groups}


def query_filter_pb(f: dict) -> "pb.QueryFilter":
    """A canonical filter (check_filter) as one QueryFilter message."""
    plain, where = _conditions(f)
    return pb.QueryFilter(filter=plain, where=where, any_of_filters=[query_filter_pb(g) for g in f.get("$or", ())],
                          all_of_filters=[query_filter_pb(g) for g in f.get("$and", ())],
                          none_of_filters=[query_filter_pb(g) for g in f.get("$not", ())])


def _conditions(f: dict) -> tuple[dict, list]:
    """A canonical filter's field conditions as (equalities, FieldCondition messages)."""
    plain, where = {}, []
    for field, cond in fields(f).items():
        if any(v is None for op in ("$eq", "$ne") if op in cond for v in [cond[op]]) or any(
                v is None for op in ("$in", "$nin") for v in cond.get(op, ())):
            raise InvalidInput(f"filter field {field!r}: null (a missing field) cannot be sent over gRPC; "
                               "filter on a value, or $ne / $nin another")
        c = pb.FieldCondition(field=field, any_of=cond.get("$in", ()),
                              none_of=[*cond.get("$nin", ()), *([cond["$ne"]] if "$ne" in cond else [])],
                              contains=cond.get("$contains", ()), contains_any=cond.get("$contains_any", ()))
        for op in RANGE_OPS:
            if op in cond:
                setattr(c, op[1:], meta_str(cond[op]))
        if "$eq" in cond:
            plain[field] = cond["$eq"]
        if len(cond) > ("$eq" in cond):
            where.append(c)
    return plain, where


def query_filters_pb(filters: Sequence[dict | None] | None) -> list:
    """Per-query filters (one per query, or None for none) -> repeated QueryFilter."""
    return [] if filters is None else [query_filter_pb(check_filter(f) or {}) for f in filters]


def document_metadata_pb(metadata: dict, typed: bool = True) -> dict:
    """A document's metadata as Document fields: the string map when every value is a
    string (or the server reads nothing else: `typed` False; values other than strings
    then as JSON strings), else metadata_json, which keeps numbers, booleans and lists."""
    if all(isinstance(v, str) for v in metadata.values()):
        return {"metadata": metadata}
    if not typed:
        return {"metadata": {k: meta_wire(v) for k, v in metadata.items()}}
    return {"metadata_json": json.dumps(metadata, ensure_ascii=False)}


def older_server(e: grpc.RpcError, method: str) -> Exception:
    """`e`, or where the server has no `method` (UNIMPLEMENTED) an error saying so."""
    if e.code() == grpc.StatusCode.UNIMPLEMENTED:
        return InvalidInput(f"the server has no {method} (it is older than this client); upgrade it, or copy the "
                            "collection's data dir on the server's machine")
    return e


class RagClient:
    """Thin typed wrapper over the generated stubs. Errors surface as grpc.RpcError.

    `address`: one server, or several (a list, or "HOST:PORT,HOST:PORT") that calls are
    spread over with gRPC's round_robin policy; servers that are down are skipped.
    """

    def __init__(self, address: str | Sequence[str], *, token: str | None = None,
                 root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None, timeout: float | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024) -> None:
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.service_config", SERVICE_CONFIG)]
        target = channel_target(address)
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.timeout = timeout
        self.collections = rpc.CollectionServiceStub(self.channel)
        self.ingest_stub = rpc.IngestServiceStub(self.channel)
        self.retrieve = rpc.RetrieveServiceStub(self.channel)
        self.answers = rpc.AnswerServiceStub(self.channel)
        self.info_stub = rpc.InfoServiceStub(self.channel)
        self._features: frozenset | None = None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RagClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _kw(self, timeout: float | None = None) -> dict:
        return {"metadata": self.metadata, "timeout": timeout if timeout is not None else self.timeout}

    def info(self) -> "pb.GetInfoResponse":
        return self.info_stub.GetInfo(pb.GetInfoRequest(), **self._kw())

    def features(self) -> frozenset:
        """GetInfoResponse.features of the server (asked once): request fields it reads that
        older servers would silently drop."""
        if self._features is None:
            self._features = frozenset(self.info().features)
        return self._features

    def _need(self, feature: str, what: str) -> None:
        if feature not in self.features():
            raise InvalidInput(f"the server does not read {what} (it is older than this client: GetInfo.features "
                               f"lacks {feature!r}), so it would drop them and return unfiltered results; "
                               "upgrade the server, or leave them out")

    def _filter(self, filter: dict | None) -> dict:
        """filter_pb's request fields, once the server is known to read the groups it uses."""
        fields = filter_pb(filter)
        if fields["any_of_filters"]:
            self._need("filter_groups", "$or / $and filters (any_of_filters)")
        self._need_newer_ops([filter])
        return fields

    def _need_newer_ops(self, filters: Sequence[dict | None]) -> None:
        used = set().union(*(operators(check_filter(f)) for f in filters))
        if used & set(LIST_OPS):
            self._need("list_contains", "$contains / $contains_any filters (FieldCondition.contains)")
        if "$not" in used:
            self._need("filter_not", "$not filters (none_of_filters)")

    def _min_cosine(self, min_cosine: float | None) -> dict:
        """The min_cosine field, once the server is known to read it (checked here first)."""
        if min_cosine is None:
            return {}
        from engine.search import check_min_cosine

        floor = check_min_cosine(min_cosine)
        if "min_cosine" not in self.features():
            raise InvalidInput("the server does not read min_cosine (it is older than this client: GetInfo.features "
                               "lacks 'min_cosine'), so it would ignore it; upgrade the server, or leave it out")
        return {"min_cosine": floor}

    def _query_filters(self, filters: Sequence[dict | None] | None) -> list:
        """query_filters_pb's messages, once the server is known to read them."""
        out = query_filters_pb(filters)
        if out:
            self._need("query_filters", "per-query filters (query_filters, question_filters)")
            if any(q.any_of_filters or q.all_of_filters for q in out):
                self._need("filter_groups", "$or / $and filters (any_of_filters)")
            self._need_newer_ops(filters)
        return out

    def create_collection(self, name: str, dtype: str | None = None, **settings) -> "pb.CollectionInfo":
        """`dtype`: "f32", "f16" or "i8"; None: the server's default (as `rag create`'s)."""
        from .convert import DTYPE_TO_PB

        if dtype is not None and dtype not in DTYPE_TO_PB:
            raise InvalidInput(f"dtype must be one of {sorted(DTYPE_TO_PB)}, got {dtype!r}")
        req = pb.CreateCollectionRequest(name=name, dtype=DTYPE_TO_PB[dtype] if dtype else pb.VECTOR_D_TYPE_UNSPECIFIED,
                                         **settings)
        return self.collections.CreateCollection(req, **self._kw()).collection

    def list_collections(self) -> list:
        return list(self.collections.ListCollections(pb.ListCollectionsRequest(), **self._kw()).collections)

    def describe(self, name: str) -> "pb.CollectionInfo":
        return self.collections.DescribeCollection(pb.DescribeCollectionRequest(name=name), **self._kw()).collection

    def drop_collection(self, name: str) -> None:
        self.collections.DropCollection(pb.DropCollectionRequest(name=name), **self._kw())

    def copy_collection(self, name: str, new_name: str, timeout: float | None = None) -> "pb.CollectionInfo":
        """Copy `name` to `new_name` in the server's data dir, as of one moment."""
        return self.collections.CopyCollection(pb.CopyCollectionRequest(name=name, new_name=new_name),
                                               **self._kw(timeout)).collection

    def export_collection(self, name: str, timeout: float | None = None) -> tuple[dict, Iterator[list]]:
        """Collection `name` as of one moment: its settings, and its documents (engine
        DocumentRecords with chunks and stored vectors) in batches as they arrive: a backup
        to build here (Collections.receive) or to send to another server (import_collection)."""
        from .convert import export_settings, message_records

        stream = self.export_messages(name, timeout)
        first = next(stream)
        settings = export_settings(first)
        return settings, message_records(itertools.chain([first], stream), settings.get("dim"))

    def export_messages(self, name: str, timeout: float | None = None) -> Iterator["pb.ExportCollectionResponse"]:
        """ExportCollection's messages as they come (a backup file holds them as they are)."""
        stream = self.collections.ExportCollection(pb.ExportCollectionRequest(name=name), **self._kw(timeout))
        try:
            first = next(stream)
        except grpc.RpcError as e:
            raise older_server(e, "ExportCollection") from None
        return itertools.chain([first], stream)

    def import_collection(self, name: str, settings: dict, batches: Iterable[Sequence], timeout: float | None = None
                          ) -> "pb.CollectionInfo":
        """Make collection `name` on the server from an exported one (settings and batches of
        DocumentRecords: export_collection's, here or from another server, or
        Engine.export_collection's), streamed in messages of about 1 MiB."""
        from .convert import export_messages

        return self.import_messages(name, export_messages(settings, batches), timeout)

    def import_messages(self, name: str, messages: Iterable["pb.ExportCollectionResponse"],
                        timeout: float | None = None) -> "pb.CollectionInfo":
        """Make collection `name` from an export's messages as they are (a backup file's).
        An error raised while `messages` are read is raised here, after the call (which the
        stream cut short has made fail, the server making nothing)."""
        failed: list[BaseException] = []

        def requests():
            try:
                for i, part in enumerate(messages):
                    yield pb.ImportCollectionRequest(name=name if i == 0 else "", part=part)
            except Exception as e:  # noqa: BLE001 - raised below, after the call: the stream ends
                failed.append(e)   # without its last message, so the server makes nothing
        try:
            info = self.collections.ImportCollection(requests(), **self._kw(timeout)).collection
        except grpc.RpcError as e:
            if failed:
                raise failed[0] from None
            raise older_server(e, "ImportCollection") from None
        if failed:  # not reached: a stream without its last message is refused
            raise failed[0]
        return info

    def ingest(self, collection: str, documents: Iterable[dict], timeout: float | None = None
               ) -> "pb.IngestStreamResponse":
        """documents: dicts with id and text (or data + media_type), optional source, metadata
        (a dict; values other than strings keep their JSON types: sent as metadata_json, or
        as JSON strings to a server older than that field)."""
        typed = "metadata_json" in self.features()

        def requests():
            for i, d in enumerate(documents):
                doc = pb.Document(id=d["id"], source=d.get("source", ""), media_type=d.get("media_type", ""),
                                  **document_metadata_pb(d.get("metadata") or {}, typed))
                if "data" in d:
                    doc.data = d["data"]
                else:
                    doc.text = d["text"]
                yield pb.IngestStreamRequest(collection=collection if i == 0 else "", document=doc)
        return self.ingest_stub.IngestStream(requests(), **self._kw(timeout))

    def delete(self, collection: str, ids: list[str] = (), filter: dict | None = None) -> int:
        req = pb.DeleteDocumentsRequest(collection=collection, ids=list(ids), **self._filter(filter))
        return self.ingest_stub.DeleteDocuments(req, **self._kw()).deleted

    def list_documents(self, collection: str, *, filter: dict | None = None, page_size: int = 0,
                       page_token: str = "") -> "pb.ListDocumentsResponse":
        req = pb.ListDocumentsRequest(collection=collection, page_size=page_size, page_token=page_token,
                                      **self._filter(filter))
        return self.ingest_stub.ListDocuments(req, **self._kw())

    def get_documents(self, collection: str, ids: Sequence[str]) -> "pb.GetDocumentsResponse":
        """Documents by id with their text and chunk spans; ids not held in missing_ids."""
        return self.ingest_stub.GetDocuments(pb.GetDocumentsRequest(collection=collection, ids=list(ids)),
                                             **self._kw())

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [list(v.values) for v in self.retrieve.Embed(pb.EmbedRequest(texts=texts), **self._kw()).vectors]

    def search(self, collection: str, query: str, k: int = 5, filter: dict | None = None,
               timeout: float | None = None, mode: str | None = None, min_cosine: float | None = None) -> list:
        """`min_cosine`: leave out hits less similar to the query than this (fewer than k)."""
        req = pb.SearchRequest(collection=collection, query=query, top_k=k, mode=MODES[mode],
                               **self._min_cosine(min_cosine), **self._filter(filter))
        return list(self.retrieve.Search(req, **self._kw(timeout)).hits)

    def search_batch(self, collection: str, queries: list[str], k: int = 5, filter: dict | None = None,
                     mode: str | None = None, filters: Sequence[dict | None] | None = None,
                     min_cosine: float | None = None) -> list:
        """`filters`: each query's own filter (or None), to hold with `filter`."""
        req = pb.SearchBatchRequest(collection=collection, queries=queries, top_k=k, mode=MODES[mode],
                                    query_filters=self._query_filters(filters), **self._min_cosine(min_cosine),
                                    **self._filter(filter))
        return [list(r.hits) for r in self.retrieve.SearchBatch(req, **self._kw()).results]

    def answer(self, collection: str, question: str, *, k: int | None = None, timeout: float | None = None,
               filter: dict | None = None, min_cosine: float | None = None, **options) -> Iterator["pb.AnswerResponse"]:
        """Streams AnswerResponse messages: sources, then deltas, then done. Cancel with .cancel().
        `min_cosine`: passages less similar to the question are not shown to the generator."""
        req = pb.AnswerRequest(collection=collection, question=question, options=pb.GenerationOptions(**options),
                               **self._min_cosine(min_cosine), **self._filter(filter))
        if k is not None:
            req.top_k = k
        return self.answers.Answer(req, **self._kw(timeout))

    def answer_batch(self, collection: str, questions: list[str], *, k: int | None = None,
                     filter: dict | None = None, filters: Sequence[dict | None] | None = None,
                     min_cosine: float | None = None, **options):
        """`filters`: each question's own filter (or None) for its retrieval, with `filter`."""
        req = pb.AnswerBatchRequest(collection=collection, questions=questions,
                                    options=pb.GenerationOptions(**options),
                                    question_filters=self._query_filters(filters), **self._min_cosine(min_cosine),
                                    **self._filter(filter))
        if k is not None:
            req.top_k = k
        return list(self.answers.AnswerBatch(req, **self._kw()).answers)
