"""`rag COMMAND --server`: every CLI command through a running server prints what the same
command prints run here, and stores the same documents (server/remote.py). The server runs
in this process on the real default models; the local runs use their own data folder."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from engine.cli import main
from engine.errors import InvalidInput
from engine.generate import SamplingParams
from engine.pipeline import Engine
from server.app import create_server
from server.client import RagClient
from server.stubs import pb

CORPUS = Path(__file__).resolve().parent.parent / "examples" / "corpus"
RECORDS = [
    {"id": "zebra", "text": "Zebras sleep standing up in the savanna, in short naps through the night.",
     "year": 2020, "lang": "en", "tags": ["mammal", "africa"], "rating": 4.5, "seen": True},
    {"id": "penguin", "text": "Emperor penguins huddle together to keep warm through the Antarctic winter.",
     "year": 2023, "lang": "fr", "note": None},
    {"id": "owl", "text": "Owls hunt at night and can turn their heads about 270 degrees.", "year": "2021",
     "lang": "en"},
]


@pytest.fixture(scope="module")
def served(tmp_path_factory, config, embedder, generator):
    """A server (in process) on its own data folder, and a JSONL file of typed metadata."""
    engine = Engine(config.replace(data_dir=tmp_path_factory.mktemp("served")), embedder=embedder,
                    generator=generator)
    srv, port = create_server(engine.config, "127.0.0.1:0", engine=engine)
    files = tmp_path_factory.mktemp("files")
    jsonl = files / "animals.jsonl"
    jsonl.write_text("\n".join([*(json.dumps(r) for r in RECORDS), "not json"]) + "\n")
    yield engine, f"127.0.0.1:{port}", jsonl
    srv.stop(0)


def rag(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def without(d: dict, *keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def test_ingest_documents_search_delete_equal_a_local_run(served, tmp_path, capsys):
    engine, address, jsonl = served
    local = ["--data-dir", tmp_path / "local"]
    there = ["--server", address]
    outs = {}
    for where, pre, post in (("local", local, []), ("server", [], there)):
        code, out, err = rag(capsys, *pre, "ingest", CORPUS, jsonl, "-c", "zoo", "-q", *post)
        assert code == 0, err
        assert "created collection zoo" in err and "animals.jsonl:4: not valid JSON" in err
        outs[where] = out.split(" in ")[0]  # the line but its time
        # the same files again: nothing to do
        code, out, _ = rag(capsys, *pre, "ingest", CORPUS, jsonl, "-c", "zoo", "-q", *post)
        assert code == 0 and "0 added, 0 updated, 11 unchanged, 1 skipped; 0 chunks added" in out
    assert outs["server"] == outs["local"] and outs["local"].startswith("zoo: 11 added, 0 updated, 0 unchanged, "
                                                                         "1 skipped;")

    def documents(pre, post, *extra):
        code, out, err = rag(capsys, *pre, "documents", "-c", "zoo", "--json", "--all", "--limit", 4, *extra, *post)
        assert code == 0, err
        return [without(json.loads(line), "ingested_at") for line in out.splitlines()]

    # the same documents, metadata with its JSON types (numbers, lists, booleans, null):
    # the same content hashes
    mine, theirs = documents(local, []), documents([], there)
    assert len(mine) == 11 and theirs == mine
    zebra = next(d for d in theirs if d["doc_id"].endswith("#zebra"))
    assert zebra["metadata"] == {"id": "zebra", **without(RECORDS[0], "id", "text")}
    either = ["--filter-json", '{"$or": [{"lang": "fr"}, {"year": {"$lt": 2021}}]}']
    for extra in (["--filter", "year>=2021"], ["--filter", "lang!=en"], ["--filter", "lang=fr", "--filter", "lang=en"],
                  either, [*either, "--filter", "seen=true"], ["--filter", "tags~=africa"],
                  ["--filter", "tags~=bird", "--filter", "tags~=mammal"],
                  ["--filter-json", '{"tags": {"$contains": ["mammal", "bird"]}}'],
                  ["--filter-json", '{"$not": {"lang": "fr"}}', "--filter", "year>=2021"]):
        assert documents([], there, *extra) == documents(local, [], *extra), extra
    assert [d["doc_id"][-3:] for d in documents([], there, "--filter", "tags~=africa")] == ["bra"]
    assert [d["doc_id"][-3:] for d in documents([], there, "--filter", "tags~=bird", "--filter", "tags~=mammal")] \
        == ["bra"]
    assert documents([], there, "--filter-json", '{"tags": {"$contains": ["mammal", "bird"]}}') == []
    assert [d["doc_id"][-3:] for d in documents([], there, "--filter-json", '{"$not": {"lang": "fr"}}',
                                                 "--filter", "year>=2021")] == ["owl"]
    assert [d["doc_id"][-3:] for d in documents([], there, "--filter", "year>=2021")] == ["owl", "uin"]
    assert [d["doc_id"][-3:] for d in documents([], there, *either)] == ["uin", "bra"]
    assert [d["doc_id"][-3:] for d in documents([], there, *either, "--filter", "seen=true")] == ["bra"]

    # a page, and where the next one starts (with --server in the hint)
    code, out, _ = rag(capsys, "documents", "-c", "zoo", "--limit", 2, *there)
    assert code == 0 and len(out.splitlines()) == 3 and f"--server {address} --after" in out

    code, mine, _ = rag(capsys, *local, "collections", "--json")
    code2, theirs, _ = rag(capsys, "collections", "--json", *there)
    keep = ("name", "documents", "chunks", "dim", "embed_model", "index_dtype", "connectivity", "chunk_tokens")
    assert code == code2 == 0
    assert [{k: c[k] for k in keep} for c in map(json.loads, theirs.splitlines())] == \
           [{k: c[k] for k in keep} for c in map(json.loads, mine.splitlines())]

    for args in (["how do zebras sleep", "-k", 3], ["night", "-k", 4, "--filter", "year<2022", "--mode", "dense"],
                 ["how do zebras sleep", "-k", 6, "--min-cosine", 0.2]):
        _, mine, _ = rag(capsys, *local, "search", *args, "-c", "zoo", "--json")
        _, theirs, _ = rag(capsys, "search", *args, "-c", "zoo", "--json", *there)
        mine = [without(json.loads(h), "key", "score", "cosine") for h in mine.splitlines()]
        theirs = [without(json.loads(h), "score", "cosine") for h in theirs.splitlines()]
        assert theirs == mine and theirs, args  # metadata with its JSON types (Hit.metadata_json)

    # documents by id with their text, here and there; an id not held named on stderr
    ids = [d["doc_id"] for d in mine[:3]]
    outs = []
    for pre, post in ((local, []), ([], there)):
        code, out, err = rag(capsys, *pre, "get", "-c", "zoo", *ids, "nope", "--json", *post)
        assert code == 1 and err.strip() == "error: collection 'zoo' holds no document 'nope'"
        outs.append([without(json.loads(line), "ingested_at") for line in out.splitlines()])
        code, out, _ = rag(capsys, *pre, "get", "-c", "zoo", ids[0], *post)
        assert code == 0 and out.startswith(f"== {ids[0]}\t")
    assert outs[1] == outs[0] and [d["doc_id"] for d in outs[0]] == ids and all(d["text_exact"] for d in outs[0])

    code, out, _ = rag(capsys, "delete", "-c", "zoo", "--filter", "lang=fr", *there)
    assert code == 0 and out.strip() == "deleted 1 documents matching the filter"
    code, out, _ = rag(capsys, "delete", "-c", "zoo", str(jsonl.resolve()) + "#owl", "missing", *there)
    assert code == 0 and out.strip() == "deleted 1 of 2 documents"
    assert len(documents([], there)) == 9


def test_id_field_here_and_through_the_server(served, tmp_path, capsys):
    _, address, jsonl = served
    local = ["--data-dir", tmp_path / "local"]
    for pre, post in ((local, []), ([], ["--server", address])):
        code, out, err = rag(capsys, *pre, "ingest", jsonl, "-c", "named", "--id-field", "lang", "-q", *post)
        assert code == 0 and out.startswith("named: 2 added"), err  # en twice: the later line wins
        code, out, _ = rag(capsys, *pre, "documents", "-c", "named", "--json", *post)
        assert [json.loads(line)["doc_id"].rsplit("#", 1)[1] for line in out.splitlines()] == ["en", "fr"]
        code, _, err = rag(capsys, *pre, "ingest", jsonl, "-c", "named", "--id-field", "text", *post)
        assert code == 2 and "text and id fields are both 'text'" in err


def test_ingest_from_stdin_through_the_server(served, tmp_path, capsys, monkeypatch):
    import io
    import sys
    _, address, jsonl = served
    local = ["--data-dir", tmp_path / "local"]
    outs = []
    for pre, post in ((local, []), ([], ["--server", address])):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(jsonl.read_bytes()))))
        code, out, err = rag(capsys, *pre, "ingest", "-", "-c", "piped", "--stdin-type", "jsonl", "-q", *post)
        assert code == 0 and "stdin:4: not valid JSON" in err
        code, docs, _ = rag(capsys, *pre, "documents", "-c", "piped", "--json", *post)
        outs.append((out.split(" in ")[0], [without(json.loads(line), "ingested_at") for line in docs.splitlines()]))
    assert outs[0] == outs[1] and outs[0][0].startswith("piped: 3 added")
    assert [d["doc_id"] for d in outs[0][1]] == ["stdin#owl", "stdin#penguin", "stdin#zebra"]


def test_batch_files_with_filters_per_line_equal_a_local_run(served, tmp_path, capsys):
    engine, address, jsonl = served
    local = ["--data-dir", tmp_path / "local"]
    assert rag(capsys, *local, "ingest", CORPUS, jsonl, "-c", "zoo2", "-q")[0] == 0
    assert rag(capsys, "ingest", CORPUS, jsonl, "-c", "zoo2", "-q", "--server", address)[0] == 0
    queries = tmp_path / "queries.jsonl"
    queries.write_text("\n".join(json.dumps(q) for q in [
        {"id": "a", "query": "which animal sleeps at night", "filter": {"lang": "fr"}},
        {"id": "b", "query": "which animal sleeps at night"},
        "green tea",
        {"id": "d", "query": "cold winter", "filter": {"year": {"$gte": 2021}}},
    ]) + "\n")

    def hits(out):
        rows = [json.loads(line) for line in out.splitlines()]
        return [(r["id"], r["query"], [(h["doc_id"], h["rank"], h["text"]) for h in r["hits"]]) for r in rows]

    code, mine, _ = rag(capsys, *local, "search", "--batch", queries, "-c", "zoo2", "-k", 3)
    code2, theirs, _ = rag(capsys, "search", "--batch", queries, "-c", "zoo2", "-k", 3, "--server", address)
    assert code == code2 == 0
    assert hits(theirs) == hits(mine)
    got = dict((i, h) for i, _, h in hits(theirs))
    assert [d for d, _, _ in got["a"]] == [str(jsonl.resolve()) + "#penguin"]  # the one French document
    animals = str(jsonl.resolve())
    assert {d for d, _, _ in got["d"]} == {animals + "#penguin", animals + "#owl"}  # 2023 and "2021"

    # answers: the same as the server's engine gives for the same questions and filters
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"id": 1, "question": "How do zebras sleep?", "filter": {"lang": "en"}},
        {"id": 2, "question": "How do zebras sleep?", "filter": {"lang": "fr"}},
    ]) + "\n")
    out_file = tmp_path / "answers.jsonl"
    code, _, err = rag(capsys, "ask", "--batch", questions, "-c", "zoo2", "-k", 2, "--max-new-tokens", 24,
                       "--out", out_file, "-q", "--server", address)
    assert code == 0, err
    got = [json.loads(line) for line in out_file.read_text().splitlines()]
    want = engine.answer_batch("zoo2", ["How do zebras sleep?"] * 2, k=2, params=SamplingParams(max_new_tokens=24),
                               filters=[{"lang": "en"}, {"lang": "fr"}])
    assert [g["id"] for g in got] == [1, 2]
    for g, w in zip(got, want):
        w = w.to_json()
        assert without(g, "id", "timings_ns", "usage") == without(w, "timings_ns", "usage")
        assert g["usage"]["completion_tokens"] == w["usage"]["completion_tokens"]
    assert all(s["doc_id"].endswith("#penguin") for s in got[1]["sources"])


def test_ask_over_the_server_prints_the_local_footer(served, capsys):
    engine, address, jsonl = served
    assert rag(capsys, "ingest", CORPUS, "-c", "tea", "-q", "--server", address)[0] == 0
    q = "At what temperature should green tea be brewed?"
    code, out, err = rag(capsys, "ask", q, "-c", "tea", "--max-new-tokens", 32, "--json", "--server", address)
    assert code == 0, err
    got = json.loads(out)
    want = engine.answer_batch("tea", [q], params=SamplingParams(max_new_tokens=32))[0].to_json()
    assert without(got, "timings_ns", "usage") == without(want, "timings_ns", "usage")
    code, out, err = rag(capsys, "ask", q, "-c", "tea", "--max-new-tokens", 32, "--server", address)
    assert code == 0 and out.startswith(want["answer"]) and "Sources:" in out
    assert ("Support:" in out) == bool(want["support"]) and "prompt tokens" in err and "decode" in err
    # a floor above every passage: no context, as the engine answers (tests/test_pipeline.py)
    code, out, err = rag(capsys, "ask", q, "-c", "tea", "--min-cosine", 1.0, "--json", "--server", address)
    assert code == 0 and json.loads(out)["finish_reason"] == "no_context" and not json.loads(out)["sources"], err


def test_collections_create_drop_info_over_the_server(served, capsys):
    _, address, _ = served
    there = ["--server", address]
    code, out, _ = rag(capsys, "create", "made", "--dtype", "f16", "--connectivity", 8, *there)
    assert code == 0 and out.strip() == "created made (f16, M=8)"
    code, out, _ = rag(capsys, "create", "made2", *there)
    assert code == 0 and out.strip() == "created made2 (i8, M=16)"  # the server's default dtype
    code, out, _ = rag(capsys, "collections", *there)
    assert code == 0 and any(line.startswith("made\t0 docs\t0 chunks\tf16") for line in out.splitlines())
    code, _, err = rag(capsys, "create", "made", *there)
    assert code == 2 and err.startswith("error: ALREADY_EXISTS: ")
    assert rag(capsys, "ingest", CORPUS, "-c", "made", "-q", *there)[0] == 0
    code, out, _ = rag(capsys, "copy", "made", "made3", *there)
    assert code == 0 and out.startswith("copied made to made3 (8 documents, ")
    code, out, _ = rag(capsys, "collections", "--json", *there)
    made = {c["name"]: c for c in map(json.loads, out.splitlines()) if c["name"] in ("made", "made3")}
    assert {k: v for k, v in made["made3"].items() if k not in ("name", "disk_bytes", "index_memory_bytes")} == \
           {k: v for k, v in made["made"].items() if k not in ("name", "disk_bytes", "index_memory_bytes")}
    code, _, err = rag(capsys, "copy", "made", "made3", *there)
    assert code == 2 and err.startswith("error: ALREADY_EXISTS: collection 'made3' already exists")
    code, _, err = rag(capsys, "copy", "made", "x", "--to", "/tmp/elsewhere", "--from", "/tmp/elsewhere", *there)
    assert code == 2 and "give --to (copy the server's collection here) or --from" in err
    for name in ("made", "made2", "made3"):
        assert rag(capsys, "drop", name, *there)[:2] == (0, f"dropped {name}\n")
    code, out, _ = rag(capsys, "info", "--json", *there)
    info = json.loads(out)
    assert code == 0 and info["embedding_model"] == "all-MiniLM-L6-v2" and info["max_batch"] > 0
    assert set(info["features"]) == {"filter_groups", "query_filters", "metadata_json", "min_cosine", "list_contains",
                                     "filter_not"}
    code, out, _ = rag(capsys, "info", *there)
    assert code == 0 and "embedding_model: all-MiniLM-L6-v2" in out


def test_errors_over_the_server_are_one_line(served, tmp_path, capsys):
    _, address, jsonl = served
    code, _, err = rag(capsys, "documents", "-c", "nope", "--server", address)
    assert code == 2 and err.startswith("error: NOT_FOUND: collection 'nope' does not exist")
    code, _, err = rag(capsys, "search", "tea", "-c", "nope", "--server", "127.0.0.1:1")
    assert code == 2 and err.startswith("error: UNAVAILABLE: ")
    code, _, err = rag(capsys, "ingest", jsonl, "-c", "x", "--server", address, "--ray")
    assert code == 2 and "--ray runs the work here" in err
    code, _, err = rag(capsys, "search", "tea", "-c", "x", "--server", address, "--tls-client-cert", jsonl)
    assert code == 2 and "go together, with --tls-ca" in err
    code, _, err = rag(capsys, "search", "tea", "-c", "x", "--server", address, "--tls-ca", tmp_path / "none.pem")
    assert code == 2 and "cannot read" in err and "none.pem" in err
    code, _, err = rag(capsys, "delete", "-c", "x", "--server", address)
    assert code == 2 and "give the ids of the documents to delete" in err
    for bad, says in (("{lang: 1}", "--filter-json is not valid JSON"), ('{"$or": []}', "--filter-json: filter $or "
                                                                                      "takes a non-empty list"),
                      ('["lang"]', "--filter-json: filter must be a mapping")):
        code, _, err = rag(capsys, "search", "tea", "-c", "x", "--filter-json", bad, "--server", address)
        assert code == 2 and says in err, err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "tea", "filter": {"kind": {"$bogus": 1}}}\n')
    code, _, err = rag(capsys, "search", "--batch", bad, "-c", "x", "--server", address)
    assert code == 2 and f"{bad}:1:" in err and "$bogus" in err
    # a file with nothing readable: exit 1, as a local ingest
    empty = tmp_path / "empty.jsonl"
    empty.write_text("not json\n")
    code, out, err = rag(capsys, "ingest", empty, "-c", "x", "-q", "--server", address)
    assert code == 1 and "0 added" in out and "not valid JSON" in err


def test_client_refuses_filters_an_older_server_would_drop(served):
    """A server without a feature in GetInfo.features (one older than the field) would drop
    the field: filter groups and per-query filters are refused before they are sent, and
    typed metadata goes as the string map it reads."""
    engine, address, _ = served
    with RagClient(address, timeout=120) as client:
        assert client.features() == {"filter_groups", "query_filters", "metadata_json", "min_cosine", "list_contains",
                                     "filter_not"}
        client._features = client.features() - {"filter_not"}  # a server from before $not
        for call in (lambda: client.search("zoo", "tea", 2, filter={"$not": {"lang": "fr"}}),
                     lambda: client.delete("zoo", filter={"$or": [{"$not": {"lang": "fr"}}, {"lang": "en"}]}),
                     lambda: client.list_documents("zoo", filter={"lang": "en", "$not": [{"year": 2020}]})):
            with pytest.raises(InvalidInput, match="does not read \\$not filters"):
                call()
        client._features = client.features() - {"list_contains"}  # a server from before list filters
        for call in (lambda: client.search("zoo", "tea", 2, filter={"tags": {"$contains": "mammal"}}),
                     lambda: client.delete("zoo", filter={"tags": {"$contains_any": ["mammal"]}}),
                     lambda: client.search_batch("zoo", ["tea"], 2, filters=[{"$or": [{"tags": {"$contains": "x"}}]}])):
            with pytest.raises(InvalidInput, match=r"does not read \$contains / \$contains_any filters"):
                call()
        client._features = frozenset()  # what a server older than these fields answers
        with pytest.raises(InvalidInput, match="does not read min_cosine"):
            client.search("zoo", "tea", 2, min_cosine=0.2)
        with pytest.raises(InvalidInput, match="does not read \\$or / \\$and filters"):
            client.search("zoo", "tea", 2, filter={"$or": [{"lang": "fr"}, {"lang": "en"}]})
        with pytest.raises(InvalidInput, match="does not read per-query filters"):
            client.search_batch("zoo", ["tea"], 2, filters=[{"lang": "fr"}])
        client.create_collection("typed-old")
        client.ingest("typed-old", [{"id": "a", "text": "Kettles boil water.", "metadata": {"n": 3}}])
        (doc,) = client.list_documents("typed-old").documents
        assert json.loads(doc.metadata_json) == {"n": "3"}  # sent as the string map, as before
        client.drop_collection("typed-old")


def test_client_sends_typed_metadata_and_per_query_filters(served):
    engine, address, _ = served
    with RagClient(address, timeout=120) as client:
        client.create_collection("typed")
        r = client.ingest("typed", [{"id": "a", "text": "Kettles boil water for tea.", "metadata": {"n": 3, "on": True}},
                                    {"id": "b", "text": "Ovens bake bread at high heat.", "metadata": {"n": "7"}}])
        assert [x.status for x in r.results] == [pb.DOCUMENT_STATUS_ADDED] * 2
        docs = {d.id: d for d in client.list_documents("typed").documents}
        assert json.loads(docs["a"].metadata_json) == {"n": 3, "on": True}
        assert dict(docs["a"].metadata) == {"n": "3", "on": "true"}  # the string map: JSON for other values
        assert json.loads(docs["b"].metadata_json) == {"n": "7"}
        found = client.search_batch("typed", ["tea", "tea", "tea"], k=2,
                                    filters=[{"n": {"$gt": 5}}, None, {"on": True}])
        assert [[h.doc_id for h in hits] for hits in found] == [["b"], ["a", "b"], ["a"]]
        assert found[1] == client.search_batch("typed", ["tea"], k=2)[0]
        with pytest.raises(grpc.RpcError) as e:
            client.search_batch("typed", ["tea"], k=2, filter={"n": 3}, filters=[{"n": 4}])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
