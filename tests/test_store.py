"""engine/store.py: documents, chunks and vectors committed together or not at all."""

from __future__ import annotations

import json
import re
import sqlite3

import numpy as np
import pytest

from engine.chunk import Chunk
from engine.errors import InvalidInput
from engine.filters import both, check_filter, matches
from engine.store import STORE_FILE, DocumentRecord, Store

DIM = 4


@pytest.fixture()
def store(tmp_path):
    Store.initialise(tmp_path, {"dim": DIM})
    s = Store(tmp_path)
    yield s
    s.close()


def record(doc_id, n, seed=0, h="h"):
    rng = np.random.default_rng(seed)
    chunks = [Chunk(doc_id, i, i * 10, i * 10 + 9, 3, f"{doc_id} chunk {i}") for i in range(n)]
    return DocumentRecord(doc_id, f"/src/{doc_id}", h, {"lang": "en"}, n * 10, chunks,
                          rng.standard_normal((n, DIM)).astype(np.float32))


def test_wal_mode(store):
    db = sqlite3.connect(store.folder / STORE_FILE)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_insert_read_back(store):
    a, b = record("a", 3, 1), record("b", 2, 2)
    change = store.apply([a, b])
    assert change.added_keys.tolist() == [0, 1, 2, 3, 4] and change.removed_keys.size == 0
    assert store.counts() == (2, 5)
    np.testing.assert_array_equal(store.vectors()[:3], a.vectors)
    np.testing.assert_array_equal(store.vectors()[3:], b.vectors)
    rows = store.chunks([4, 0])
    assert rows[0].text == "a chunk 0" and rows[0].source == "/src/a" and rows[0].metadata == {"lang": "en"}
    assert (rows[4].doc_id, rows[4].ordinal, rows[4].start, rows[4].end) == ("b", 1, 10, 19)
    assert store.hashes(["a", "b", "zzz"]) == {"a": "h", "b": "h"}


def test_upsert_replaces_chunks(store):
    store.apply([record("a", 3)])
    change = store.apply([record("a", 2, seed=5, h="h2")])
    assert change.removed_keys.tolist() == [0, 1, 2]
    assert change.added_keys.tolist() == [3, 4]
    assert store.counts() == (1, 2)
    assert store.document_keys("a") == [3, 4]
    assert store.hashes(["a"]) == {"a": "h2"}
    assert store.generation == 2


def test_delete(store):
    store.apply([record("a", 3), record("b", 1)])
    change = store.apply([], deletes=["a"])
    assert sorted(change.removed_keys.tolist()) == [0, 1, 2]
    assert store.counts() == (1, 1) and not store.has_document("a")


def test_failed_write_changes_nothing(store):
    store.apply([record("a", 2)])
    before = (store.counts(), store.generation, store.vectors().copy())
    bad = record("b", 2)
    bad = DocumentRecord(bad.doc_id, bad.source, bad.content_hash, bad.metadata, bad.n_chars, bad.chunks,
                         bad.vectors[:1])  # one vector for two chunks
    with pytest.raises(InvalidInput, match="does not match"):
        store.apply([bad])
    # a failure inside the transaction (duplicate doc id in one batch) rolls back completely
    with pytest.raises(sqlite3.IntegrityError):
        store.apply([record("c", 1), record("c", 1)])
    assert (store.counts(), store.generation) == before[:2]
    np.testing.assert_array_equal(store.vectors(), before[2])
    assert store.filter_keys({"lang": "en"}).tolist() == [0, 1]  # nor the metadata index


def test_reopen_sees_committed_state(tmp_path):
    Store.initialise(tmp_path, {"dim": DIM})
    s = Store(tmp_path)
    rec = record("a", 3)
    s.apply([rec])
    s.close()
    s2 = Store(tmp_path)
    assert s2.counts() == (1, 3) and s2.keys().tolist() == [0, 1, 2]
    np.testing.assert_array_equal(s2.vectors(), rec.vectors)
    s2.close()


def test_uncommitted_vector_rows_are_invisible(tmp_path):
    """Rows written past next_key by a write that never committed are ignored and reused."""
    Store.initialise(tmp_path, {"dim": DIM})
    s = Store(tmp_path)
    s.apply([record("a", 1)])
    with open(tmp_path / "vectors.f32", "ab") as f:  # what a crash after the vector write leaves
        f.write(np.ones((5, DIM), np.float32).tobytes())
    assert s.vectors().shape == (1, DIM)
    change = s.apply([record("b", 2, seed=9)])
    assert change.added_keys.tolist() == [1, 2]
    np.testing.assert_array_equal(s.vectors()[1:], record("b", 2, seed=9).vectors)
    s.close()


