"""engine/pipeline.py end to end on the real model: collections, upsert, delete, search, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.errors import AlreadyExists, InvalidInput, NotFound
from engine.filters import both
from engine.documents import Document
from engine.pipeline import Engine

CORPUS = Path(__file__).resolve().parent.parent / "examples" / "corpus"


@pytest.fixture()
def corpus(tmp_path):
    dst = tmp_path / "corpus"
    shutil.copytree(CORPUS, dst)
    return dst


def snapshot(engine, name):
    """Everything a failed call must leave untouched."""
    col = engine.collections.get(name)
    keys = col.store.keys()
    rows = col.store.chunks(keys)
    return (col.store.counts(), col.store.generation, keys.tolist(),
            [(rows[k].doc_id, rows[k].text) for k in keys.tolist()], len(col.index))


def test_collections_lifecycle(engine):
    assert engine.list_collections() == []
    info = engine.create_collection("docs", index_dtype="i8", connectivity=8)
    assert (info.name, info.documents, info.chunks, info.dim, info.index_dtype, info.connectivity) == \
        ("docs", 0, 0, 384, "i8", 8)
    assert info.embed_model == "all-MiniLM-L6-v2"
    engine.create_collection("other")
    assert [c.name for c in engine.list_collections()] == ["docs", "other"]
    with pytest.raises(AlreadyExists):
        engine.create_collection("docs")
    engine.drop_collection("docs")
    assert [c.name for c in engine.list_collections()] == ["other"]
    with pytest.raises(NotFound, match="docs"):
        engine.search("docs", "anything", 3)
    with pytest.raises(NotFound):
        engine.drop_collection("docs")


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "bad name!"}, "collection name"),
    ({"name": ""}, "collection name"),
    ({"name": "../escape"}, "collection name"),
    ({"name": "ok", "index_dtype": "f64"}, "f64"),
    ({"name": "ok", "connectivity": 0}, "connectivity"),
    ({"name": "ok", "chunk_overlap": 300}, "chunk_overlap"),
])
def test_create_rejects_bad_settings(engine, kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        engine.create_collection(**kwargs)
    assert engine.list_collections() == []


def test_ingest_and_search_sample_corpus(engine, corpus):
    engine.create_collection("c")
    report = engine.ingest_paths("c", [corpus])
    assert report.documents_added == 8 and not report.failures  # 4 files + 4 JSONL records
    hits = engine.search("c", "What water temperature should I use for green tea?", k=3)
    assert hits[0].source.endswith("tea.txt")
    assert [h.rank for h in hits] == [1, 2, 3]
    assert "70 and 80 degrees" in hits[0].text
    dense = engine.search("c", "What water temperature should I use for green tea?", k=3, mode="dense")
    assert dense[0].score >= dense[1].score >= dense[2].score  # dense order is cosine order
    # spans point into the original document
    text = (corpus / "tea.txt").read_text()
    assert text[hits[0].start:hits[0].end] == hits[0].text
    (top,) = engine.search("c", "Which planet is the biggest?", k=1)
    assert top.doc_id.endswith("planets.jsonl#jupiter")
    assert top.metadata == {"id": "jupiter", "kind": "planet"}
    (html,) = engine.search("c", "Who invented the lens used in lighthouses?", k=1)
    assert "Fresnel" in html.text and "console.log" not in html.text
    assert html.metadata["title"] == "The lighthouse keeper"


def test_exact_mode_scores_every_stored_vector(engine, corpus, monkeypatch):
    """Mode "exact" ranks every live stored row by its cosine to the query, as a brute-force
    product over the store's vectors does, in blocks or in one; deleted chunks never come back."""
    from engine import search as search_mod

    engine.create_collection("c")
    engine.ingest_paths("c", [corpus])
    col = engine.searcher.open("c")
    live, rows = col.store.keys(), col.store.vectors()
    queries = ["What water temperature should I use for green tea?", "Which planet is the biggest?", "HNSW"]
    q = engine.embedder.embed(queries)
    for text, vec in zip(queries, q):
        sims = rows[live] @ vec
        want = live[np.argsort(-sims, kind="stable")][:4]
        hits = engine.search("c", text, k=4, mode="exact")
        assert [h.key for h in hits] == want.tolist()
        np.testing.assert_allclose([h.score for h in hits], np.sort(sims)[::-1][:4], rtol=1e-5)
        assert all(h.score == h.cosine for h in hits)
        dense = engine.search("c", text, k=4, mode="dense")
        assert hits[0].cosine >= dense[0].cosine - 1e-6  # nothing an index can find scores higher
    everything = engine.search("c", "tea", k=1000, mode="exact")
    assert sorted(h.key for h in everything) == live.tolist()  # k past the rows: all of them, once
    monkeypatch.setattr(search_mod, "EXACT_BLOCK_ROWS", 3)  # many blocks, merged: the same ranking
    assert [h.key for h in engine.search("c", "tea", k=1000, mode="exact")] == [h.key for h in everything]
    top = engine.search("c", queries[0], k=1, mode="exact")[0]
    gone = len(col.store.document_keys(top.doc_id))
    assert engine.delete_documents("c", [top.doc_id]) == 1
    after = engine.search("c", queries[0], k=1000, mode="exact")
    assert top.doc_id not in {h.doc_id for h in after} and len(after) == len(live) - gone


