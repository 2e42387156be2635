"""Crash safety: SIGKILL the server while it ingests (and snapshots), restart, and find every
acknowledged document; interrupt an index save and find the collection whole.

RAG_CRASH_ROUNDS (default 4) sets how many kill/restart rounds run; `make soak` runs many.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from engine.documents import Document
from engine.pipeline import Engine
from engine.filters import meta_rows
from server.client import RagClient
from serverproc import free_port, start_server

ROUNDS = int(os.environ.get("RAG_CRASH_ROUNDS", "4"))
SNAPSHOT_WAL_BYTES = 96 * 1024
WORDS = ("river stone cloud engine lantern copper orchard violin glacier harbor meadow quartz falcon "
         "tunnel saddle pepper marble canyon ember willow beacon thistle compass velvet garnet").split()


def start(data_dir: Path, port: int) -> subprocess.Popen:
    # A small log threshold makes the server snapshot every few ingests, so kills also land
    # in the middle of snapshots (counted by the crash test from the temp files left behind).
    return start_server(data_dir, port, log=data_dir.parent / "server.log", timeout=120,
                        global_args=["--threads", "1", "--snapshot-wal-bytes", str(SNAPSHOT_WAL_BYTES)],
                        serve_args=["--lazy-generator"])


def make_doc(rng: random.Random, name: str) -> dict:
    return {"id": name, "text": f"{name}: " + " ".join(rng.choice(WORDS) for _ in range(60)),
            "metadata": {"doc": name, "round": name.split("-")[0]}}


def check_acknowledged(client: RagClient, acked: dict[str, str]) -> None:
    """Every acknowledged document is stored and is its own nearest neighbour."""
    ids = sorted(acked)
    misses = []
    for i in range(0, len(ids), 64):
        part = ids[i:i + 64]
        # Dense: a document's own text is its nearest neighbour (cosine 1); hybrid fusion
        # could rank look-alike word soups above it, which would say nothing about loss.
        results = client.search_batch("c", [acked[d] for d in part], k=3, mode="dense")
        misses += [doc_id for doc_id, hits in zip(part, results) if doc_id not in [h.doc_id for h in hits]]
    # HNSW is approximate and may miss a document it holds among look-alikes (tests/test_load.py
    # `missed`); exact mode scores every stored vector, so a document it misses is lost.
    results = client.search_batch("c", [acked[d] for d in misses], k=3, mode="exact") if misses else []
    for doc_id, hits in zip(misses, results):
        assert doc_id in [h.doc_id for h in hits], f"acknowledged document {doc_id} lost"
    assert len(misses) <= max(3, len(ids) // 100), f"HNSW missed {len(misses)} of {len(ids)} own texts"
    # and through the metadata index: a filter on a document's own metadata finds it (a sample)
    for doc_id in random.Random(len(ids)).sample(ids, min(64, len(ids))):
        hits = client.search("c", acked[doc_id], k=2, filter={"doc": doc_id})
        assert [h.doc_id for h in hits] == [doc_id], f"acknowledged document {doc_id} missing from its filter"


def check_consistent(data_dir: Path, config) -> None:
    """Store and index hold the same chunk keys; every stored document has all its chunks."""
    eng = Engine(config.replace(data_dir=data_dir))
    col = eng.collections.get("c")
    store_keys = col.store.keys()
    np.testing.assert_array_equal(np.sort(col.index.keys()), store_keys)
    db = sqlite3.connect(data_dir / "collections" / "c" / "store.sqlite")
    bad = db.execute("SELECT d.doc_id FROM documents d LEFT JOIN chunks c ON c.doc_id = d.doc_id "
                     "GROUP BY d.doc_id HAVING COUNT(c.key) != MAX(d.n_chunks)").fetchall()
    # the metadata index holds exactly the stored documents' metadata
    indexed = (set(db.execute("SELECT field, value, doc_id, num FROM doc_meta").fetchall()),
               set(db.execute("SELECT field, doc_id FROM doc_meta_long").fetchall()),
               set(db.execute("SELECT field, value, doc_id FROM doc_meta_item").fetchall()))
    stored = set(), set(), set()
    for doc_id, meta in db.execute("SELECT doc_id, metadata FROM documents"):
        for have, rows in zip(stored, meta_rows(doc_id, json.loads(meta))):
            have.update(rows)
    db.close()
    assert not bad, f"half-written documents: {bad[:5]}"
    assert indexed == stored, f"metadata index off by {sum(len(i ^ s) for i, s in zip(indexed, stored))} rows"
    eng.close()


def test_sigkill_never_loses_acknowledged_documents(tmp_path, config):
    rng = random.Random(1234)
    data = tmp_path / "data"
    port = free_port()
    acked: dict[str, str] = {}
    kills = mid_snapshot = 0
    proc = start(data, port)
    RagClient(f"127.0.0.1:{port}", timeout=60).create_collection("c")
    try:
        for r in range(ROUNDS):
            client = RagClient(f"127.0.0.1:{port}", timeout=60)
            check_acknowledged(client, acked)
            stop = threading.Event()

            def ingest_loop(r=r, client=client):
                n = 0
                while not stop.is_set():
                    docs = [make_doc(rng, f"r{r}-d{n + i}") for i in range(rng.randint(1, 12))]
                    n += len(docs)
                    try:
                        res = client.ingest("c", docs, timeout=60)
                    except grpc.RpcError:
                        return  # not acknowledged: may or may not be there, never half
                    for d, result in zip(docs, res.results):
                        assert result.status in (1, 2, 3), result.error
                        acked[d["id"]] = d["text"]

            t = threading.Thread(target=ingest_loop)
            t.start()
            time.sleep(rng.uniform(0.5, 3.0))
            proc.kill()  # SIGKILL: no shutdown hook runs
            proc.wait()
            kills += 1
            folder = data / "collections" / "c"
            if any(p.name.endswith(".tmp") for p in folder.iterdir()):
                mid_snapshot += 1
            stop.set()
            t.join(timeout=60)
            client.close()
            proc = start(data, port)
        client = RagClient(f"127.0.0.1:{port}", timeout=60)
        check_acknowledged(client, acked)
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    check_consistent(data, config)
    print(f"\ncrash test: rounds {ROUNDS}, kills {kills} ({mid_snapshot} with a snapshot half-written), "
          f"documents acknowledged {len(acked)}, lost 0")
    assert len(acked) > 0


def test_interrupted_index_save_leaves_collection_whole(tmp_path, config, embedder, monkeypatch):
    eng = Engine(config.replace(data_dir=tmp_path), embedder=embedder)
    eng.create_collection("c")
    eng.ingest("c", [Document(f"d{i}", f"text number {i} " * 20,
                                                                                  f"d{i}") for i in range(30)])
    eng.save()
    eng.ingest("c", [Document("late", "a late document " * 20,
                                                                                  "late")])
    real_replace = os.replace

    def crash_on_index(src, dst):
        if str(dst).endswith("index.usearch"):
            raise OSError("simulated crash between writing the snapshot and renaming it")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_index)
    with pytest.raises(OSError, match="simulated crash"):
        eng.save()
    monkeypatch.setattr(os, "replace", real_replace)
    folder = tmp_path / "collections" / "c"
    assert (folder / "index.usearch.tmp").exists(), "the half-written snapshot is left behind, unused"
    for col in eng.collections.opened():
        col.store.close()
        col.lock.release()  # the process "died": the OS drops its lock
    eng2 = Engine(config.replace(data_dir=tmp_path), embedder=embedder)
    assert eng2.describe("c").chunks == 31
    assert eng2.search("c", "a late document", 1)[0].doc_id == "late"
    check_consistent(tmp_path, config)
    eng2.close()


KILL_CHILD = r'''
import os, signal, sys
from pathlib import Path
from engine.config import Config
from engine.documents import Document
from engine.pipeline import Engine

data, target = Path(sys.argv[1]), sys.argv[2]
eng = Engine(Config(data_dir=data, threads=1))
eng.create_collection("c")
eng.ingest("c", [Document(f"a{i}", f"first batch document {i} about harbors " * 8, f"a{i}") for i in range(20)])
eng.save()
eng.ingest("c", [Document(f"b{i}", f"second batch document {i} about glaciers " * 8, f"b{i}") for i in range(15)])
eng.delete_documents("c", ["a0", "a1"])
print("acknowledged", flush=True)
real_replace = os.replace

def replace(src, dst):
    if Path(dst).name == target:  # SIGKILL at this exact point of the snapshot
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

os.replace = replace
eng.save()
print("snapshot finished", flush=True)
'''


@pytest.mark.parametrize("target", ["index.usearch", "index.json", "wal.log"])
def test_sigkill_during_snapshot(tmp_path, config, embedder, target):
    """A real SIGKILL at each rename of a snapshot: nothing acknowledged is lost."""
    out = subprocess.run([sys.executable, "-c", KILL_CHILD, str(tmp_path), target], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert out.returncode == -9, out.stderr[-2000:]
    assert "acknowledged" in out.stdout and "snapshot finished" not in out.stdout
    folder = tmp_path / "collections" / "c"
    assert any(p.name.endswith(".tmp") for p in folder.iterdir()), "the kill came mid-snapshot"
    eng = Engine(config.replace(data_dir=tmp_path), embedder=embedder)
    info = eng.describe("c")
    assert info.documents == 20 + 15 - 2
    for i in (0, 7, 14):
        hits = eng.search("c", f"second batch document {i} about glaciers " * 8, 5)
        assert f"b{i}" in [h.doc_id for h in hits]
    col = eng.collections.get("c")
    assert not col.store.has_document("a0")
    np.testing.assert_array_equal(np.sort(col.index.keys()), col.store.keys())
    eng.close()


def test_server_snapshots_on_a_timer(tmp_path, config, embedder):
    """A server whose writes stop still snapshots: its log is emptied without a restart."""
    from server.app import create_server

    eng = Engine(config.replace(data_dir=tmp_path, snapshot_interval_s=0.3, warm_generator=False), embedder=embedder)
    srv, port = create_server(eng.config, "127.0.0.1:0", engine=eng)
    try:
        client = RagClient(f"127.0.0.1:{port}", timeout=60)
        client.create_collection("c")
        client.ingest("c", [{"id": "a", "text": "a document about lanterns and copper"}])
        log = tmp_path / "collections" / "c" / "wal.log"
        deadline = time.time() + 30
        while log.stat().st_size > len(b"RAGWAL1\n") and time.time() < deadline:
            time.sleep(0.1)
        assert log.stat().st_size == len(b"RAGWAL1\n"), "the log was not emptied by a timed snapshot"
        assert (tmp_path / "collections" / "c" / "index.usearch").exists()
        client.close()
    finally:
        srv.stop(0)