def text_record(doc_id, texts, seed=0):
    rng = np.random.default_rng(seed)
    chunks = [Chunk(doc_id, i, i * 100, i * 100 + len(t), 5, t) for i, t in enumerate(texts)]
    return DocumentRecord(doc_id, f"/src/{doc_id}", f"h-{doc_id}-{seed}", {}, 100 * len(texts), chunks,
                          rng.standard_normal((len(texts), DIM)).astype(np.float32))


def test_lexical_search_follows_writes(store):
    assert store.lexical
    store.apply([text_record("a", ["the lighthouse keeper trims the lamps", "bread rises overnight"]),
                 text_record("b", ["planets orbit the sun", "lighthouses warn passing ships"])])
    keys = {int(k): r.doc_id for k, r in store.chunks(store.keys()).items()}
    found = store.lexical_search(["lighthouse", "orbiting planets", "the of and"], 5)
    assert sorted(keys[k] for k in found[0]) == ["a", "b"], "porter stemming: lighthouses ~ lighthouse"
    assert [keys[k] for k in found[1]] == ["b"]
    assert len(found[2]) == 0, "stopwords alone match nothing"
    store.apply([text_record("b", ["only rivers now"], seed=1)])  # replaces b's chunks
    store.apply([], deletes=["a"])
    assert [len(f) for f in store.lexical_search(["lighthouse", "rivers"], 5)] == [0, 1]


@pytest.mark.parametrize("query", ['"unbalanced', "NEAR(a b)", "col:term", "a* OR -b", "^start", "))(("])
def test_lexical_query_syntax_is_inert(store, query):
    store.apply([text_record("a", ["near a term start col b"])])
    store.lexical_search([query], 3)  # no sqlite3.OperationalError: words are quoted


def test_old_store_gets_full_text_index(tmp_path):
    Store.initialise(tmp_path, {"dim": DIM})
    s = Store(tmp_path)
    s.apply([text_record("a", ["copper kettles whistle"])])
    s.close()
    db = sqlite3.connect(tmp_path / STORE_FILE)  # a store from before full-text search
    db.executescript("DROP TRIGGER chunks_fts_insert; DROP TRIGGER chunks_fts_delete; DROP TABLE chunks_fts;")
    db.close()
    s = Store(tmp_path)
    assert len(s.lexical_search(["kettles"], 3)[0]) == 1
    s.close()


def test_reclaim_frees_dead_rows_and_keeps_live_ones(tmp_path):
    dim = 384  # a row is 1536 bytes: runs of dead rows span whole 4 KiB blocks
    Store.initialise(tmp_path, {"dim": dim})
    s = Store(tmp_path)

    def big(doc_id, n, seed):
        rng = np.random.default_rng(seed)
        chunks = [Chunk(doc_id, i, i, i + 1, 1, f"{doc_id} {i}") for i in range(n)]
        return DocumentRecord(doc_id, doc_id, f"h{seed}", {}, n, chunks,
                              rng.standard_normal((n, dim)).astype(np.float32))

    s.apply([big("a", 200, 1), big("b", 50, 2)])
    s.apply([big("a", 200, 3)])  # replaces a: its first 200 rows are dead
    s.apply([], deletes=["b"])
    live_before = {k: np.array(s.vectors()[k]) for k in s.keys().tolist()}
    vec_file = tmp_path / "vectors.f32"
    s.vector_file.sync()
    used_before = vec_file.stat().st_blocks * 512
    freed = s.reclaim()
    assert freed >= 240 * dim * 4, f"freed only {freed} bytes of 250 dead rows"
    assert vec_file.stat().st_blocks * 512 <= used_before - freed + 4096
    assert vec_file.stat().st_size == 450 * dim * 4, "keys never move: the file keeps its length"
    for k, v in live_before.items():
        np.testing.assert_array_equal(s.vectors()[k], v)
    assert s.reclaim() >= 0  # again: nothing breaks
    s.close()


def test_lexical_leaves_out_words_most_chunks_share(tmp_path, monkeypatch):
    import engine.lexical as store_mod

    monkeypatch.setattr(store_mod, "PRUNE_MIN_CHUNKS", 10)
    Store.initialise(tmp_path, {"dim": DIM})
    s = Store(tmp_path)
    texts = [f"common filler words about item {i}" for i in range(40)] + ["a rare zeppelin item"]
    s.apply([text_record(f"d{i}", [t], seed=i) for i, t in enumerate(texts)])
    keys = {int(k): r.doc_id for k, r in s.chunks(s.keys()).items()}
    found = s.lexical_search(["common zeppelin"], 5)[0]
    assert [keys[k] for k in found] == ["d40"], "'common' (in 40 of 41 chunks) is left out"
    assert len(s.lexical_search(["common item"], 50)[0]) == 41, "all words common: the rarest are kept"
    s.close()


