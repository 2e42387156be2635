"""The write-ahead log (engine/wal.py): records round-trip, torn tails are cut, and a
collection recovers every logged write when its store lost what was not yet synced."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from engine.chunk import Chunk
from engine.errors import InvalidInput
from engine.documents import Document
from engine.pipeline import Engine
from engine.store import DocumentRecord
from engine.wal import FILE_MAGIC, WAL_FILE, WriteAheadLog, encode

DIM = 8


def record(doc_id: str, n: int, rng: np.random.Generator, meta=None) -> DocumentRecord:
    chunks = [Chunk(doc_id, i, i * 10, i * 10 + 9, 3, f"{doc_id} chunk {i} é ✓") for i in range(n)]
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return DocumentRecord(doc_id, f"src/{doc_id}.txt", f"h-{doc_id}", meta or {"k": doc_id}, 10 * n, chunks, v)


def test_records_round_trip(tmp_path, rng):
    wal = WriteAheadLog(tmp_path / WAL_FILE)
    a, b = record("a", 3, rng), record("b", 1, rng, meta={"nested": [1, 2], "t": "ü"})
    assert wal.append(encode(0, [a, b], [], DIM)) == 1
    assert wal.append(encode(4, [], ["a", "zzz"], DIM)) == 2
    wal.close()
    wal = WriteAheadLog(tmp_path / WAL_FILE)
    recs = list(wal.records())
    assert [r.seq for r in recs] == [1, 2] and wal.last_seq == 2 and wal.dropped_bytes == 0
    r1, r2 = recs
    assert r1.first_key == 0 and [d.doc_id for d in r1.upserts] == ["a", "b"]
    for got, want in zip(r1.upserts, [a, b]):
        assert (got.source, got.content_hash, got.metadata, got.n_chars) == \
            (want.source, want.content_hash, want.metadata, want.n_chars)
        assert got.chunks == list(want.chunks)
        np.testing.assert_array_equal(got.vectors, want.vectors)  # bit for bit
    assert r2.first_key == 4 and r2.upserts == [] and r2.deletes == ["a", "zzz"]
    assert [r.seq for r in wal.records(after_seq=1)] == [2]
    wal.close()


@pytest.mark.parametrize("damage", ["cut_payload", "cut_header", "flip_byte", "garbage"])
def test_torn_last_record_is_dropped(tmp_path, rng, damage, caplog):
    path = tmp_path / WAL_FILE
    wal = WriteAheadLog(path)
    for i in range(3):
        wal.append(encode(i * 2, [record(f"d{i}", 2, rng)], [], DIM))
    good_end = wal.size_bytes()
    wal.append(encode(6, [record("torn", 2, rng)], [], DIM))
    wal.close()
    data = bytearray(path.read_bytes())
    if damage == "cut_payload":
        data = data[:-7]
    elif damage == "cut_header":
        data = data[:good_end + 11]
    elif damage == "flip_byte":
        data[-20] ^= 0x40
    else:
        data = data[:good_end] + b"\x00\xffnot a record"
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        wal = WriteAheadLog(path)
    assert wal.last_seq == 3 and wal.dropped_bytes > 0
    assert "torn" in caplog.text
    assert path.stat().st_size == good_end, "the torn tail is cut from the file"
    assert [r.upserts[0].doc_id for r in wal.records()] == ["d0", "d1", "d2"]
    assert wal.append(encode(6, [record("next", 1, rng)], [], DIM)) == 4
    wal.close()
    assert [r.seq for r in WriteAheadLog(path).records()] == [1, 2, 3, 4]


def test_undo_reset_and_numbering(tmp_path, rng):
    path = tmp_path / WAL_FILE
    wal = WriteAheadLog(path, fsync="interval", interval_ms=50)
    wal.append(encode(0, [record("a", 1, rng)], [], DIM))
    seq = wal.append(encode(1, [record("b", 1, rng)], [], DIM))
    wal.undo_last(seq)
    assert wal.last_seq == 1 and [r.seq for r in wal.records()] == [1]
    with pytest.raises(ValueError):
        wal.undo_last(5)
    wal.reset()
    assert wal.empty and path.read_bytes() == FILE_MAGIC
    assert wal.append(encode(1, [], ["a"], DIM)) == 2, "numbering goes on after a reset"
    wal.close()


def test_bad_policy_and_foreign_file(tmp_path):
    with pytest.raises(InvalidInput, match="fsync policy"):
        WriteAheadLog(tmp_path / WAL_FILE, fsync="sometimes")
    (tmp_path / "x.log").write_bytes(b"hello world, not a log")
    with pytest.raises(InvalidInput, match="not a write-ahead log"):
        WriteAheadLog(tmp_path / "x.log")


def docs(prefix: str, n: int) -> list[Document]:
    return [Document(f"{prefix}{i}", f"{prefix} document {i}: the {prefix} archive holds record number {i}. " * 6,
                     f"{prefix}{i}.txt") for i in range(n)]


def keys_agree(eng: Engine, name: str) -> None:
    col = eng.collections.get(name)
    np.testing.assert_array_equal(np.sort(col.index.keys()), col.store.keys())


def test_replay_restores_writes_the_store_lost(tmp_path, config, embedder):
    """Power loss after acknowledging: the store files fall back to the last snapshot, the
    synced log still holds the later writes, and opening the collection replays them."""
    cfg = config.replace(data_dir=tmp_path)
    eng = Engine(cfg, embedder=embedder)
    eng.create_collection("c")
    eng.ingest("c", docs("old", 12))
    eng.save()  # snapshot: store + index synced, log emptied
    folder = tmp_path / "collections" / "c"
    assert (folder / WAL_FILE).read_bytes() == FILE_MAGIC
    backup = tmp_path / "snapshot"
    backup.mkdir()
    for f in ("store.sqlite", "vectors.f32", "index.usearch", "index.json"):
        shutil.copy2(folder / f, backup / f)
    eng.ingest("c", docs("new", 7))
    eng.ingest("c", [Document("old3", "old3 was rewritten: a changed text about lighthouses " * 5, "old3.txt")])
    assert eng.delete_documents("c", ["old5", "old6"]) == 2
    want = {h.doc_id for h in eng.search("c", "new document 4 archive", 3)}
    # Simulated power loss: nothing after the snapshot reached the store files.
    for col in eng.collections.opened():
        col.wal.close()
        col.store.close()
        col.lock.release()  # the process "died": the OS drops its lock
    for f in backup.iterdir():
        shutil.copy2(f, folder / f.name)
    for f in ("store.sqlite-wal", "store.sqlite-shm"):
        (folder / f).unlink(missing_ok=True)

    eng2 = Engine(cfg, embedder=embedder)
    info = eng2.describe("c")
    assert eng2.collections.get("c").replayed == 3
    assert info.documents == 12 + 7 - 2
    assert {h.doc_id for h in eng2.search("c", "new document 4 archive", 3)} == want
    assert eng2.search("c", "rewritten text about lighthouses", 1)[0].doc_id == "old3"
    col = eng2.collections.get("c")
    assert not col.store.has_document("old5") and not col.store.has_document("old6")
    keys_agree(eng2, "c")
    eng2.close()
    # Replaying again (the log is emptied by close's snapshot) changes nothing.
    eng3 = Engine(cfg, embedder=embedder)
    assert eng3.describe("c").documents == 17 and eng3.collections.get("c").replayed == 0
    eng3.close()


def test_replay_is_idempotent_over_an_up_to_date_store(tmp_path, config, embedder):
    """After a process crash the store already holds the logged writes; replaying them
    rewrites the same keys and rows: same documents, same vectors, no new keys."""
    cfg = config.replace(data_dir=tmp_path)
    eng = Engine(cfg, embedder=embedder)
    eng.create_collection("c")
    eng.ingest("c", docs("a", 5))
    eng.ingest("c", docs("b", 5))
    eng.delete_documents("c", ["a1"])
    col = eng.collections.get("c")
    keys, vecs = col.store.keys(), np.array(col.store.vectors())
    next_key = col.store.next_key
    for c in eng.collections.opened():  # crash: no snapshot
        c.wal.close()
        c.store.close()
        c.lock.release()  # the process "died": the OS drops its lock
    eng2 = Engine(cfg, embedder=embedder)
    col2 = eng2.collections.get("c")
    assert col2.replayed == 3
    np.testing.assert_array_equal(col2.store.keys(), keys)
    assert col2.store.next_key == next_key
    np.testing.assert_array_equal(np.asarray(col2.store.vectors())[keys], vecs[keys])
    keys_agree(eng2, "c")
    eng2.close()


def test_torn_record_in_a_collection_log(tmp_path, config, embedder):
    cfg = config.replace(data_dir=tmp_path)
    eng = Engine(cfg, embedder=embedder)
    eng.create_collection("c")
    eng.ingest("c", docs("a", 4))
    for c in eng.collections.opened():
        c.wal.close()
        c.store.close()
        c.lock.release()  # the process "died": the OS drops its lock
    with open(tmp_path / "collections" / "c" / WAL_FILE, "ab") as f:
        f.write(b"RWR1\x05\x00\x00\x00")  # a crash in the middle of the next record's header
    eng2 = Engine(cfg, embedder=embedder)
    assert eng2.describe("c").documents == 4
    assert eng2.collections.get("c").wal.dropped_bytes == 8
    eng2.ingest("c", docs("b", 2))
    assert eng2.describe("c").documents == 6
    keys_agree(eng2, "c")
    eng2.close()


def test_failed_apply_takes_its_log_record_back(tmp_path, config, embedder, monkeypatch):
    cfg = config.replace(data_dir=tmp_path)
    eng = Engine(cfg, embedder=embedder)
    eng.create_collection("c")
    eng.ingest("c", docs("a", 3))
    col = eng.collections.get("c")
    seq = col.wal.last_seq

    def disk_full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(col.store, "apply", disk_full)
    with pytest.raises(OSError, match="No space"):
        eng.ingest("c", docs("b", 2))
    monkeypatch.undo()
    assert col.wal.last_seq == seq
    for c in eng.collections.opened():
        c.wal.close()
        c.store.close()
        c.lock.release()  # the process "died": the OS drops its lock
    eng2 = Engine(cfg, embedder=embedder)
    assert eng2.describe("c").documents == 3, "the failed write is not replayed"
    eng2.close()
