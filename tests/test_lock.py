"""One writer per collection (engine/lock.py, engine/collection.py): a second writer is refused
at once with a typed, one-line error naming the holder; readers work beside a writer and see
its acknowledged writes; a SIGKILLed holder's lock is gone at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.documents import Document
from engine.errors import FailedPrecondition
from engine.lock import LOCK_FILE, WriterBusy, WriterLock, read_holder
from engine.pipeline import Engine
from server.client import RagClient
from serverproc import REPO, free_port, start_server

CORPUS = REPO / "examples" / "corpus"


def docs(prefix: str, n: int) -> list[Document]:
    return [Document(f"{prefix}{i}", f"{prefix} document {i} about lanterns and copper kettles", f"{prefix}{i}.txt")
            for i in range(n)]


def rag_cli(data: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", "--data-dir", str(data), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_lock_file_names_its_holder_and_is_released(tmp_path):
    lock = WriterLock.acquire(tmp_path, "c", {"command": "rag serve", "address": "127.0.0.1:7"})
    holder = read_holder(tmp_path)
    assert holder["pid"] == os.getpid() and holder["address"] == "127.0.0.1:7"
    with pytest.raises(WriterBusy, match=r"written by rag serve \(pid \d+.*server's API at 127\.0\.0\.1:7") as e:
        WriterLock.acquire(tmp_path, "c")  # a second open file: flock excludes it in-process too
    assert isinstance(e.value, FailedPrecondition) and e.value.holder["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""
    WriterLock.acquire(tmp_path, "c").release()


def test_second_engine_reads_beside_the_writer_and_writes_once_it_is_gone(tmp_path, config, embedder):
    cfg = config.replace(data_dir=tmp_path)
    first = Engine(cfg, embedder=embedder, owner={"command": "first engine"})
    first.create_collection("c")
    first.ingest("c", docs("a", 3))
    second = Engine(cfg, embedder=embedder)
    with pytest.raises(WriterBusy, match=r"'c' is being written by first engine \(pid \d+"):
        second.ingest("c", docs("b", 2))
    with pytest.raises(WriterBusy):
        second.delete_documents("c", ["a0"])
    with pytest.raises(WriterBusy):
        second.drop_collection("c")
    assert second.describe("c").documents == 3  # reads go through a reader
    first.ingest("c", [Document("late", "a late note about zeppelins over the harbour", "late.txt")])
    assert second.search("c", "zeppelins over the harbour", 1)[0].doc_id == "late", "the reader follows commits"
    assert second.describe("c").documents == 4
    first.close()
    report = second.ingest("c", docs("b", 2))  # the writer is gone: the reader's engine takes over
    assert report.documents_added == 2 and second.describe("c").documents == 6
    second.close()


def test_read_only_engine_refuses_writes_and_recovers_an_unreplayed_log(tmp_path, config, embedder):
    cfg = config.replace(data_dir=tmp_path)
    writer = Engine(cfg, embedder=embedder)
    writer.create_collection("c")
    writer.ingest("c", docs("a", 4))
    for col in writer.collections.opened():  # "crash": no snapshot, the log holds the writes
        col.wal.close()
        col.store.close()
        col.lock.release()
    reader = Engine(cfg.replace(read_only=True), embedder=embedder)
    assert reader.describe("c").documents == 4
    assert reader.collections.get("c").lock is None, "a reader holds no lock"
    with pytest.raises(FailedPrecondition, match="read-only"):
        reader.ingest("c", docs("b", 1))
    with pytest.raises(FailedPrecondition, match="read-only"):
        reader.create_collection("d")
    reader.close()
    again = Engine(cfg, embedder=embedder)
    assert again.describe("c").documents == 4
    again.close()


def test_two_cli_writers_one_refused_with_one_line(tmp_path, config, embedder):
    data = tmp_path / "data"
    eng = Engine(config.replace(data_dir=data), embedder=embedder, owner={"command": "rag ingest"})
    eng.create_collection("c")
    eng.ingest("c", docs("a", 2))  # holds the writer lock, as a long `rag ingest` would
    r = rag_cli(data, "ingest", str(CORPUS), "-c", "c", "-q")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: collection 'c' is being written by rag ingest (pid ")
    assert f"pid {os.getpid()}" in lines[0] and "Wait for it to finish or stop it first" in lines[0]
    # the first writer goes on, and nothing it acknowledged is lost
    eng.ingest("c", docs("b", 2))
    assert eng.describe("c").documents == 4
    # a reader CLI beside it works
    r = rag_cli(data, "search", "copper kettles", "-c", "c", "-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2
    eng.close()


def test_cli_ingest_beside_a_server_names_its_address(tmp_path):
    data = tmp_path / "data"
    port = free_port()
    proc = start_server(data, port, log=tmp_path / "server.log", serve_args=["--lazy-generator"])
    try:
        client = RagClient(f"127.0.0.1:{port}", timeout=120)
        client.create_collection("c")
        client.ingest("c", [{"id": "kettle", "text": "A copper kettle whistles when the water boils."}])
        r = rag_cli(data, "ingest", str(CORPUS), "-c", "c", "-q")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert f"written by rag serve (pid {proc.pid}" in r.stderr
        assert f"Use the server's API at 127.0.0.1:{port}" in r.stderr
        # readers are allowed beside the server, and see what it acknowledged
        r = rag_cli(data, "search", "copper kettle", "-c", "c", "-k", "1", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["doc_id"] == "kettle"
        # the server still writes
        res = client.ingest("c", [{"id": "pot", "text": "A teapot keeps the leaves from the cup."}])
        assert res.results[0].status == 1
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


HOLDER = """
import sys, time
from engine.config import Config
from engine.documents import Document
from engine.pipeline import Engine
eng = Engine(Config(data_dir=sys.argv[1], threads=1))
eng.create_collection("c")
eng.ingest("c", [Document("held", "the holder wrote this before it was killed", "held.txt")])
print("ready", flush=True)
time.sleep(600)
"""


def test_sigkilled_holder_leaves_no_stale_lock(tmp_path, config, embedder):
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(data)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()
        eng = Engine(config.replace(data_dir=data), embedder=embedder)
        with pytest.raises(WriterBusy, match=rf"pid {proc.pid}"):
            eng.ingest("c", docs("x", 1))
        eng.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # at once: there is no retry or timeout anywhere, the lock went with the process
        eng = Engine(config.replace(data_dir=data), embedder=embedder)
        assert eng.ingest("c", docs("x", 1)).documents_added == 1
        assert {h.doc_id for h in eng.search("c", "the holder wrote this", 2)} >= {"held"}
        eng.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