METADATA = [  # one document each: every JSON type, and names SQLite's JSON paths do not take
    {"team": "red", "n": 5, "ok": True}, {"team": "blue", "n": -5, "ok": False},
    {"team": "red", "n": 2**70, "x": 1.5}, {"team": "Red", "n": "5", "x": None},
    {"team": {"b": [1, 2], "a": 1}, "tags": ["a", "b"]}, {"é ü": "ñ", 'q"k': 1, "a\\b": "c", "a.b": 2},
    {}, {"n": 1e300, "x": 1}, {"team": "red", "long": "w" * 300},
]


@pytest.mark.parametrize("filter", [
    {"team": "red"}, {"team": "Red"}, {"team": "green"}, {"team": "red", "n": "5"}, {"n": 5}, {"n": "5"},
    {"n": "-5"}, {"n": 2**70}, {"n": str(2**70)}, {"ok": True}, {"ok": "true"}, {"ok": "false"}, {"x": 1.5},
    {"x": "1.5"}, {"x": None}, {"x": "null"}, {"team": {"a": 1, "b": [1, 2]}}, {"tags": '["a", "b"]'},
    {"é ü": "ñ"}, {'q"k': "1"}, {"a\\b": "c"}, {"a.b": 2}, {"n": 1e300}, {"missing": None}, {"missing": ""},
    {"long": "w" * 300}, {"long": "w" * 300, "team": "red"}, {"team": "red", "n": None},
    # operators: one of, not, ranges (numeric and text), and their combinations
    {"team": {"$in": ["red", "blue"]}}, {"team": {"$in": ["Red", None]}}, {"team": {"$nin": ["red"]}},
    {"team": {"$ne": "red"}, "n": {"$gte": 0}}, {"n": {"$gt": 2}}, {"n": {"$gte": "-5", "$lt": 5}},
    {"n": {"$lte": 5}}, {"n": {"$gt": 1e299}}, {"x": {"$lt": 2}}, {"team": {"$gte": "blue"}},
    {"team": {"$gt": "blue", "$lt": "red"}}, {"long": {"$gt": "a"}}, {"long": {"$lt": "a"}},
    {"team": {"$eq": "red"}, "long": {"$ne": "a"}}, {"team": {"$in": ["red"], "$nin": ["blue"]}},
    {"ok": {"$in": [True, "false"]}}, {"n": {"$in": [5, -5]}, "team": {"$gte": "a"}}, {"missing": {"$ne": "a"}},
    {"missing": {"$nin": [None]}}, {"team": {"$nin": [None]}}, {"n": {"$ne": None}}, {"long": {"$nin": ["w" * 300]}},
    # $or / $and: alternatives, nested, beside field conditions, through values the index lacks
    {"$or": [{"team": "blue"}, {"n": {"$gt": 1e299}}]}, {"$or": [{"team": "red"}, {"x": None}], "n": {"$gte": 2}},
    {"$or": [{"team": {"$ne": "red"}}, {"ok": True}]}, {"$and": [{"team": "red"}, {"n": {"$lt": 10}}]},
    {"$or": [{"long": "w" * 300}, {"tags": '["a", "b"]'}]}, {"$or": [{"team": "red"}], "$and": [{"$or": [
        {"n": 5}, {"long": {"$gt": "a"}}]}]}, {"$or": [{"$and": [{"team": "red"}, {"ok": True}]}, {"a.b": 2}]},
    {"$or": [{"missing": "a"}, {"team": "green"}]},
    # $not: of one filter, of several, through values the index lacks, beside fields, inside $or
    {"$not": {"team": "red"}}, {"$not": [{"team": "red"}, {"n": {"$gt": 2}}]}, {"$not": {"long": "w" * 300}},
    {"team": "red", "$not": {"n": 5}}, {"$or": [{"$not": {"team": "red"}}, {"ok": True}]},
    {"$not": {"$or": [{"team": "blue"}, {"x": None}]}}, {"$not": {"$not": {"team": "Red"}}},
])
def test_filter_keys_match_metadata_as_search_compares_it(store, filter):
    """filter_keys returns the chunks of exactly the documents `matches` accepts, whatever
    the values' JSON types, through the metadata index or (values it does not hold: null,
    long; stores without it) by reading every document's metadata."""
    recs = []
    for i, meta in enumerate(METADATA):
        r = record(f"d{i}", 2, seed=i)
        recs.append(DocumentRecord(r.doc_id, r.source, r.content_hash, meta, r.n_chars, r.chunks, r.vectors))
    store.apply(recs)
    want = [k for i, meta in enumerate(METADATA) if matches(meta, check_filter(filter)) for k in (2 * i, 2 * i + 1)]
    for indexed in (True, False):
        store.meta_index = indexed
        assert store.filter_keys(filter).tolist() == want
        assert store.filter_keys(filter, limit=len(want)).tolist() == want
        if want:
            assert store.filter_keys(filter, limit=len(want) - 1) is None  # more chunks match than the limit


