"""What does re-ingesting a changed corpus cost, when most chunk texts are already stored?

A corpus is re-ingested (the nightly sync of a document store, a new metadata field added
for filters, a typo fixed in a long document). An upsert replaces each changed document;
its chunks' vectors depend on their text alone, so the engine now embeds only the chunk
texts the document does not have stored already, and keeps the stored vectors of the rest.

Corpus: SQuAD v1.1 dev, one Document per article (48 articles, its paragraphs joined: long,
many-chunk documents), ingested into two collections. Then, per scenario, the same new
version of every document is upserted into each, in the same process:
  metadata  every document gets a new metadata field (its text unchanged)
  edit      one paragraph in the middle of every document is changed
  ours      Engine.ingest as it is: stored vectors kept for unchanged chunk texts
  baseline  the engine before: every chunk of a changed document embedded again (the
            same Engine.ingest with the collection's Store.chunk_vectors answering {})
Printed per scenario and system: seconds, chunks added, chunks whose vector was kept, and
the ratio baseline / ours; then the largest difference between the two collections'
vectors (the same chunks, so ~0). One JSON line per measurement to
bench-results/reingest.jsonl.

    .venv/bin/python benchmarks/reingest.py            # ~2-3 min on 2 cores
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


def articles(limit: int | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in squad_paragraphs(SQUAD):
        out.setdefault(p["title"], []).append(p["text"])
    return dict(list(out.items())[:limit] if limit else out.items())


def run(args: argparse.Namespace) -> None:
    from engine.config import Config
    from engine.documents import Document
    from engine.pipeline import Engine

    arts = articles(args.articles)
    v1 = [Document(t, "\n\n".join(ps), t, {"v": 1}) for t, ps in arts.items()]
    scenarios = {
        "metadata": [Document(t, "\n\n".join(ps), t, {"v": 1, "tenant": f"t{i % 7}"})
                     for i, (t, ps) in enumerate(arts.items())],
        "edit": [Document(t, "\n\n".join(ps[:len(ps) // 2] + [ps[len(ps) // 2] + " (Revised.)"] + ps[len(ps) // 2 + 1:]),
                          t, {"v": 1, "tenant": f"t{i % 7}"}) for i, (t, ps) in enumerate(arts.items())],
    }
    cpu = cpu_name()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(Config(data_dir=Path(tmp)))
        for name in ("ours", "baseline"):
            engine.create_collection(name)
            t0 = time.perf_counter()
            r = engine.ingest(name, v1)
            print(f"{name}: first ingest of {len(v1)} documents, {r.chunks_added} chunks, "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        engine.collections.get("baseline").store.chunk_vectors = lambda doc_ids: {}  # the engine before
        for scenario, docs in scenarios.items():
            results = {}
            for name in ("baseline", "ours"):
                t0 = time.perf_counter()
                r = engine.ingest(name, docs)
                seconds = time.perf_counter() - t0
                results[name] = seconds
                print(f"{scenario:8s} {name:8s} {seconds:7.2f} s  {r.documents_updated} documents updated, "
                      f"{r.chunks_added} chunks added, {r.chunks_reused} kept", flush=True)
                log_jsonl("reingest", {"scenario": scenario, "system": name, "seconds": seconds,
                                       "documents": len(docs), "chunks_added": r.chunks_added,
                                       "chunks_reused": r.chunks_reused, "cpu": cpu})
            print(f"  {scenario}: ours {results['baseline'] / results['ours']:.1f}x faster than re-embedding",
                  flush=True)
        diffs = []
        cols = [engine.collections.get(n) for n in ("ours", "baseline")]
        rows = [{(r.doc_id, r.ordinal, r.text): k for k, r in c.store.chunks(c.store.keys()).items()} for c in cols]
        assert rows[0].keys() == rows[1].keys(), "the two collections hold different chunks"
        for chunk, k in rows[0].items():
            diffs.append(float(np.abs(cols[0].store.vectors()[k] - cols[1].store.vectors()[rows[1][chunk]]).max()))
        print(f"same {len(diffs)} chunks in both; largest vector difference {max(diffs):.2e}")
        engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--articles", type=int, default=None, help="SQuAD articles (default all 48)")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
