"""Ingest on Ray (engine/distributed.py) against single-process ingest, on the same corpus.

SQuAD v1.1 dev paragraphs, written as JSONL files (Ray Data spreads work per file), ingested
into fresh collections by:
  - one process (`Engine.ingest_paths`, the embedder on all --threads cores),
  - a local Ray started here, with 1 embedding actor of 1 thread, 1 of --threads threads, and
    --threads actors of 1 thread each,
  - the writer alone: the same chunks and vectors, already embedded, committed by
    engine/ingest.py (the ceiling one writer puts on any number of actors).
Prints docs/s, the ratio to single-process, Ray's start-up, and a capacity plan from the
measured per-actor rate. On 2 cores expect no gain: it measures Ray's overhead.
One JSON line per measurement (bench-results/ when run by `make bench`).

    .venv/bin/python benchmarks/ray_ingest.py --docs 1000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SQUAD, cpu_name, log_jsonl  # noqa: E402
from engine import distributed  # noqa: E402
from engine.config import Config  # noqa: E402
from engine.ingest import Prepared, ingest as commit_prepared  # noqa: E402
from engine.pipeline import Engine  # noqa: E402

def write_corpus(squad: Path, n: int, files: int, out: Path) -> list[Path]:
    paras = [{"id": f"{a['title']}-{i}", "title": a["title"], "text": p["context"]}
             for a in json.loads(squad.read_text())["data"] for i, p in enumerate(a["paragraphs"])]
    random.Random(0).shuffle(paras)
    paras = paras[:n]
    out.mkdir(parents=True)
    paths = [out / f"part{f:03d}.jsonl" for f in range(files)]
    for f, path in enumerate(paths):
        with path.open("w") as w:
            for p in paras[f::files]:
                w.write(json.dumps(p) + "\n")
    return paths


def log(rec: dict) -> None:
    log_jsonl("ray_ingest", rec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--squad", type=Path, default=SQUAD)
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ray-ingest-"))
    paths = write_corpus(a.squad, a.docs, a.files, tmp / "corpus")
    base = Config(data_dir=tmp / "data", threads=a.threads)
    cpu = cpu_name()
    print(f"{a.docs} SQuAD paragraphs in {a.files} JSONL files; {a.threads} threads; CPU {cpu}", flush=True)

    def run(label: str, collection: str, fn) -> dict:
        t0 = time.perf_counter()
        report = fn(collection)
        s = time.perf_counter() - t0
        rec = {"mode": label, "docs": report.documents_added, "chunks": report.chunks_added,
               "seconds": round(s, 2), "docs_per_s": round(report.documents_added / s, 1)}
        log(rec)
        return rec

    engine = Engine(base)
    engine.embedder.warmup()
    results = {}
    try:
        for name in ("single", "ray_1x1", f"ray_1x{a.threads}", f"ray_{a.threads}x1", "writer_only"):
            engine.create_collection(name)
        results["single"] = run("single process", "single", lambda c: engine.ingest_paths(c, paths))

        t0 = time.perf_counter()
        distributed.connect(None, num_cpus=a.threads)
        startup = time.perf_counter() - t0
        log({"mode": "ray start (local)", "seconds": round(startup, 2)})
        for actors, threads in ((1, 1), (1, a.threads), (a.threads, 1)):
            key = f"ray_{actors}x{threads}"
            results[key] = run(f"ray, {actors} actor(s) x {threads} thread(s)", key,
                               lambda c: distributed.ingest(engine, c, paths, actors=actors, actor_threads=threads))

        # The writer alone: the single-process run's chunks and vectors, committed again.
        col = engine.collections.get("single")
        keys = col.store.keys()
        rows, vectors = col.store.chunks(keys), col.store.vectors()
        docs: dict[str, list] = {}
        for k in keys:
            docs.setdefault(rows[int(k)].doc_id, []).append(rows[int(k)])
        from engine.chunk import Chunk

        prepared = []
        for doc_id, rs in docs.items():
            rs.sort(key=lambda r: r.ordinal)
            prepared.append(Prepared(doc_id, rs[0].source, f"h-{doc_id}", rs[0].metadata, max(r.end for r in rs),
                                     [Chunk(doc_id, r.ordinal, r.start, r.end, r.n_tokens, r.text) for r in rs],
                                     vectors[[r.key for r in rs]], lambda: None))
        writer = engine.collections.get("writer_only", write=True)
        results["writer_only"] = run("writer alone (already embedded)", "writer_only",
                                     lambda c: commit_prepared(writer, lambda: engine.embedder, prepared))
    finally:
        engine.close()
        distributed.shutdown()

    single = results["single"]["docs_per_s"]
    print("\nratio to single process:")
    for key, rec in results.items():
        print(f"  {rec['mode']:40s} {rec['docs_per_s']:8.1f} docs/s  {rec['docs_per_s'] / single:5.2f}x")
    per_core = results["ray_1x1"]["docs_per_s"]
    writer = results["writer_only"]["docs_per_s"]
    print(f"\ncapacity plan: one 1-thread embedding actor does {per_core:.1f} docs/s (SQuAD-sized paragraphs, this CPU);"
          f" one writer commits {writer:.0f} docs/s")
    for nodes, cores in ((1, 16), (4, 16), (16, 16)):
        rate = min(per_core * nodes * cores, writer)
        for total in (1_000_000, 10_000_000):
            print(f"  {nodes:>2} node(s) x {cores} cores: {total:>10,} docs in {total / rate / 3600:6.1f} h "
                  f"({'writer-bound' if rate == writer else 'embedding-bound'})")
    log({"mode": "plan", "per_actor_core_docs_per_s": per_core, "writer_docs_per_s": writer,
         "ray_startup_s": round(startup, 2)})


if __name__ == "__main__":
    main()