@pytest.mark.parametrize("filter,docs", [
    ({"n": {"$gt": 2}}, [0, 2, 3, 7]),  # 5, 2**70, "5" (reads as a number), 1e300
    ({"n": {"$gte": -5, "$lt": 5}}, [1]),
    ({"n": {"$gte": "-5", "$lte": "5"}}, [0, 1, 3]),  # bounds that read as numbers are numbers
    ({"team": {"$gte": "blue"}}, [0, 1, 2, 4, 8]),  # text: "Red" sorts before "blue", "{..." after
    ({"team": {"$in": ["Red", None]}}, [3, 5, 6, 7]),  # None: the field missing or null
    ({"team": {"$ne": "red"}}, [1, 3, 4, 5, 6, 7]),
    ({"team": {"$nin": ["red", "blue"]}, "n": {"$lt": 1e300}}, [3]),
    ({"x": {"$lt": 2}}, [2, 7]),
    ({"long": {"$gt": "a"}}, [8]),  # a value too long for the index, found by reading documents
    ({"team": "red", "n": {"$gt": 0}}, [0, 2]),
    ({"$or": [{"team": "blue"}, {"n": {"$gt": 1e299}}]}, [1, 7]),
    ({"$or": [{"team": "Red"}, {"x": 1.5}], "n": {"$gt": 0}}, [2, 3]),
    ({"$or": [{"team": "red"}, {"ok": False}], "$and": [{"$or": [{"n": -5}, {"long": {"$gt": "a"}}]}]}, [1, 8]),
    ({"$not": {"team": "red"}}, [1, 3, 4, 5, 6, 7]),  # a document without the field passes
    ({"$not": [{"team": "red"}, {"n": {"$lt": 0}}], "n": {"$ne": None}}, [3, 7]),
])
def test_filter_operators_mean_what_they_say(store, filter, docs):
    store.apply([DocumentRecord(f"d{i}", "/s", "h", meta, 2, record(f"d{i}", 2, seed=i).chunks,
                                record(f"d{i}", 2, seed=i).vectors) for i, meta in enumerate(METADATA)])
    for indexed in (True, False):
        store.meta_index = indexed
        assert sorted(store.filter_documents(filter)) == [f"d{i}" for i in docs]


@pytest.mark.parametrize("filter,message", [
    ({"n": {"$gtt": 1}}, "unknown operator '$gtt'"), ({"n": {"$in": []}}, "non-empty list"),
    ({"n": {"$in": "a"}}, "non-empty list"), ({"n": {"$gt": True}}, "a number or a string"),
    ({"n": {"$gt": None}}, "a number or a string"), ({"n": {"$lt": float("nan")}}, "finite"),
    ({"n": {"$gt": 1, "$lt": "z"}}, "must all be numbers or all text"), ({"": {"$eq": 1}}, "non-empty strings"),
    ({"n": {"$gt": 1, "b": 2}}, "unknown operator 'b'"), (["n"], "must be a mapping"),
    ({"$or": []}, "$or takes a non-empty list of filters"), ({"$or": {"a": 1}}, "$or takes a non-empty list"),
    ({"$and": [{"a": 1}, {}]}, "$and[1] is empty"), ({"$nor": {"a": 1}}, "unknown filter operator '$nor'"),
    ({"$not": []}, "$not takes a non-empty list of filters"), ({"$not": "a"}, "$not takes a non-empty list"),
    ({"$not": {}}, "filter $not[0] is empty"),
    ({"$or": [{"a": {"$gtt": 1}}]}, "filter $or[0]: filter field 'a': unknown operator '$gtt'"),
    ({"t": {"$contains": []}}, "$contains takes a non-empty list of values (or one value)"),
    ({"t": {"$contains": None}}, "$contains takes values, not null"),
    ({"t": {"$contains": ["a", None]}}, "$contains takes values, not null"),
    ({"t": {"$contains_any": "a"}}, "$contains_any takes a non-empty list of values, got 'a'"),
    ({"t": {"$contains_any": []}}, "$contains_any takes a non-empty list"),
])
def test_bad_filters_say_what_to_fix(filter, message):
    with pytest.raises(InvalidInput, match=re.escape(message)):
        check_filter(filter)


