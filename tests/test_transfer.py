"""A collection carried between engines and servers: Engine.export_collection /
import_collection, gRPC ExportCollection / ImportCollection, and `rag copy` with --from,
--to and --server (a backup off a server, a restore onto one). Real default models; the
copies are compared with their source document by document, vector bit by vector bit."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from engine.cli import main
from engine.documents import Document
from engine.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound
from engine.pipeline import Engine
from server.app import create_server
from server.client import RagClient
from server.convert import export_messages, message_records
from server.stubs import pb, rpc

CORPUS = Path(__file__).resolve().parent.parent / "examples" / "corpus"
QUESTION = "At what temperature should green tea be brewed?"


def long_text(n: int) -> str:
    return " ".join(f"Sentence {i} tells how kettle number {i % 17} boiled water for tea on day {i}." for i in range(n))


def fill(engine: Engine, name: str = "c") -> None:
    """The example corpus, a long document (many chunks), typed metadata."""
    engine.create_collection(name, chunk_tokens=64, chunk_overlap=8)
    engine.ingest_paths(name, [CORPUS])
    engine.ingest(name, [Document("long", long_text(300), "long.txt", {"year": 2024, "tags": ["a", "b"],
                                                                        "score": 0.5, "ok": True, "none": None}),
                         Document("üñí", "Unicode ids and text: thé vert à 80 °C.", "u.txt", {"lang": "fr"})])


def state(engine: Engine, name: str) -> tuple[list, list]:
    """(document rows, chunk rows with their vectors as bytes), in key order."""
    store = engine.collections.get(name).store
    docs, chunks = [], []
    for batch in store.export():
        for r in batch:
            docs.append((r.doc_id, r.source, r.content_hash, r.metadata, r.n_chars))
            chunks += [(c.doc_id, c.ordinal, c.start, c.end, c.n_tokens, c.text, v.tobytes())
                       for c, v in zip(r.chunks, r.vectors)]
    return docs, chunks


def settings_of(engine: Engine, name: str) -> dict:
    return {k: v for k, v in engine.collections.get(name).store.settings.items() if k != "created_at"}


def hits(engine: Engine, name: str) -> dict:
    return {m: [(h.doc_id, h.ordinal, h.score) for h in engine.search(name, QUESTION, 5, mode=m)]
            for m in ("exact", "dense", "hybrid")}


def nothing_left(engine: Engine, names: list[str]) -> None:
    assert sorted(engine.collections.names()) == sorted(names)
    assert not engine.root.exists() or not [p.name for p in engine.root.iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture()
def other(tmp_path, config, embedder):
    eng = Engine(config.replace(data_dir=tmp_path / "other"), embedder=embedder)
    yield eng
    eng.close()


def test_export_then_import_equals_the_source(engine, other):
    fill(engine)
    settings, batches = engine.export_collection("c", batch_chunks=20)  # several batches
    info = other.import_collection("copy", settings, batches)
    assert state(other, "copy") == state(engine, "c") and info.documents == 10 and info.chunks > 40
    assert settings_of(other, "copy") == settings_of(engine, "c")
    assert hits(other, "copy") == hits(engine, "c")
    assert other.search("copy", "kettle", 3, filter={"year": {"$gte": 2024}})[0].doc_id == "long"  # metadata index
    # the same documents ingested again: nothing to do (content hashes carried)
    assert other.ingest("copy", [Document("üñí", "Unicode ids and text: thé vert à 80 °C.", "u.txt",
                                          {"lang": "fr"})]).documents_unchanged == 1
    with pytest.raises(AlreadyExists):
        other.import_collection("copy", *engine.export_collection("c"))
    with pytest.raises(NotFound):
        engine.export_collection("missing")
    with pytest.raises(InvalidInput, match="collection name"):
        other.import_collection("bad name", *engine.export_collection("c"))
    nothing_left(other, ["copy"])


def test_messages_split_a_large_document_and_join_it_again(engine):
    """ExportCollection's messages stay near their budget: a document larger than it goes out
    as `continued` records and comes back whole, vectors bit-equal."""
    fill(engine)
    settings, batches = engine.export_collection("c")
    msgs = list(export_messages(settings, batches, budget=4000))
    assert json.loads(msgs[0].settings_json) == engine.collections.get("c").store.settings
    assert msgs[-1].total_documents == 10 and all(not m.HasField("total_documents") for m in msgs[:-1])
    assert any(r.continued for m in msgs for r in m.documents)
    assert all(m.ByteSize() <= 4000 for m in msgs)
    got = [r for batch in message_records(msgs[1:], settings["dim"]) for r in batch]
    want = [r for batch in engine.export_collection("c")[1] for r in batch]
    assert [(r.doc_id, r.source, r.content_hash, r.metadata, r.n_chars, list(r.chunks)) for r in got] == \
           [(r.doc_id, r.source, r.content_hash, r.metadata, r.n_chars, list(r.chunks)) for r in want]
    assert all(np.array_equal(a.vectors, b.vectors) for a, b in zip(got, want))


def _records(engine):
    return [r for batch in engine.export_collection("c")[1] for r in batch]


def _chunk(rec, i=0, **change):
    chunks = list(rec.chunks)
    chunks[i] = dataclasses.replace(chunks[i], **change)
    return dataclasses.replace(rec, chunks=chunks)


def _vectors(rec, fn):
    v = rec.vectors.copy()
    fn(v)
    return dataclasses.replace(rec, vectors=v)


BAD_SETTINGS = [
    (lambda s: {k: v for k, v in s.items() if k != "dim"}, InvalidInput, "collection settings lack dim"),
    (lambda s: {**s, "shards": 3}, InvalidInput, "unknown keys 'shards'"),
    (lambda s: {**s, "index_dtype": "f64"}, InvalidInput, "index dtype 'f64' is not supported"),
    (lambda s: {**s, "connectivity": 0}, InvalidInput, r"connectivity must be an integer in \[1, 4096\]"),
    (lambda s: {**s, "chunk_overlap": 64}, InvalidInput, r"chunk_overlap must be in \[0, chunk_tokens=64\)"),
    (lambda s: {**s, "dim": "384"}, InvalidInput, "dim must be an integer"),
    (lambda s: [s], InvalidInput, "settings must be a JSON object"),
    (lambda s: {**s, "embed_model": "bge-small"}, FailedPrecondition,
     "embedded with bge-small .* this engine runs all-MiniLM-L6-v2"),
]

BAD_RECORDS = [
    (lambda r: dataclasses.replace(r, doc_id=" "), "a document's id is empty"),
    (lambda r: dataclasses.replace(r, metadata=["x"]), "metadata must be a JSON object"),
    (lambda r: dataclasses.replace(r, metadata={"x": float("nan")}), "metadata is not JSON"),
    (lambda r: dataclasses.replace(r, content_hash=""), "content_hash is empty"),
    (lambda r: dataclasses.replace(r, n_chars=0), "size in characters must be a positive integer"),
    (lambda r: dataclasses.replace(r, chunks=[], vectors=r.vectors[:0]), "has no chunks"),
    (lambda r: _chunk(r, ordinal=5), "numbered 0, 1, ... in order"),
    (lambda r: _chunk(r, end=r.n_chars + 1), "is not inside the document"),
    (lambda r: _chunk(r, text=r.chunks[0].text + "x"), "its text must be the"),
    (lambda r: _chunk(r, n_tokens=0), "tokens must be >= 1"),
    (lambda r: dataclasses.replace(r, vectors=r.vectors[:, :100]), "vectors must be"),
    (lambda r: _vectors(r, lambda v: v.__setitem__((0, 0), np.nan)), "NaN or infinity"),
    (lambda r: _vectors(r, lambda v: v.__imul__(2)), "its vector has length 2"),
    (lambda r: _vectors(r, lambda v: v.__setitem__(0, 0)), "its vector has length 0"),
]


@pytest.mark.parametrize("change,error,message", BAD_SETTINGS)
def test_import_refuses_bad_settings_and_makes_nothing(engine, other, change, error, message):
    fill(engine)
    settings, batches = engine.export_collection("c")
    with pytest.raises(error, match=message):
        other.import_collection("copy", change(settings), batches)
    nothing_left(other, [])


@pytest.mark.parametrize("change,message", BAD_RECORDS)
def test_import_refuses_a_bad_record_and_makes_nothing(engine, other, change, message):
    fill(engine)
    settings = engine.export_collection("c")[0]
    records = _records(engine)
    bad = [*records[:-1], change(records[-1])]  # the last: the others are built first
    with pytest.raises(InvalidInput, match=message):
        other.import_collection("copy", settings, [bad[:4], bad[4:]])
    nothing_left(other, [])


def test_import_refuses_a_document_twice(engine, other):
    fill(engine)
    settings = engine.export_collection("c")[0]
    records = _records(engine)
    with pytest.raises(InvalidInput, match="comes twice"):
        other.import_collection("copy", settings, [records, records[:1]])
    nothing_left(other, [])


# ---------------------------------------------------------------- over gRPC and the CLI
@pytest.fixture()
def served(tmp_path, config, embedder):
    eng = Engine(config.replace(data_dir=tmp_path / "served"), embedder=embedder)
    srv, port = create_server(eng.config, "127.0.0.1:0", engine=eng)
    yield eng, f"127.0.0.1:{port}"
    srv.stop(0)
    eng.close()


def rag(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_backup_off_a_server_and_restore_onto_one(served, engine, tmp_path, capsys):
    """`rag copy --server --to` builds the server's collection here; `--server --from` sends
    one from here. Both equal their source; so does the local `--from`."""
    srv_engine, address = served
    fill(srv_engine)
    backup = tmp_path / "backup"
    code, out, err = rag(capsys, "copy", "c", "kept", "--server", address, "--to", backup, "-q")
    assert code == 0, err
    assert out.startswith(f"copied c from {address} to kept in {backup} (10 documents, ")
    mine = Engine(engine.config.replace(data_dir=backup), embedder=engine.embedder)
    try:
        assert state(mine, "kept") == state(srv_engine, "c")
        assert settings_of(mine, "kept") == settings_of(srv_engine, "c")
        assert hits(mine, "kept") == hits(srv_engine, "c")
    finally:
        mine.close()
    code, out, err = rag(capsys, "copy", "kept", "back", "--server", address, "--from", backup, "-q")
    assert code == 0, err
    assert out.startswith(f"copied kept from {backup} to back in {address} (10 documents, ")
    assert state(srv_engine, "back") == state(srv_engine, "c") and hits(srv_engine, "back") == hits(srv_engine, "c")
    # here, from another data dir into this one
    code, out, err = rag(capsys, "--data-dir", engine.config.data_dir, "copy", "kept", "here", "--from", backup, "-q")
    assert code == 0, err
    assert state(engine, "here") == state(srv_engine, "c")

    # errors: one line each, nothing made
    code, _, err = rag(capsys, "copy", "c", "x", "--server", address, "--to", backup, "--from", backup)
    assert code == 2 and "give --to" in err and "not both" in err
    code, _, err = rag(capsys, "copy", "nope", "x", "--server", address, "--to", backup)
    assert code == 2 and err.startswith("error: NOT_FOUND: collection 'nope' does not exist")
    code, _, err = rag(capsys, "copy", "kept", "c", "--server", address, "--from", backup)
    assert code == 2 and err.startswith("error: ALREADY_EXISTS: collection 'c' already exists")
    code, _, err = rag(capsys, "copy", "c", "kept", "--server", address, "--to", backup)
    assert code == 2 and "collection 'kept' already exists" in err
    nothing_left(srv_engine, ["back", "c"])
    assert sorted(p.name for p in (backup / "collections").iterdir()) == ["kept"]


def _import(address, messages):
    with grpc.insecure_channel(address) as ch:
        return rpc.CollectionServiceStub(ch).ImportCollection(iter(messages), timeout=60)


def _stream(settings, records, name="copy", **first):
    msgs = list(export_messages(settings, [records], budget=4000))
    out = [pb.ImportCollectionRequest(name=name, part=msgs[0], **first)]
    return out + [pb.ImportCollectionRequest(part=m) for m in msgs[1:]]


def test_import_over_grpc_refuses_bad_streams_and_makes_nothing(served, engine):
    srv_engine, address = served
    fill(engine)
    settings, records = engine.export_collection("c")[0], _records(engine)
    good = _stream(settings, records)
    last = good[-1].part

    def without_total():
        m = pb.ImportCollectionRequest()
        m.CopyFrom(good[-1])
        m.part.ClearField("total_documents")
        return m

    def wrong_vectors():
        m = pb.ImportCollectionRequest()
        m.CopyFrom(good[1])
        m.part.documents[0].vectors = m.part.documents[0].vectors[:-4]
        return m

    cases = [
        ([], "the stream was empty"),
        ([pb.ImportCollectionRequest(part=good[0].part), *good[1:]], "this one has no name"),
        ([pb.ImportCollectionRequest(name="copy"), *good[1:]], r"carries its settings \(settings_json\)"),
        ([pb.ImportCollectionRequest(name="copy", part=pb.ExportCollectionResponse(settings_json="[1")), *good[1:]],
         "settings_json is not valid JSON"),
        ([*good[:-1], without_total()], "ended without its last message"),
        ([*good, pb.ImportCollectionRequest(part=last)], "a message came after the export's last one"),
        ([*good[:2], good[-1]],
         r"the export holds 10 documents but \d+ came|ended inside document|was marked continued"),
        ([good[0], wrong_vectors(), *good[2:]], "bytes of vectors for"),
        ([*good[:1], pb.ImportCollectionRequest(name="other", part=good[1].part), *good[2:]],
         "all messages of one ImportCollection name 'copy'"),
        ([*good[:1], pb.ImportCollectionRequest(part=pb.ExportCollectionResponse(settings_json="{}")), *good[1:]],
         "settings_json comes in an export's first message only"),
        (_stream({**settings, "embed_model": "bge-small"}, records), "embedded with bge-small"),
        (_stream(settings, [*records, records[0]]), "comes twice"),
        (_stream(settings, records, name="bad name"), "collection name 'bad name' is invalid"),
    ]
    assert len(good) > 4  # a stream of several messages
    for messages, message in cases:
        with pytest.raises(grpc.RpcError) as e:
            _import(address, messages)
        code = grpc.StatusCode.FAILED_PRECONDITION if "bge-small" in message else grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.code() == code and re.search(message, e.value.details()), \
            (message, e.value.details())
        nothing_left(srv_engine, [])
    assert _import(address, good).collection.documents == 10
    assert state(srv_engine, "copy") == state(engine, "c")


def test_an_import_that_fails_or_is_cancelled_midway_makes_nothing(served, engine):
    """A client whose source fails midway raises that error after ending the stream short
    (which the server refuses); a call cancelled midway: the server builds nothing."""
    import threading

    srv_engine, address = served
    fill(engine)
    settings, records = engine.export_collection("c")[0], _records(engine)

    def failing():
        yield records[:3]
        raise OSError("the backup disk went away")
    with RagClient(address) as client, pytest.raises(OSError, match="the backup disk went away"):
        client.import_collection("copy", settings, failing())
    nothing_left(srv_engine, [])

    sent, go_on = threading.Event(), threading.Event()

    def held():
        for i, m in enumerate(_stream(settings, records)):
            if i == 3:
                sent.set()
                go_on.wait(30)
            yield m
    with grpc.insecure_channel(address) as ch:
        call = rpc.CollectionServiceStub(ch).ImportCollection.future(held(), timeout=60)
        assert sent.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (srv_engine.root.exists() and any(
                p.name.startswith(".tmp-") for p in srv_engine.root.iterdir())):
            time.sleep(0.02)  # the server is building
        call.cancel()
        go_on.set()
        with pytest.raises(grpc.FutureCancelledError):
            call.result()
    while time.monotonic() < deadline and any(p.name.startswith(".tmp-") for p in srv_engine.root.iterdir()):
        time.sleep(0.05)
    nothing_left(srv_engine, [])


def test_a_read_only_server_refuses_imports_and_exports(served, tmp_path, config, embedder):
    srv_engine, _ = served
    fill(srv_engine)
    reader = Engine(config.replace(data_dir=srv_engine.config.data_dir, read_only=True), embedder=embedder)
    srv, port = create_server(reader.config, "127.0.0.1:0", engine=reader)
    try:
        with RagClient(f"127.0.0.1:{port}") as client:
            settings, batches = client.export_collection("c")  # a replica can be backed up
            records = [r for b in batches for r in b]
            assert len(records) == 10
            with pytest.raises(grpc.RpcError) as e:
                client.import_collection("copy", settings, [records])
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "read-only" in e.value.details()
    finally:
        srv.stop(0)
        reader.close()
    nothing_left(srv_engine, ["c"])


def test_a_server_without_the_calls_is_named_older(engine):
    """A server older than ExportCollection / ImportCollection answers UNIMPLEMENTED: the
    client says what that means instead."""
    from concurrent import futures

    fill(engine)
    bare = grpc.server(futures.ThreadPoolExecutor(max_workers=2))  # serves no rag.v1 method at all
    port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    try:
        with RagClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(InvalidInput, match="the server has no ExportCollection .*older than this client"):
                client.export_collection("c")
            with pytest.raises(InvalidInput, match="the server has no ImportCollection"):
                client.import_collection("c", *engine.export_collection("c"))
    finally:
        bare.stop(0)


def test_get_documents_over_grpc_and_its_response_limit(engine):
    """GetDocuments gives what Engine.get_documents gives; documents whose texts would not
    fit one response are refused with what to do (the limit is lowered here to a few KB:
    this is about the check alone)."""
    fill(engine)
    ids = ["long", "üñí"]
    want, _ = engine.get_documents("c", ids)
    srv, port = create_server(engine.config, "127.0.0.1:0", engine=engine)
    try:
        with RagClient(f"127.0.0.1:{port}") as client:
            r = client.get_documents("c", [*ids, "nope"])
            assert list(r.missing_ids) == ["nope"]
            assert [(d.document.id, d.text, d.text_exact, [(c.start, c.end, c.tokens) for c in d.chunks])
                    for d in r.documents] == [(d.document.doc_id, d.text, d.exact, d.chunks) for d in want]
            assert json.loads(r.documents[0].document.metadata_json) == {"year": 2024, "tags": ["a", "b"],
                                                                         "score": 0.5, "ok": True, "none": None}
            small = copy.copy(engine.config)  # past Config's own check, which keeps limits far above this
            object.__setattr__(small, "max_message_bytes", 4000)
            srv.servicer.config = small
            with pytest.raises(grpc.RpcError) as e:
                client.get_documents("c", ids)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "over the server's 4000-byte message limit; ask for fewer at a time" in e.value.details()
            assert client.get_documents("c", ["üñí"]).documents[0].text.startswith("Unicode ids")
    finally:
        srv.stop(0)


def test_backup_files_here_and_through_a_server(served, engine, tmp_path, capsys):
    """`rag export` writes one file (gzip-compressed for .gz), `rag import` makes a
    collection of it equal to the source, here or through a server, either way round;
    a file is never written over, and a damaged or cut-short one makes nothing."""
    srv_engine, address = served
    fill(srv_engine)
    here = ["--data-dir", engine.config.data_dir]
    there = ["--server", address]
    files = tmp_path / "files"
    files.mkdir()
    plain, packed = files / "c.rag", files / "c.rag.gz"
    code, out, err = rag(capsys, "export", "c", plain, "-q", *there)
    assert code == 0 and out.startswith(f"exported c to {plain} (10 documents, "), err
    code, out, err = rag(capsys, *here, "import", plain, "local", "-q")
    assert code == 0 and out.startswith(f"imported {plain} as local (10 documents, "), err
    assert state(engine, "local") == state(srv_engine, "c")
    assert settings_of(engine, "local") == settings_of(srv_engine, "c")
    code, _, err = rag(capsys, *here, "export", "local", packed, "-q")
    assert code == 0, err
    assert packed.read_bytes()[:2] == b"\x1f\x8b" and packed.stat().st_size < plain.stat().st_size
    code, _, err = rag(capsys, "import", packed, "back", "-q", *there)
    assert code == 0, err
    assert state(srv_engine, "back") == state(srv_engine, "c") and hits(srv_engine, "back") == hits(srv_engine, "c")

    code, _, err = rag(capsys, "export", "c", plain, *there)
    assert code == 2 and f"{plain} already exists; remove it or choose another name" in err
    code, _, err = rag(capsys, "export", "nope", files / "nope.rag", *there)
    assert code == 2 and "NOT_FOUND" in err and sorted(p.name for p in files.iterdir()) == ["c.rag", "c.rag.gz"]
    data = plain.read_bytes()
    damaged = {
        "cut.rag": (data[:len(data) // 2], r"cut short or damaged at byte \d+: a message of \d+ bytes ends early"),
        "other.rag": (b"PK\x03\x04" + data[4:], "is not a backup file `rag export` wrote"),
        "huge.rag": (data[:11] + b"\xff\xff\xff\xff\x7f" + data[11:],
                     "a message of 34359738367 bytes is past any size"),
        "empty.rag": (data[:11], "holds no export"),
        "cut.rag.gz": (packed.read_bytes()[:200], "damaged at byte|cut short"),
    }
    for name, (content, message) in damaged.items():
        (files / name).write_bytes(content)
        for where in (here, there):
            code, _, err = rag(capsys, *(where if where is here else []), "import", files / name, "x",
                               *(where if where is there else []))
            assert code == 2 and re.search(message, err), (name, err)
    nothing_left(engine, ["local"])
    nothing_left(srv_engine, ["back", "c"])


def test_a_backup_file_without_its_count_makes_nothing(served, engine, tmp_path):
    """A file whose last message (the document count) is missing, as a write cut short
    leaves it, is refused by an import here and through a server."""
    from server import backup

    srv_engine, address = served
    fill(engine)
    msgs = list(export_messages(*engine.export_collection("c")))
    cut = tmp_path / "cut.rag"
    backup.write(cut, msgs[:-1])
    with pytest.raises(InvalidInput, match="ended without its last message"):
        engine.import_collection("x", *backup.read(cut))
    with RagClient(address) as client, pytest.raises(grpc.RpcError) as e:  # the server finds it out
        client.import_messages("x", backup.messages(cut))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ended without its last message" in e.value.details()
    nothing_left(engine, ["c"])
    nothing_left(srv_engine, [])