def test_upsert_skips_unchanged_and_replaces_changed(engine, corpus):
    engine.create_collection("c")
    engine.ingest_paths("c", [corpus])
    before = engine.describe("c")
    again = engine.ingest_paths("c", [corpus])
    assert (again.documents_unchanged, again.documents_added, again.chunks_added) == (8, 0, 0)
    assert engine.describe("c").chunks == before.chunks
    (corpus / "tea.txt").write_text("Rooibos is a red bush from South Africa, brewed with boiling water.")
    changed = engine.ingest_paths("c", [corpus])
    assert (changed.documents_updated, changed.documents_unchanged) == (1, 7)
    assert changed.chunks_added == 1 and changed.chunks_removed >= 1
    (top,) = engine.search("c", "green tea temperature", k=1)
    assert "70 and 80" not in top.text
    hits = engine.search("c", "red bush tea from South Africa", k=1)
    assert hits[0].text.startswith("Rooibos")


def test_delete_documents(engine, corpus):
    engine.create_collection("c")
    engine.ingest_paths("c", [corpus])
    tea = str((corpus / "tea.txt").resolve())
    n_before = engine.describe("c").documents
    assert engine.delete_documents("c", [tea, "no-such-doc"]) == 1
    assert engine.describe("c").documents == n_before - 1
    hits = engine.search("c", "green tea temperature", k=10)
    assert all(h.doc_id != tea for h in hits)
    assert engine.delete_documents("c", [tea]) == 0


def test_quantized_index_keeps_f32_ranking(engine, corpus):
    engine.create_collection("f32", index_dtype="f32")
    engine.create_collection("i8", index_dtype="i8")
    engine.ingest_paths("f32", [corpus])
    engine.ingest_paths("i8", [corpus])
    questions = ["How long does black tea steep?", "What does ef control in HNSW?",
                 "How often do I feed a sourdough starter?", "hottest planet"]
    for a, b in zip(engine.search_batch("f32", questions, 5), engine.search_batch("i8", questions, 5)):
        assert [h.key for h in a] == [h.key for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)


def test_batch_equals_single(tmp_path, config, embedder_fp32, corpus):
    """With the fp32 model a query's results do not depend on what it is batched with.

    (The int8 model quantizes activations with one scale per batch, so there scores can
    move by ~0.02 between batch compositions: see the README's note on int8.)
    """
    engine = Engine(config.replace(data_dir=tmp_path / "data", embed_variant="fp32"), embedder=embedder_fp32)
    engine.create_collection("c")
    engine.ingest_paths("c", [corpus])
    qs = ["lighthouse automation", "gluten", "Mars volcano"]
    batch = engine.search_batch("c", qs, 4)
    for q, hits in zip(qs, batch):
        single = engine.search("c", q, 4)
        assert [h.key for h in single] == [h.key for h in hits]
        np.testing.assert_allclose([h.score for h in single], [h.score for h in hits], atol=1e-4)
    engine.close()


def test_reopen_and_recover_unsaved_index(tmp_path, config, embedder, corpus):
    data = tmp_path / "data"
    e1 = Engine(config.replace(data_dir=data), embedder=embedder)
    e1.create_collection("c", index_dtype="f16")
    e1.ingest_paths("c", [corpus])
    expected = [h.key for h in e1.search("c", "steeping oolong", 5)]
    e1.close()
    e2 = Engine(config.replace(data_dir=data), embedder=embedder)
    assert [h.key for h in e2.search("c", "steeping oolong", 5)] == expected
    # Ingest more and "crash" (never save the index): the next open catches up from the store.
    extra = corpus.parent / "extra.txt"
    extra.write_text("Oolong tea leaves are rolled and partly oxidised before drying.")
    e2.ingest_paths("c", [extra])
    expected = [h.key for h in e2.search("c", "steeping oolong", 5)]
    for col in e2.collections.opened():
        col.store.close()
        col.lock.release()  # the process "died": the OS drops its lock
    e3 = Engine(config.replace(data_dir=data), embedder=embedder)
    assert e3.describe("c").documents == 9
    assert [h.key for h in e3.search("c", "steeping oolong", 5)] == expected
    e3.close()


@pytest.mark.parametrize("query, k, error, match", [
    ("", 3, InvalidInput, "empty"),
    ("   \n", 3, InvalidInput, "empty"),
    ("x" * 70_000, 3, InvalidInput, "limit"),
    ("fine", 0, InvalidInput, "k must be"),
    ("fine", -2, InvalidInput, "k must be"),
    ("fine", 1001, InvalidInput, "k must be"),
    ("fine", True, InvalidInput, "k must be"),
    ("fine", 2.5, InvalidInput, "k must be"),
    (None, 3, InvalidInput, "string"),
])
def test_bad_queries_leave_store_unchanged(engine, corpus, query, k, error, match):
    engine.create_collection("c")
    engine.ingest_paths("c", [corpus])
    before = snapshot(engine, "c")
    with pytest.raises(error, match=match):
        engine.search("c", query, k)
    assert snapshot(engine, "c") == before
    assert engine.search("c", "tea", 1)  # and it keeps working