def test_canonical_filter_is_its_own_canonical_form():
    f = check_filter({"a": 1, "b": {"$in": [2, "x", None]}, "c": {"$gte": "2020", "$lt": 2024.5},
                      "d": {"$lt": "2024-01-01"}, "e": {"k": 1}})
    assert f == {"a": {"$eq": "1"}, "b": {"$in": ["2", "x", None]}, "c": {"$gte": 2020.0, "$lt": 2024.5},
                 "d": {"$lt": "2024-01-01"}, "e": {"$eq": '{"k": 1}'}}
    assert check_filter(f) is f and check_filter(json.loads(json.dumps(f))) == f  # as Ray and the batcher pass it on
    g = check_filter({"$or": [{"a": 1}, {"$and": [{"b": {"$gt": 2}}, {"c": None}]}], "d": "x"})
    assert g == {"$or": [{"a": {"$eq": "1"}}, {"$and": [{"b": {"$gt": 2.0}}, {"c": {"$eq": None}}]}], "d": {"$eq": "x"}}
    assert check_filter(json.loads(json.dumps(g))) == g


def test_both_keeps_every_group_of_alternatives():
    assert both({"$not": {"t": "1"}}, {"$not": [{"u": "2"}]})["$not"] == [{"t": {"$eq": "1"}}, {"u": {"$eq": "2"}}]
    a = {"$or": [{"t": "1"}, {"t": "2"}], "k": "x"}
    b = {"$or": [{"u": "1"}, {"u": "2"}], "$and": [{"v": "1"}]}
    f = both(a, b)
    assert f["$or"] == check_filter(a)["$or"] and f["k"] == {"$eq": "x"}
    assert f["$and"] == [{"v": {"$eq": "1"}}, {"$or": [{"u": {"$eq": "1"}}, {"u": {"$eq": "2"}}]}]
    for meta, want in (({"t": "1", "k": "x", "u": "2", "v": "1"}, True), ({"t": "1", "k": "x", "u": "3", "v": "1"}, False),
                       ({"t": "3", "k": "x", "u": "1", "v": "1"}, False), ({"t": "2", "k": "x", "u": "1"}, False)):
        assert matches(meta, f) == want == (matches(meta, check_filter(a)) and matches(meta, check_filter(b)))


def test_list_documents_pages_in_id_order(store):
    """A listing's pages follow each other in id order with nothing skipped or repeated,
    filtered through the metadata index or (values it does not hold) by reading documents."""
    store.apply([DocumentRecord(f"d{i}", f"/s{i}", f"h{i}", meta, 7 + i, record(f"d{i}", 1 + i % 3, seed=i).chunks,
                                record(f"d{i}", 1 + i % 3, seed=i).vectors) for i, meta in enumerate(METADATA)])
    every = sorted(f"d{i}" for i in range(len(METADATA)))
    for indexed in (True, False):
        store.meta_index = indexed
        for filter, want in ((None, every), ({"team": "red"}, ["d0", "d2", "d8"]),
                             ({"n": {"$gt": 0}, "team": {"$ne": "Red"}}, ["d0", "d2", "d7"]),
                             ({"x": None}, ["d0", "d1", "d3", "d4", "d5", "d6", "d8"])):
            for limit in (1, 2, 100):
                got, after = [], ""
                while page := store.list_documents(filter, after, limit):
                    assert len(page) <= limit
                    got += [d.doc_id for d in page]
                    after = page[-1].doc_id
                assert got == want, (filter, limit)
    (d2,) = store.list_documents({"team": "red", "n": 2**70}, "", 5)
    assert (d2.source, d2.content_hash, d2.metadata, d2.n_chars, d2.n_chunks) == ("/s2", "h2", METADATA[2], 9, 3)
    assert d2.ingested_at > 1.7e9


def test_old_store_gets_metadata_index(tmp_path):
    """A store made before the metadata index gets it on a writer's open (built from its
    documents); a reader of one without it still filters, reading every document."""
    Store.initialise(tmp_path, {"dim": DIM})
    s = Store(tmp_path)
    s.apply([record("a", 2), DocumentRecord("b", "/s", "h", {"lang": "de"}, 10, record("b", 1).chunks,
                                            record("b", 1).vectors)])
    s.close()
    db = sqlite3.connect(tmp_path / STORE_FILE)
    db.execute("DROP TABLE doc_meta")
    db.commit()
    db.close()
    reader = Store(tmp_path, read_only=True)
    assert not reader.meta_index and reader.filter_keys({"lang": "en"}).tolist() == [0, 1]
    reader.close()
    s = Store(tmp_path)
    assert s.meta_index and s.filter_keys({"lang": "de"}).tolist() == [2]
    assert sqlite3.connect(tmp_path / STORE_FILE).execute("SELECT count(*) FROM doc_meta").fetchone()[0] == 2
    s.close()


