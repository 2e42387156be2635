"""A small Python client of rag.v1, used by `rag ... --server HOST:PORT`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import grpc

from .stubs import pb, rpc


MODES = {None: pb.SEARCH_MODE_UNSPECIFIED, "hybrid": pb.SEARCH_MODE_HYBRID, "dense": pb.SEARCH_MODE_DENSE}


class RagClient:
    """Thin typed wrapper over the generated stubs. Errors surface as grpc.RpcError."""

    def __init__(self, address: str, *, token: str | None = None, root_certificates: bytes | None = None,
                 private_key: bytes | None = None, certificate_chain: bytes | None = None,
                 timeout: float | None = None, max_message_bytes: int = 64 * 1024 * 1024) -> None:
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.timeout = timeout
        self.collections = rpc.CollectionServiceStub(self.channel)
        self.ingest_stub = rpc.IngestServiceStub(self.channel)
        self.retrieve = rpc.RetrieveServiceStub(self.channel)
        self.answers = rpc.AnswerServiceStub(self.channel)
        self.info_stub = rpc.InfoServiceStub(self.channel)

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

    def create_collection(self, name: str, dtype: str = "f32", **settings) -> "pb.CollectionInfo":
        from .convert import DTYPE_TO_PB

        req = pb.CreateCollectionRequest(name=name, dtype=DTYPE_TO_PB[dtype], **settings)
        return self.collections.CreateCollection(req, **self._kw()).collection

    def list_collections(self) -> list:
        return list(self.collections.ListCollections(pb.ListCollectionsRequest(), **self._kw()).collections)

    def describe(self, name: str) -> "pb.CollectionInfo":
        return self.collections.DescribeCollection(pb.DescribeCollectionRequest(name=name), **self._kw()).collection

    def drop_collection(self, name: str) -> None:
        self.collections.DropCollection(pb.DropCollectionRequest(name=name), **self._kw())

    def ingest(self, collection: str, documents: Iterable[dict], timeout: float | None = None
               ) -> "pb.IngestStreamResponse":
        """documents: dicts with id and text (or data + media_type), optional source, metadata."""
        def requests():
            for i, d in enumerate(documents):
                doc = pb.Document(id=d["id"], source=d.get("source", ""), media_type=d.get("media_type", ""),
                                  metadata={k: str(v) for k, v in d.get("metadata", {}).items()})
                if "data" in d:
                    doc.data = d["data"]
                else:
                    doc.text = d["text"]
                yield pb.IngestStreamRequest(collection=collection if i == 0 else "", document=doc)
        return self.ingest_stub.IngestStream(requests(), **self._kw(timeout))

    def delete(self, collection: str, ids: list[str]) -> int:
        return self.ingest_stub.DeleteDocuments(pb.DeleteDocumentsRequest(collection=collection, ids=ids),
                                                **self._kw()).deleted

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [list(v.values) for v in self.retrieve.Embed(pb.EmbedRequest(texts=texts), **self._kw()).vectors]

    def search(self, collection: str, query: str, k: int = 5, filter: dict | None = None,
               timeout: float | None = None, mode: str | None = None) -> list:
        req = pb.SearchRequest(collection=collection, query=query, top_k=k, filter=filter or {},
                               mode=MODES[mode])
        return list(self.retrieve.Search(req, **self._kw(timeout)).hits)

    def search_batch(self, collection: str, queries: list[str], k: int = 5, filter: dict | None = None,
                     mode: str | None = None) -> list:
        req = pb.SearchBatchRequest(collection=collection, queries=queries, top_k=k, filter=filter or {},
                                    mode=MODES[mode])
        return [list(r.hits) for r in self.retrieve.SearchBatch(req, **self._kw()).results]

    def answer(self, collection: str, question: str, *, k: int | None = None, timeout: float | None = None,
               **options) -> Iterator["pb.AnswerResponse"]:
        """Streams AnswerResponse messages: sources, then deltas, then done. Cancel with .cancel()."""
        req = pb.AnswerRequest(collection=collection, question=question,
                               options=pb.GenerationOptions(**options))
        if k is not None:
            req.top_k = k
        return self.answers.Answer(req, **self._kw(timeout))

    def answer_batch(self, collection: str, questions: list[str], *, k: int | None = None, **options):
        req = pb.AnswerBatchRequest(collection=collection, questions=questions, options=pb.GenerationOptions(**options))
        if k is not None:
            req.top_k = k
        return list(self.answers.AnswerBatch(req, **self._kw()).answers)