def test_bad_documents_are_reported_and_nothing_is_lost(engine, corpus):
    engine.create_collection("c")
    engine.ingest_paths("c", [corpus])
    before = snapshot(engine, "c")
    report = engine.ingest("c", [Document("e", "", "e"), Document("w", " \n\t", "w"),
                                 Document("z", "nul\x00byte", "z"), Document("", "text", "noid")])
    assert len(report.failures) == 4 and report.documents_added == 0
    assert snapshot(engine, "c") == before
    with pytest.raises(InvalidInput):
        engine.search_batch("c", [], 3)
    with pytest.raises(InvalidInput, match="query 1"):
        engine.search_batch("c", ["ok", ""], 3)
    assert snapshot(engine, "c") == before


def test_empty_collection_search(engine):
    engine.create_collection("empty")
    assert engine.search("empty", "anything", 5) == []


def test_deleted_vectors_are_compacted_away(engine):
    engine.create_collection("c")
    engine.ingest("c", [Document(f"d{i}", f"document number {i} about topic {i % 7}", f"d{i}") for i in range(40)])
    col = engine.collections.get("c")
    engine.delete_documents("c", [f"d{i}" for i in range(10)])
    assert col.index.removed == 10  # 25%: below the threshold, kept
    engine.delete_documents("c", [f"d{i}" for i in range(10, 16)])
    assert col.index.removed == 0, "past 30% removed the index is rebuilt from live vectors"
    assert len(col.index) == 24
    assert sorted(col.index.keys().tolist()) == col.store.keys().tolist()
    hits = engine.search("c", "document number 20 about topic 6", 1)
    assert hits[0].doc_id == "d20"


def test_hybrid_search_finds_exact_terms_and_reports_both_scores(engine):
    engine.create_collection("h")
    docs = [Document(f"d{i}", text, f"d{i}.txt") for i, text in enumerate([
        "Error code QX-7731 means the pump's pressure sensor is disconnected; reseat the cable.",
        "Error codes are listed in the service manual; most clear after a restart of the unit.",
        "The pump pressure is shown on the front panel in kilopascals.",
        "Disconnected sensors show a blinking red light until they are reseated.",
        "Restarting the unit clears transient faults such as a brief power dip.",
    ] + [f"Filler paragraph {i} about gardens, tea and long walks by the river." for i in range(20)])]
    engine.ingest("h", docs)
    query = "what does QX-7731 mean"
    hybrid = engine.search("h", query, 5)
    dense = engine.search("h", query, 5, mode="dense")
    assert hybrid[0].doc_id == "d0", "the exact code's chunk comes first with BM25 fused in"
    assert [h.rank for h in hybrid] == [1, 2, 3, 4, 5]
    # Every hit carries its cosine similarity (what the answer relevance gate thresholds
    # on) and the score it was ranked by: fused in hybrid mode, the cosine in dense mode.
    q = engine.embedder.embed([query])[0]
    col = engine.collections.get("h")
    vecs = col.store.vectors()
    for h in hybrid + dense:
        assert h.cosine == pytest.approx(float(vecs[h.key] @ q), abs=1e-5)
    for h in dense:
        assert h.score == h.cosine
    for hits in (hybrid, dense):
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(0.0 <= h.score <= 1.0 for h in hybrid)  # convex fusion of normalised scores
    with pytest.raises(InvalidInput, match="search mode"):
        engine.search("h", query, 5, mode="sparse")
    # Deleted documents leave the lexical side too.
    engine.delete_documents("h", ["d0"])
    assert "d0" not in [h.doc_id for h in engine.search("h", query, 25)]


def _teams_corpus(engine):
    """300 look-alike tea notes in teams "a" and "b", and one lighthouse note alone in team
    "rare": never among a tea question's 100 nearest chunks, and no word of one."""
    teas, vessels = ["green", "black", "oolong", "white", "jasmine"], ["teapot", "mug", "gaiwan", "kettle"]
    docs = [Document(f"tea{i}", f"Brew {teas[i % 5]} tea at {60 + i % 40} degrees for {1 + i % 6} minutes "
                     f"in a {vessels[i % 4]}, batch {i}.", f"notes/tea{i}.txt", {"team": "ab"[i % 2], "n": i})
            for i in range(300)]
    docs.append(Document("lighthouse", "The lighthouse keeper climbs the spiral stairs every evening.",
                         "notes/lighthouse.txt", {"team": "rare"}))
    engine.create_collection("c")
    engine.ingest("c", docs)


def test_filter_finds_rare_matches_the_index_misses(engine, monkeypatch):
    """A filtered search ranks the filter's matches: a rare match comes back however far it is
    from the query, in every mode; a common filter gives k hits, in dense mode the exact best
    among its matches; filtering the index's candidates (a common filter) falls back to the
    matches when those leave fewer than k."""
    from engine import search as search_mod
    _teams_corpus(engine)
    question = "What temperature should green tea be brewed at?"
    for mode in ("hybrid", "dense", "exact"):
        hits = engine.search("c", question, k=3, filter={"team": "rare"}, mode=mode)
        assert [h.doc_id for h in hits] == ["lighthouse"], mode
    col = engine.searcher.open("c")
    team_a = col.store.filter_keys({"team": "a"})
    sims = col.store.vectors()[team_a] @ engine.embedder.embed([question])[0]
    want = team_a[np.argsort(-sims, kind="stable")][:5].tolist()
    for mode in ("dense", "exact"):
        assert [h.key for h in engine.search("c", question, k=5, filter={"team": "a"}, mode=mode)] == want
    hybrid = engine.search("c", question, k=5, filter={"team": "a", "n": "42"})
    assert [h.doc_id for h in hybrid] == ["tea42"]  # an int compared as the string gRPC sends
    monkeypatch.setattr(search_mod, "PREFILTER_MAX_CHUNKS", 0)  # every filter "common": the index's candidates
    for mode in ("hybrid", "dense"):
        common = engine.search("c", question, k=5, filter={"team": "a"}, mode=mode)
        assert len(common) == 5 and all(h.metadata["team"] == "a" for h in common)
        rare = engine.search("c", question, k=3, filter={"team": "rare"}, mode=mode)
        assert [h.doc_id for h in rare] == ["lighthouse"], mode
    assert engine.search("c", question, k=3, filter={"team": "nobody"}) == []