def stored_then(folder, metadata: list[dict], sql: str) -> None:
    """A store at `folder` of one-chunk documents d0, d1, ... with these metadata, closed,
    then changed by `sql` (what an older version's index looks like)."""
    Store.initialise(folder, {"dim": DIM})
    s = Store(folder)
    s.apply([DocumentRecord(f"d{i}", "/s", "h", meta, 10, record(f"d{i}", 1).chunks, record(f"d{i}", 1).vectors)
             for i, meta in enumerate(metadata)])
    s.close()
    db = sqlite3.connect(folder / STORE_FILE)
    db.executescript(sql)
    db.close()


def test_metadata_index_without_numbers_is_rebuilt(tmp_path):
    """A store whose metadata index predates ranges (no numbers, no long-value table) is
    rebuilt on a writer's open; a reader of one filters by reading the documents."""
    stored_then(tmp_path, [{"year": 2019 + i, "t": "w" * (250 + 10 * i)} for i in range(3)],
                "DROP TABLE doc_meta; DROP TABLE doc_meta_long; CREATE TABLE doc_meta (field TEXT NOT NULL, "
                "value TEXT NOT NULL, doc_id TEXT NOT NULL, PRIMARY KEY (field, value, doc_id)) WITHOUT ROWID;"
                "INSERT INTO doc_meta VALUES ('year', '2019', 'd0');")
    reader = Store(tmp_path, read_only=True)
    assert not reader.meta_index and reader.filter_documents({"year": {"$gte": 2020}}) == ["d1", "d2"]
    reader.close()
    s = Store(tmp_path)
    assert s.meta_index and s.filter_documents({"year": {"$gte": 2020}}) == ["d1", "d2"]
    db = sqlite3.connect(tmp_path / STORE_FILE)
    assert db.execute("SELECT count(*) FROM doc_meta WHERE num IS NOT NULL").fetchone()[0] == 3
    assert db.execute("SELECT doc_id FROM doc_meta_long").fetchall() == [("d1",), ("d2",)]  # 260, 270 chars
    db.close()
    assert s.filter_documents({"t": {"$gt": "w" * 252}}) == ["d1", "d2"]
    s.close()


def found_alike(store, metadata: list[dict], filter, docs: list[int]) -> None:
    """One-chunk documents d0, d1, ... with these metadata: `filter` matches documents `docs`
    (indexes into `metadata`) by `matches`, through the metadata index and by reading every
    document."""
    store.apply([DocumentRecord(f"d{i}", "/s", "h", meta, 2, record(f"d{i}", 1, seed=i).chunks,
                                record(f"d{i}", 1, seed=i).vectors) for i, meta in enumerate(metadata)])
    assert [i for i, meta in enumerate(metadata) if matches(meta, check_filter(filter))] == docs
    for indexed in (True, False):
        store.meta_index = indexed
        assert sorted(store.filter_documents(filter)) == [f"d{i}" for i in docs]
        assert store.filter_keys(filter).tolist() == docs


NESTED = [  # nested objects: paths, a top-level key that shadows one, too deep, a dot inside a key
    {"author": {"name": "Ann", "born": 1970, "tags": ["x"]}, "lang": "en"},
    {"author": {"name": "Bob", "born": 1985, "address": {"city": "Oslo"}}},
    {"author.name": "Top", "author": {"name": "Shadowed"}},
    {"author": "plain"}, {"author": {"name": None}},
    {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}},
    {"x": {"y.z": 1}}, {"author": {"name": "w" * 300}}, {},
]


