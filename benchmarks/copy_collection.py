"""What does a backup (or a copy) of a collection cost, against rebuilding it from its documents?

`rag copy` / `Engine.copy_collection` copies a collection's stored documents, chunks and
vectors (one read transaction, whole documents in key order) into a new collection, here or
in another data dir; nothing is embedded again. The alternative a user has without it is to
keep the source files and ingest them again (or to stop the writer and copy the folder).

Corpus: SQuAD v1.1 dev paragraphs, one Document each (2,067 by default), ingested into a
collection. Then, in the same process on the same documents:
  ours      Engine.copy_collection into another data dir (a backup); and `rag export`'s
            backup file written, then `rag import`ed into a new collection
  baseline  Engine.ingest of the same Document objects into a new collection (a rebuild:
            parse done, chunking and embedding not)
Printed: seconds and chunks/s each, the ratio baseline / ours, and whether the two hold the
same chunks with the same vectors (the copy's equal to the source's bit for bit). One JSON
line per system to bench-results/copy_collection.jsonl.

Then over gRPC (a real server in this process, on the same engine, a client on localhost;
skip with --no-grpc):
  ours      download: `rag copy --server --to`'s path, ExportCollection built into a data
            dir here (a backup off the server); upload: `--from`'s, ImportCollection of
            that backup to the server (a restore)
  baseline  IngestStream of the same documents to the server (what a remote user does
            without them: send the documents again, embedded again there)

    .venv/bin/python benchmarks/copy_collection.py            # ~1-2 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SQUAD, cpu_name, log_jsonl, squad_paragraphs  # noqa: E402


def vectors_by_chunk(engine, name: str) -> dict:
    col = engine.collections.get(name)
    vectors = col.store.vectors()
    return {(r.doc_id, r.ordinal, r.text): np.array(vectors[k]) for k, r in col.store.chunks(col.store.keys()).items()}


def run(args: argparse.Namespace) -> None:
    from engine.config import Config
    from engine.documents import Document
    from engine.pipeline import Engine
    from server import backup as backup_file
    from server.convert import export_messages

    docs = [Document(f"p{i}", p["text"], p["title"], {"title": p["title"]})
            for i, p in enumerate(squad_paragraphs(SQUAD, args.paragraphs))]
    cpu = cpu_name()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(Config(data_dir=Path(tmp) / "data"))
        engine.create_collection("src")
        r = engine.ingest("src", docs)
        chunks = r.chunks_added
        print(f"source: {len(docs)} documents, {chunks} chunks", flush=True)
        results = {}
        t0 = time.perf_counter()
        engine.copy_collection("src", "backup", data_dir=Path(tmp) / "backup")
        results["ours"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        size = backup_file.write(Path(tmp) / "src.rag", export_messages(*engine.export_collection("src")))
        results["ours export to a file"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.import_collection("from-file", *backup_file.read(Path(tmp) / "src.rag"))
        results["ours import the file"] = time.perf_counter() - t0
        print(f"backup file: {size / 1e6:.1f} MB", flush=True)
        engine.create_collection("rebuilt")
        t0 = time.perf_counter()
        engine.ingest("rebuilt", docs)
        results["baseline"] = time.perf_counter() - t0
        for system, seconds in results.items():
            what = {"ours": "copy_collection (a backup)", "baseline": "ingest again (a rebuild)"}.get(system, "")
            print(f"{system:22s} {what:28s} {seconds:7.2f} s  {chunks / seconds:9.0f} chunks/s", flush=True)
            log_jsonl("copy_collection", {"system": system, "seconds": seconds, "documents": len(docs),
                                          "chunks": chunks, "cpu": cpu})
        print(f"ours {results['baseline'] / results['ours']:.1f}x faster than rebuilding", flush=True)
        trip = results["ours export to a file"] + results["ours import the file"]
        print(f"ours through a file (export, then import: {trip:.2f} s) {results['baseline'] / trip:.1f}x faster "
              "than rebuilding", flush=True)
        backup = Engine(Config(data_dir=Path(tmp) / "backup"), embedder=engine.embedder)
        src, copy = vectors_by_chunk(engine, "src"), vectors_by_chunk(backup, "backup")
        same = src.keys() == copy.keys() and all(np.array_equal(src[c], copy[c]) for c in src)
        print(f"the backup holds the source's {len(src)} chunks with the same vectors: {same}")
        got = vectors_by_chunk(engine, "from-file")
        same = src.keys() == got.keys() and all(np.array_equal(src[c], got[c]) for c in src)
        print(f"the collection imported from the file holds them with the same vectors: {same}")
        if args.grpc:
            over_grpc(engine, docs, chunks, backup, Path(tmp), cpu, src)
        backup.close()
        engine.close()


def over_grpc(engine, docs, chunks: int, backup, tmp: Path, cpu: str, src: dict) -> None:
    from engine.collection import Collections
    from engine.pipeline import Engine
    from server.app import create_server
    from server.client import RagClient

    srv, port = create_server(engine.config, "127.0.0.1:0", engine=engine)
    try:
        with RagClient(f"127.0.0.1:{port}") as client:
            times = {}
            t0 = time.perf_counter()
            here = Collections(engine.config.replace(data_dir=tmp / "downloaded"))
            here.receive("src", *client.export_collection("src"))
            here.close()
            times["ours download"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            client.import_collection("uploaded", *backup.export_collection("backup"))
            times["ours upload"] = time.perf_counter() - t0
            client.create_collection("reingested")
            t0 = time.perf_counter()
            client.ingest("reingested", ({"id": d.doc_id, "text": d.text, "source": d.source, "metadata": d.metadata}
                                         for d in docs))
            times["baseline"] = time.perf_counter() - t0
    finally:
        srv.stop(0)
    for system, seconds in times.items():
        print(f"grpc {system:14s} {seconds:7.2f} s  {chunks / seconds:9.0f} chunks/s", flush=True)
        log_jsonl("copy_collection", {"system": f"grpc {system}", "seconds": seconds, "documents": len(docs),
                                      "chunks": chunks, "cpu": cpu})
    for system in ("ours download", "ours upload"):
        print(f"{system}: {times['baseline'] / times[system]:.1f}x faster than sending the documents again", flush=True)
    down = Engine(engine.config.replace(data_dir=tmp / "downloaded"), embedder=engine.embedder)
    for name, eng in (("downloaded", down), ("uploaded", engine)):
        got = vectors_by_chunk(eng, "src" if eng is down else "uploaded")
        same = got.keys() == src.keys() and all(np.array_equal(src[c], got[c]) for c in src)
        print(f"the {name} copy holds the source's {len(src)} chunks with the same vectors: {same}")
    down.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paragraphs", type=int, default=None, help="SQuAD paragraphs (default all)")
    ap.add_argument("--no-grpc", dest="grpc", action="store_false", help="skip the section over gRPC")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