def test_range_any_of_and_not_filters_rank_exactly_their_matches(engine, monkeypatch):
    """Ranges, one-of and not-equal filters find the same documents as the Python reference
    (engine/filters.py matches), and dense/exact hits are the exact best of those, whether a
    filter is rare (its matches scored) or common (the index's candidates, then the matches)."""
    from engine import search as search_mod
    from engine.filters import check_filter, matches
    _teams_corpus(engine)
    col = engine.searcher.open("c")
    question = "What temperature should green tea be brewed at?"
    q = engine.embedder.embed([question])[0]
    rows = col.store.chunks(col.store.keys())
    filters = [{"n": {"$gte": 100, "$lt": 110}}, {"n": {"$gt": "297.5"}}, {"team": {"$in": ["rare", "b"]}, "n": {"$lte": 7}},
               {"team": {"$ne": "a"}}, {"team": {"$nin": ["a", "b"]}}, {"n": {"$gte": 10}, "team": "a"},
               # $or / $and: rare alternatives, a common one, and groups beside field conditions
               {"$or": [{"team": "rare"}, {"n": {"$gte": 295}}]}, {"$or": [{"team": "a"}, {"n": {"$lt": 3}}]},
               {"$or": [{"team": "b"}, {"team": "rare"}], "$and": [{"$or": [{"n": {"$lt": 5}}, {"n": {"$gt": 290}}]}]},
               {"$or": [{"$and": [{"team": "a"}, {"n": {"$lt": 2}}]}, {"team": {"$nin": ["a", "b"]}}]}]
    for common in (False, True):
        if common:
            monkeypatch.setattr(search_mod, "PREFILTER_MAX_CHUNKS", 0)
        for f in filters:
            keys = np.array(sorted(k for k, r in rows.items() if matches(r.metadata, check_filter(f))), np.int64)
            assert col.store.filter_keys(f).tolist() == keys.tolist(), f
            sims = col.store.vectors()[keys] @ q
            want = keys[np.argsort(-sims, kind="stable")][:5].tolist()
            for mode in ("dense", "exact"):
                assert [h.key for h in engine.search("c", question, k=5, filter=f, mode=mode)] == want, (f, mode)
            hybrid = engine.search("c", question, k=5, filter=f)
            assert len(hybrid) == min(5, len(keys)) and set(h.key for h in hybrid) <= set(keys.tolist()), f
    assert [h.doc_id for h in engine.search("c", question, k=5, filter={"n": {"$gt": 297.5}})] in (
        ["tea298", "tea299"], ["tea299", "tea298"])
    assert [h.doc_id for h in engine.search("c", question, k=3, filter={"team": {"$nin": ["a", "b"]}})] == ["lighthouse"]
    assert engine.delete_documents("c", filter={"n": {"$lt": 10}, "team": {"$in": ["a"]}}) == 5
    assert engine.describe("c").documents == 296


PARAGRAPHS = [f"Paragraph {i}: the harbor of town {i} keeps {i + 3} boats, a lighthouse painted "
              f"{['red', 'white', 'blue', 'green'][i % 4]}, and a market that opens at {6 + i % 5} in the morning "
              "on weekdays, selling fish, bread, rope and lamp oil to sailors who come in from the north sea. " * 2
              for i in range(8)]