@pytest.mark.parametrize("filter,docs", [
    ({"author.name": "Ann"}, [0]), ({"author.name": "Top"}, [2]), ({"author.name": "Shadowed"}, []),
    ({"author.born": {"$gte": 1980}}, [1]), ({"author.address.city": "Oslo"}, [1]),
    ({"author.address": {"city": "Oslo"}}, [1]), ({"author.tags": '["x"]'}, [0]),
    ({"author.name": {"$ne": "Ann"}}, [1, 2, 3, 4, 5, 6, 7, 8]), ({"author.name": None}, [3, 4, 5, 6, 8]),
    ({"author.name": {"$in": ["Bob", "Top"]}}, [1, 2]), ({"a.b.c.d.e.f.g.h": {"i": 1}}, [5]),
    ({"a.b.c.d.e.f.g.h.i": 1}, []), ({"x.y.z": 1}, []), ({"author.name": {"$gt": "w"}}, [7]),
    ({"$or": [{"author.name": "Bob"}, {"lang": "en"}]}, [0, 1]), ({"author": "plain"}, [3]),
    ({"author.name.first": "Ann"}, []), ({"author.born": {"$lt": 2000}, "lang": {"$ne": "fr"}}, [0, 1]),
])
def test_dotted_fields_reach_into_nested_objects(store, filter, docs):
    """A dotted field name is a path into nested objects where no top-level key has that
    name; through the index as by reading every document (`matches`)."""
    found_alike(store, NESTED, filter, docs)


def test_metadata_index_without_paths_gets_them(tmp_path):
    """A store whose metadata index predates dotted paths (version 1: top-level fields only)
    gets the paths' rows on a writer's open; a reader of one filters by reading documents."""
    stored_then(tmp_path, NESTED, "DELETE FROM doc_meta WHERE field LIKE '%.%' AND field != 'author.name';"
                                  "DELETE FROM doc_meta_long WHERE field LIKE '%.%';"
                                  "DELETE FROM meta WHERE key = 'meta_index_version';")
    reader = Store(tmp_path, read_only=True)
    assert not reader.meta_index and reader.filter_documents({"author.address.city": "Oslo"}) == ["d1"]
    reader.close()
    s = Store(tmp_path)
    assert s.meta_index and s.filter_documents({"author.address.city": "Oslo"}) == ["d1"]
    assert s.filter_documents({"author.name": {"$gt": "w"}}) == ["d7"] and s.filter_documents({"author.name": "Top"}) \
        == ["d2"]
    db = sqlite3.connect(tmp_path / STORE_FILE)
    assert db.execute("SELECT count(*) FROM doc_meta WHERE field = 'author.name'").fetchone()[0] == 3  # Ann Bob Top
    db.close()
    s.close()


LISTS = [  # list values: strings and numbers, a scalar, null and long elements, a list and an
    # object as elements, an empty list, a string that reads as a list, a list in a nested object
    {"tags": ["news", "eu", "news"]}, {"tags": ["sport", 2020, None]}, {"tags": "news"},
    {"tags": ["w" * 300, "eu"]}, {"tags": [["a", "b"], {"k": 1}]}, {"tags": []}, {"tags": '["a", "b"]'},
    {"meta": {"tags": ["eu", "x"]}}, {"tags": None}, {},
    # paths into the objects of a list (10), through an object (11), not into a list of lists (12)
    {"authors": [{"name": "Ann", "tags": ["x", "y"]}, {"name": "Bob", "tags": "z"}, 3, {"name": None}]},
    {"authors": {"name": "Ann"}}, {"authors": [[{"name": "Ann"}]]},
]


@pytest.mark.parametrize("filter,docs", [
    ({"tags": {"$contains": "news"}}, [0, 2]), ({"tags": {"$contains": ["news", "eu"]}}, [0]),
    ({"tags": {"$contains": "eu"}}, [0, 3]), ({"tags": {"$contains": 2020}}, [1]),
    ({"tags": {"$contains": "2020"}}, [1]),
    ({"tags": {"$contains_any": ["sport", "eu"]}}, [0, 1, 3]), ({"tags": {"$contains_any": ["news", "eu"]}}, [0, 2, 3]),
    ({"tags": {"$contains": "w" * 300}}, [3]),
    ({"tags": {"$contains": [["a", "b"]]}}, [4, 6]),  # compared as JSON text, as $eq does
    ({"tags": {"$contains": {"k": 1}}}, [4]), ({"tags": {"$contains": '["a", "b"]'}}, [4, 6]),
    ({"meta.tags": {"$contains": "eu"}}, [7]), ({"tags": {"$contains": "zz"}}, []),
    ({"tags": {"$contains": "news"}, "$or": [{"tags": {"$contains": "eu"}}, {"tags": "news"}]}, [0, 2]),
    ({"tags": {"$contains_any": ["eu", "sport"], "$contains": "news"}}, [0]),
    ({"tags": {"$contains": "eu", "$ne": '["news", "eu", "news"]'}}, [3]),
    ({"tags": {"$contains": "news"}, "meta.tags": {"$contains": "x"}}, []),
    ({"authors.name": {"$contains": "Ann"}}, [10, 11]), ({"authors.name": '["Ann", "Bob", null]'}, [10]),
    ({"authors.name": "Ann"}, [11]), ({"authors.tags": {"$contains": ["x", "z"]}}, [10]),
    ({"authors.tags": {"$contains_any": ["y", "q"]}}, [10]), ({"authors.name": {"$in": ["Ann", "Bob"]}}, [11]),
    ({"authors.name": {"$contains": "Bob"}, "authors.tags": {"$contains": "y"}}, [10]),
])
def test_list_fields_hold_their_elements(store, filter, docs):
    """$contains / $contains_any find a list's elements (a value that is not a list counts as
    a list of itself), through the index as by reading every document (`matches`)."""
    found_alike(store, LISTS, filter, docs)