def test_upsert_embeds_only_chunk_texts_it_does_not_have(engine, monkeypatch):
    """Re-ingesting a document whose metadata changed keeps every stored chunk vector (the
    embedder sees no text); one whose last paragraph changed embeds only the chunks that
    changed. Either way the collection equals a fresh ingest of the new version."""
    embedded: list[str] = []
    real = engine.embedder.embed
    monkeypatch.setattr(engine.embedder, "embed", lambda texts, *a, **kw: (embedded.extend(texts), real(texts, *a, **kw))[1])
    engine.create_collection("c")
    text = "\n\n".join(PARAGRAPHS)
    engine.ingest("c", [Document("log", text, "harbors.txt", {"year": 2019}), Document("other", "Tea notes.", "t.txt")])
    col = engine.collections.get("c")
    before = {r.text: np.array(col.store.vectors()[k]) for k, r in col.store.chunks(col.store.keys()).items()}
    n = len(col.store.document_keys("log"))
    assert n >= 4
    embedded.clear()
    r = engine.ingest("c", [Document("log", text, "harbors.txt", {"year": 2020})])
    assert (r.documents_updated, r.chunks_added, r.chunks_removed, r.chunks_reused) == (1, n, n, n)
    assert embedded == []  # metadata only: nothing embedded
    assert {h.doc_id for h in engine.search("c", "harbor boats", k=3, filter={"year": {"$gte": 2020}})} == {"log"}
    edited = "\n\n".join(PARAGRAPHS[:-1] + ["A new last paragraph about glaciers, ice fields and polar bears."])
    embedded.clear()
    r = engine.ingest("c", [Document("log", edited, "harbors.txt", {"year": 2020})])
    assert 0 < r.chunks_reused < r.chunks_added and len(embedded) == r.chunks_added - r.chunks_reused
    fresh = Engine(engine.config.replace(data_dir=engine.config.data_dir.parent / "fresh"), embedder=engine.embedder)
    fresh.create_collection("c")
    fresh.ingest("c", [Document("log", edited, "harbors.txt", {"year": 2020})])
    got, want = (
        {(r.ordinal, r.start, r.end, r.text): np.array(e.collections.get("c").store.vectors()[k])
         for k, r in e.collections.get("c").store.chunks(e.collections.get("c").store.document_keys("log")).items()}
        for e in (engine, fresh))
    assert got.keys() == want.keys()
    assert max(float(np.abs(got[c] - want[c]).max()) for c in got) < 1e-5
    assert all(np.array_equal(got[c], before[c[3]]) for c in got if c[3] in before)  # kept, not re-embedded
    fresh.close()


def test_each_query_of_a_batch_may_have_its_own_filter(engine):
    """search_batch with `filters` (one per query, with `filter`) gives each query what a
    search with its own filter gives; a query's filter that contradicts the batch's is
    InvalidInput, as is a filters list of the wrong length."""
    _teams_corpus(engine)
    question = "What temperature should green tea be brewed at?"
    own = [{"team": "rare"}, None, {"n": {"$lt": 20}}, {"team": "rare"}, {"team": {"$in": ["a", "rare"]}}]
    for mode in ("hybrid", "dense"):
        got = engine.search_batch("c", [question] * 5, 4, filter={"team": {"$ne": "b"}}, mode=mode, filters=own)
        for hits, f in zip(got, own):
            alone = engine.search("c", question, k=4, mode=mode, filter=both({"team": {"$ne": "b"}}, f))
            assert [h.key for h in hits] == [h.key for h in alone], (f, mode)
    assert [h.doc_id for h in got[0]] == ["lighthouse"] and all(h.metadata["n"] < 20 for h in got[2])
    with pytest.raises(InvalidInput, match=r"\$eq is given twice \('a' and 'b'\)"):
        engine.search_batch("c", [question], 3, filter={"team": "a"}, filters=[{"team": "b"}])
    with pytest.raises(InvalidInput, match="one filter \\(or None\\) per query: 2 queries"):
        engine.search_batch("c", [question, question], 3, filters=[None])


def test_list_documents_pages_through_a_collection(engine):
    """list_documents gives pages in id order and the token of the next one (None after the
    last), filtered as search is; bad limits and tokens are InvalidInput, an unknown
    collection NotFound."""
    from engine.errors import NotFound
    _teams_corpus(engine)
    for filter, n in ((None, 301), ({"team": "a"}, 150), ({"n": {"$gte": 290}}, 10), ({"team": "nobody"}, 0)):
        got, after, pages = [], None, 0
        while True:
            docs, after = engine.list_documents("c", filter=filter, limit=64, after=after)
            got += docs
            pages += 1
            if after is None:
                break
            assert after == docs[-1].doc_id
        assert len(got) == n and [d.doc_id for d in got] == sorted(d.doc_id for d in got), filter
        assert pages == max(1, -(-n // 64)), (filter, pages)
    tea7 = engine.list_documents("c", filter={"n": 7})[0]
    assert [(d.doc_id, d.source, d.metadata, d.n_chunks) for d in tea7] == [("tea7", "notes/tea7.txt",
                                                                           {"team": "b", "n": 7}, 1)]
    for bad in ({"limit": 0}, {"limit": 1001}, {"limit": True}, {"limit": 2.0}, {"after": 5}):
        with pytest.raises(InvalidInput, match="limit must be an integer in|after must be a document id"):
            engine.list_documents("c", **bad)
    with pytest.raises(NotFound):
        engine.list_documents("nope")


def test_delete_by_filter_removes_every_match_and_only_them(engine, config, tmp_path):
    """Deleting by a metadata filter removes exactly the documents it matches (through the
    metadata index, and by reading every document for a value the index does not hold), as
    one logged write that a reopened engine still shows; ids and a filter together are
    refused with nothing deleted."""
    _teams_corpus(engine)
    with pytest.raises(InvalidInput, match="not both"):
        engine.delete_documents("c", ["tea0"], filter={"team": "a"})
    assert engine.describe("c").documents == 301
    assert engine.delete_documents("c", filter={"team": "rare"}) == 1
    assert engine.delete_documents("c", filter={"team": "a", "n": "4"}) == 1
    assert engine.delete_documents("c", filter={"team": "b", "n": None}) == 0  # every b has an n
    assert engine.delete_documents("c", filter={"team": "b"}) == 150
    left = {h.doc_id for h in engine.search("c", "green tea", k=1000, mode="exact")}
    assert left == {f"tea{i}" for i in range(0, 300, 2)} - {"tea4"}
    engine.close()
    again = Engine(config.replace(data_dir=tmp_path / "data"), embedder=engine.embedder)
    assert again.describe("c").documents == 149
    assert again.search("c", "lighthouse keeper", k=3, filter={"team": "rare"}) == []
    again.close()


def collection_state(engine: Engine, name: str) -> tuple[list, dict]:
    """(documents as listed, chunk rows with their vectors by (doc_id, ordinal))."""
    docs, after = [], None
    while True:
        page, after = engine.list_documents(name, limit=1000, after=after)
        docs += [(d.doc_id, d.source, d.content_hash, d.metadata, d.n_chars, d.n_chunks) for d in page]
        if after is None:
            break
    col = engine.collections.get(name)
    vectors = col.store.vectors()
    chunks = {(r.doc_id, r.ordinal): (r.start, r.end, r.n_tokens, r.text, np.array(vectors[k]))
              for k, r in col.store.chunks(col.store.keys()).items()}
    return docs, chunks


def test_copy_collection_equals_its_source_here_and_in_another_data_dir(engine, tmp_path):
    _teams_corpus(engine)
    engine.copy_collection("c", "c2")
    docs, chunks = collection_state(engine, "c")
    docs2, chunks2 = collection_state(engine, "c2")
    assert docs2 == docs and len(docs) == 301
    assert chunks2.keys() == chunks.keys()
    assert all(chunks2[c][:4] == chunks[c][:4] and np.array_equal(chunks2[c][4], chunks[c][4]) for c in chunks)
    settings = {k: v for k, v in engine.collections.get("c").store.settings.items() if k != "created_at"}
    assert {k: v for k, v in engine.collections.get("c2").store.settings.items() if k != "created_at"} == settings
    q = "What temperature should green tea be brewed at?"
    for mode in ("exact", "dense", "hybrid"):
        assert [(h.doc_id, h.ordinal) for h in engine.search("c2", q, 5, mode=mode)] == \
               [(h.doc_id, h.ordinal) for h in engine.search("c", q, 5, mode=mode)]
    assert engine.search("c2", q, 3, filter={"team": "rare"})[0].doc_id == "lighthouse"  # metadata index copied too

    # into another data dir (a backup), opened there by another engine; and back (a restore)
    backup = tmp_path / "backup"
    info = engine.copy_collection("c", "c", data_dir=backup)
    assert (info.documents, info.chunks) == (301, len(chunks))
    other = Engine(engine.config.replace(data_dir=backup), embedder=engine.embedder)
    try:
        assert collection_state(other, "c")[0] == docs
        r = other.ingest("c", [Document("lighthouse", "The lighthouse keeper climbs the spiral stairs every evening.",
                                        "notes/lighthouse.txt", {"team": "rare"})])
        assert r.documents_unchanged == 1  # the same content hash: nothing to do
        other.ingest("c", [Document("tea7", "A changed note.", "y")])
        other.copy_collection("c", "restored", data_dir=engine.config.data_dir)
    finally:
        other.close()
    restored = {d[0]: d for d in collection_state(engine, "restored")[0]}
    assert restored["tea7"][1] == "y" and {k: v for k, v in restored.items() if k != "tea7"} == \
           {d[0]: d for d in docs if d[0] != "tea7"}

    with pytest.raises(AlreadyExists):
        engine.copy_collection("c", "c2")
    with pytest.raises(NotFound):
        engine.copy_collection("missing", "c3")
    with pytest.raises(InvalidInput):
        engine.copy_collection("c", "bad name")
    assert sorted(engine.collections.names()) == ["c", "c2", "restored"]


def test_copy_is_of_one_moment_beside_a_writer_and_complete_or_absent(engine, config, tmp_path, monkeypatch):
    """A copy made while another engine (the collection's writer) keeps adding documents
    holds the documents of one moment: the ones there before and a gapless run of the new
    ones, each as stored, though it is read in many batches. A copy that fails midway
    leaves no collection and no temporary folder."""
    import threading

    from engine import store as store_mod
    _teams_corpus(engine)  # 301 documents: two batches at least
    reader = Engine(config.replace(data_dir=engine.config.data_dir), embedder=engine.embedder)
    stop = threading.Event()

    def write():
        i = 0
        while not stop.is_set():
            engine.ingest("c", [Document(f"zz{i:05d}", f"A later note, number {i}, about kettles.", "late.txt")])
            i += 1
    writer = threading.Thread(target=write)
    real_export = store_mod.Store.export
    monkeypatch.setattr(store_mod.Store, "export", lambda self, batch_chunks=4096: real_export(self, 40))
    writer.start()
    try:
        reader.copy_collection("c", "snap", data_dir=tmp_path / "snaps")
    finally:
        stop.set()
        writer.join()
    assert reader.collections.get("c").read_only  # it read beside the writer
    snap = Engine(config.replace(data_dir=tmp_path / "snaps"), embedder=engine.embedder)
    try:
        got = collection_state(snap, "snap")[0]
    finally:
        snap.close()
    late = [d[0] for d in got if d[0].startswith("zz")]
    assert late == [f"zz{i:05d}" for i in range(len(late))]  # no gap: one moment
    now = {d[0]: d for d in collection_state(engine, "c")[0]}
    assert len(now) > len(got) - 1 and all(now[d[0]] == d for d in got)

    def failing(self, batch_chunks=4096):
        it = real_export(self, 40)
        yield next(it)
        raise OSError("disk full")
    monkeypatch.setattr(store_mod.Store, "export", failing)
    with pytest.raises(OSError):
        engine.copy_collection("c", "half")
    assert "half" not in engine.collections.names()
    assert not [p for p in engine.root.iterdir() if p.name.startswith(".tmp-")]
    reader.close()


def test_export_refuses_vectors_freed_while_it_read(engine):
    """A vector row freed under a copy (its document deleted and the collection snapshotted
    meanwhile: the row reads zeros) fails the copy as Unavailable, to be run again."""
    from engine.errors import Unavailable
    engine.create_collection("c")
    engine.ingest("c", [Document("a", "Kettles boil water.", "a.txt"), Document("b", "Ovens bake bread.", "b.txt")])
    col = engine.collections.get("c")
    key = int(col.store.document_keys("b")[0])
    with open(col.folder / "vectors.f32", "r+b") as f:  # what a freed (hole-punched) row reads as
        f.seek(key * col.store.dim * 4)
        f.write(bytes(col.store.dim * 4))
    with pytest.raises(Unavailable, match="'b' changed while the collection was read"):
        list(col.store.export())


def test_get_documents_gives_each_text_as_ingested(engine, corpus):
    """The text rebuilt from the chunks is the file's text (its content hash confirms it),
    with overlapping chunks and with none (whitespace between chunks guessed), and each
    chunk's span finds its text; ids not held are listed, in the order asked."""
    from engine.documents import iter_documents

    want = {d.doc_id: d for d in iter_documents([corpus])}
    for name, overlap in (("over", 8), ("apart", 0)):
        engine.create_collection(name, chunk_tokens=48, chunk_overlap=overlap)
        engine.ingest_paths(name, [corpus])
        ids = sorted(want)
        found, missing = engine.get_documents(name, [ids[2], "nope", *ids, ids[0]])
        assert missing == ["nope"] and [d.document.doc_id for d in found] == [ids[2], *[i for i in ids if i != ids[2]]]
        for d in found:
            assert d.exact and d.text == want[d.document.doc_id].text, (name, d.document.doc_id)
            rows = engine.collections.get(name).store.chunks(engine.collections.get(name).store.document_keys(
                d.document.doc_id))
            assert [d.text[s:e] for s, e, _ in d.chunks] == [r.text for r in sorted(rows.values(), key=lambda r: r.ordinal)]
            assert len(d.chunks) == d.document.n_chunks
        assert any(len(d.chunks) > 1 for d in found)
    with pytest.raises(InvalidInput, match="give 1 to 1000 document ids, got 0"):
        engine.get_documents("over", [])
    with pytest.raises(InvalidInput, match="non-empty strings"):
        engine.get_documents("over", ["a", " "])
    with pytest.raises(InvalidInput, match="give 1 to 1000 document ids"):
        engine.get_documents("over", "a")
    with pytest.raises(NotFound):
        engine.get_documents("missing", ["a"])


def test_rebuild_text_guesses_only_what_the_hash_confirms():
    from engine.chunk import Chunk
    from engine.documents import rebuild_text

    text = "  First part.\n\nSecond part. Third\tpart.\n"
    spans = [(2, 13), (15, 27), (28, 33), (34, 39)]
    chunks = [Chunk("d", i, s, e, 3, text[s:e]) for i, (s, e) in enumerate(spans)]
    h = Document("d", text, "x", {"a": 1}).content_hash
    got, exact = rebuild_text("d", chunks, len(text), {"a": 1}, h)  # gaps: "  ", "\n\n", " ", "\t", "\n"
    assert not exact and got == "  First part.  Second part. Third part. " and len(got) == len(text)
    text2 = text.replace("\t", " ")
    got, exact = rebuild_text("d", chunks, len(text2), {"a": 1}, Document("d", text2, "x", {"a": 1}).content_hash)
    assert exact and got == text2
    got, exact = rebuild_text("d", chunks, len(text2), {"a": 2}, Document("d", text2, "x", {"a": 1}).content_hash)
    assert not exact  # the hash covers the metadata too


def test_filters_reach_nested_metadata_by_dotted_paths(engine):
    """A JSONL record's nested fields are filtered on by dotted paths, in search, answers'
    retrieval, listings and deletes alike."""
    engine.create_collection("c")
    engine.ingest("c", [Document(f"t{i}", f"Brew tea number {i} at {70 + i} degrees.", "x",
                                 {"author": {"name": name, "born": 1960 + 10 * i}})
                        for i, name in enumerate(["Ann", "Bob", "Cy"])])
    q = "What temperature for tea?"
    for mode in ("exact", "dense", "hybrid"):
        assert [h.doc_id for h in engine.search("c", q, 3, mode=mode, filter={"author.name": "Bob"})] == ["t1"]
        assert sorted(h.doc_id for h in engine.search("c", q, 3, mode=mode,
                                                      filter={"author.born": {"$gte": 1970}})) == ["t1", "t2"]
    assert [d.doc_id for d in engine.list_documents("c", filter={"author.name": {"$ne": "Ann"}})[0]] == ["t1", "t2"]
    assert engine.delete_documents("c", filter={"author.name": "Cy"}) == 1
    assert [d.doc_id for d in engine.list_documents("c")[0]] == ["t0", "t1"]


def test_filters_find_elements_of_list_metadata(engine):
    """$contains / $contains_any find documents by what a list field holds (a dotted path
    into a list of objects included), in search (every mode), answers' retrieval, listings
    and deletes alike."""
    engine.create_collection("c")
    tags = [["green", "japan"], ["black", "india"], "green", ["oolong", "china", "green"]]
    engine.ingest("c", [Document(f"t{i}", f"Brew tea number {i} at {70 + i} degrees.", "x",
                                 {"tags": t, "by": [{"name": "Ann"}, {"name": f"n{i}"}]})
                        for i, t in enumerate(tags)])
    q = "What temperature for tea?"
    for mode in ("exact", "dense", "hybrid"):
        assert sorted(h.doc_id for h in engine.search("c", q, 4, mode=mode, filter={"tags": {"$contains": "green"}})) \
            == ["t0", "t2", "t3"]
        assert sorted(h.doc_id for h in engine.search("c", q, 4, mode=mode, filter={
            "tags": {"$contains_any": ["india", "china"]}})) == ["t1", "t3"]
        assert [h.doc_id for h in engine.search("c", q, 4, mode=mode, filter={
            "$not": {"tags": {"$contains": "green"}}})] == ["t1"]
    assert [s.hit.doc_id for s in engine.answer("c", q, filter={"tags": {"$contains": ["green", "japan"]}}).sources] \
        == ["t0"]
    assert [d.doc_id for d in engine.list_documents("c", filter={"tags": {"$contains": ["oolong", "green"]}})[0]] \
        == ["t3"]
    assert [d.doc_id for d in engine.list_documents("c", filter={"by.name": {"$contains": "n2"}})[0]] == ["t2"]
    assert len(engine.list_documents("c", filter={"by.name": {"$contains": "Ann"}})[0]) == 4  # a path into a list
    assert engine.delete_documents("c", filter={"tags": {"$contains": "green"}}) == 3
    assert [d.doc_id for d in engine.list_documents("c")[0]] == ["t1"]


def test_min_cosine_leaves_out_hits_less_similar_than_it(engine, corpus):
    engine.create_collection("c")
    engine.ingest_paths("c", [corpus])
    q = "What temperature should green tea be brewed at?"
    for mode in ("exact", "dense", "hybrid"):
        every = engine.search("c", q, 8, mode=mode)
        floor = (every[1].cosine + every[-1].cosine) / 2  # between the second hit's and the last's
        got = engine.search("c", q, 8, mode=mode, min_cosine=floor)
        want = [h for h in every if h.cosine >= floor]
        assert 2 <= len(got) < len(every) and [(h.doc_id, h.ordinal) for h in got] == [(h.doc_id, h.ordinal)
                                                                                      for h in want]
        assert [h.rank for h in got] == list(range(1, len(got) + 1)) and all(h.cosine >= floor for h in got)
        assert engine.search("c", q, 8, mode=mode, min_cosine=-1) == every
        first, second = engine.search_batch("c", [q, "kettle"], 8, mode=mode, min_cosine=floor)
        assert [(h.doc_id, h.rank) for h in first] == [(h.doc_id, h.rank) for h in got]  # scores: batch float noise
        assert all(h.cosine >= floor for h in second) and [h.rank for h in second] == list(range(1, len(second) + 1))
    assert engine.search("c", q, 3, min_cosine=1.0) == []
    for bad in (1.5, -2, float("nan"), "0.5", True):
        with pytest.raises(InvalidInput, match="min_cosine must be a number in \\[-1, 1\\]"):
            engine.search("c", q, 3, min_cosine=bad)


def test_answer_min_cosine_sets_the_relevance_floor(engine, corpus, generator):
    """A request's min_cosine replaces the configured floor: above every passage's cosine,
    nothing is shown to the generator and the answer finishes no_context; below, the
    answer is the default one."""
    from engine.generate import SamplingParams

    eng = Engine(engine.config, embedder=engine.embedder, generator=generator)
    try:
        eng.create_collection("c")
        eng.ingest_paths("c", [corpus])
        q, params = "How hot should the water be for green tea?", SamplingParams(max_new_tokens=24)
        default = eng.answer("c", q, params=params)
        assert default.finish_reason != "no_context" and default.sources
        none = eng.answer("c", q, params=params, min_cosine=1.0)
        assert none.finish_reason == "no_context" and not none.sources
        low = eng.answer("c", q, params=params, min_cosine=0.0)
        assert low.text == default.text and [s.hit.doc_id for s in low.sources] == \
            [s.hit.doc_id for s in default.sources]
        batch = eng.answer_batch("c", [q, "Which planet is the largest?"], params=params, min_cosine=1.0)
        assert [a.finish_reason for a in batch] == ["no_context", "no_context"]
        for bad in (1.5, float("nan"), "0.3"):
            with pytest.raises(InvalidInput, match="min_cosine must be a number"):
                eng.answer("c", q, params=params, min_cosine=bad)
            with pytest.raises(InvalidInput, match="min_cosine must be a number"):
                eng.answer_batch("c", [q], params=params, min_cosine=bad)
    finally:
        eng.close()