def test_metadata_index_without_list_elements_gets_them(tmp_path):
    """A store whose metadata index predates list elements (version 2) gets them on a
    writer's open; a reader of one filters by reading documents meanwhile."""
    stored_then(tmp_path, LISTS, "DROP VIEW doc_meta_any; DROP TABLE doc_meta_item;"
                                 "UPDATE meta SET value = '2' WHERE key = 'meta_index_version';")
    reader = Store(tmp_path, read_only=True)
    assert not reader.meta_index and reader.filter_documents({"tags": {"$contains": "eu"}}) == ["d0", "d3"]
    reader.close()
    s = Store(tmp_path)
    assert s.meta_index and s.filter_documents({"tags": {"$contains": "eu"}}) == ["d0", "d3"]
    db = sqlite3.connect(tmp_path / STORE_FILE)
    assert db.execute("SELECT count(*) FROM doc_meta_item WHERE doc_id = 'd0'").fetchone()[0] == 2  # news, eu
    db.close()
    s.close()


def test_filter_keys_follow_writes(store):
    a, b = record("a", 3), record("b", 2)
    store.apply([a, DocumentRecord("b", b.source, "h", {"lang": "de"}, b.n_chars, b.chunks, b.vectors)])
    assert store.filter_keys({"lang": "en"}).tolist() == [0, 1, 2]
    store.apply([], deletes=["a"])
    assert store.filter_keys({"lang": "en"}).tolist() == []
    assert store.filter_keys({"lang": "de"}).tolist() == [3, 4]


def test_lexical_search_among_allowed_chunks(store, monkeypatch):
    """Ranked among some chunks only, the lexical search keeps the order and scores of the
    whole ranking, filtered, however many pages of it that takes."""
    from engine import lexical
    words = ["tea", "green", "water", "leaf", "pot"]
    recs = [DocumentRecord(f"d{i}", "/s", "h", {}, 10,
                           [Chunk(f"d{i}", 0, 0, 9, 3, " ".join(words[j % 5] for j in range(i % 7 + 1)))],
                           np.ones((1, DIM), np.float32)) for i in range(60)]
    store.apply(recs)
    full_keys, full_scores = store.fts.search(["green tea pot"], 1000)[0]
    allowed = np.array(sorted(full_keys[1::3].tolist() + [10_000]), np.int64)  # a key no chunk has
    for page in (1024, 2):
        monkeypatch.setattr(lexical, "FILTER_PAGE_ROWS", page)
        keys, scores = store.fts.search(["green tea pot"], 5, allowed=allowed)[0]
        keep = np.isin(full_keys, allowed)
        assert keys.tolist() == full_keys[keep][:5].tolist()
        np.testing.assert_array_equal(scores, full_scores[keep][:5])
    assert store.fts.search(["green tea"], 5, allowed=np.empty(0, np.int64))[0][0].size == 0


def test_export_gives_whole_documents_in_key_order(store):
    """export: every live document once, whole (all its chunks, their vectors as stored),
    in the order of its chunks' keys, whatever the batch size; replaced and deleted ones not."""
    store.apply([record(f"d{i}", 1 + i % 3, seed=i, h=f"h{i}") for i in (5, 1, 4, 2, 0, 3)])
    store.apply([record("d4", 2, seed=40, h="new")], deletes=["d2"])  # d4 replaced: its keys come last now
    vectors = store.vectors()
    for batch in (1, 2, 4, 100):
        got = [r for part in store.export(batch) for r in part]
        assert [r.doc_id for r in got] == ["d5", "d1", "d0", "d3", "d4"]
        for r in got:
            keys = store.document_keys(r.doc_id)
            assert [c.ordinal for c in r.chunks] == list(range(len(keys)))
            assert np.array_equal(r.vectors, np.asarray(vectors[keys]))
            assert r.content_hash == ("new" if r.doc_id == "d4" else f"h{r.doc_id[1:]}")
