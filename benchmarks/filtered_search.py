"""Does a filtered search return the k best matches of its filter, and at what cost?

A filter that matches few chunks is the common case in multi-tenant retrieval: every
document belongs to one tenant (a user, a team, a customer) and every query searches its
tenant's documents only. Filtering the index's nearest candidates after the search (what
the engine did before, and what many vector stores do) returns fewer than k hits, and misses
the best match, whenever the tenant's chunks are not among the candidates.

Corpus and questions: SQuAD v1.1 dev paragraphs (one Document each, metadata
{"tenant": "t<i>"}, the tenant drawn at random, fixed seed) and their questions; each
question is searched with its paragraph's tenant as the filter, so its paragraph is a match.
Per tenant count (--tenants, e.g. 20 and 200: ~5% and ~0.5% of the chunks a filter) and
search mode (dense, hybrid), in the same process on the same collection and vectors:
  ours      Searcher.search: a filter matching at most PREFILTER_MAX_CHUNKS chunks ranks
            every match (exact cosines; BM25 among the matches in hybrid mode)
  postfilter the index's over-fetched candidates (k x 10, at least 100), filtered: the
            engine's previous behaviour, Searcher._ranked without the matches
Printed per system: mean hits per query (of k), the share of queries given fewer than k
while k chunks matched, recall@k of the question's paragraph, queries/s over batches of
--batch questions (embedding excluded: vectors embedded once and handed in), and the ratios
ours / postfilter. One JSON line per system to bench-results/filtered_search.jsonl.
--form says how the tenant filter is written: eq {"tenant": "t7"}; in {"tenant": {"$in":
["t7", "nobody"]}}; range {"tenant": {"$gte": "t7", "$lte": "t7"}} (a text range holding one
tenant); or {"$or": [{"tenant": "t7"}, {"tenant": "nobody"}]} (a union of two lookups); or
contains {"tags": {"$contains": "t7"}} (every document also has "tags": [its tenant, "squad"],
a list found by its elements); each matches the same chunks, through the metadata index's
other lookups.

    .venv/bin/python benchmarks/filtered_search.py                       # ~1-2 min
    .venv/bin/python benchmarks/filtered_search.py --tenants 5,50,500 --questions 2000
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

from engine.filters import check_filter  # noqa: E402

FORMS = {"eq": lambda f, t: {f: t}, "in": lambda f, t: {f: {"$in": [t, "nobody"]}},
         "range": lambda f, t: {f: {"$gte": t, "$lte": t}}, "or": lambda f, t: {"$or": [{f: t}, {f: "nobody"}]},
         "contains": lambda f, t: {f.replace("tenant", "tags"): {"$contains": t}}}


def run(args: argparse.Namespace) -> None:
    from engine.config import Config
    from engine.documents import Document
    from engine.pipeline import Engine

    paragraphs = squad_paragraphs(SQUAD, args.paragraphs)
    rng = np.random.default_rng(7)
    tenant_counts = [int(t) for t in args.tenants.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(Config(data_dir=Path(tmp)))
        assign = {t: rng.integers(0, t, len(paragraphs)) for t in tenant_counts}
        engine.create_collection("squad")
        t0 = time.perf_counter()
        engine.ingest("squad", (Document(p["id"], p["text"], p["title"],
                                         {**{f"tenant{t}": f"t{assign[t][i]}" for t in tenant_counts},
                                          **{f"tags{t}": [f"t{assign[t][i]}", "squad"] for t in tenant_counts}})
                                for i, p in enumerate(paragraphs)))
        print(f"ingested {len(paragraphs)} paragraphs in {time.perf_counter() - t0:.1f} s", flush=True)
        asked = [(q, i) for i, p in enumerate(paragraphs) for q, _ in p["questions"]]
        asked = [asked[j] for j in rng.permutation(len(asked))[:args.questions]]
        vectors = engine.embedder.embed([q for q, _ in asked])
        searcher = engine.searcher
        col = searcher.open("squad")
        cpu = cpu_name()
        for tenants in tenant_counts:
            field = f"tenant{tenants}"
            chunks = [len(col.store.filter_keys({field: f"t{t}"})) for t in range(tenants)]
            for mode in ("dense", "hybrid"):
                results = {}
                for system in ("postfilter", "ours"):
                    results[system] = measure(searcher, col, asked, vectors, paragraphs, assign[tenants], field,
                                              chunks, mode, system, args)
                    r = results[system]
                    print(f"tenants={tenants:4d} (a filter ~{np.mean(chunks):.0f} chunks) mode={mode:6s} "
                          f"{system:10s} hits/query {r['mean_hits']:.2f} of {args.k}  short {r['short_share']:.3f}  "
                          f"recall@{args.k} {r['recall']:.3f}  {r['qps']:.0f} q/s", flush=True)
                    log_jsonl("filtered_search", {"system": system, "tenants": tenants, "mode": mode, "form": args.form,
                                                  "k": args.k, "questions": len(asked),
                                                  "paragraphs": len(paragraphs), "cpu": cpu, **r})
                ours, base = results["ours"], results["postfilter"]
                print(f"  form {args.form}, ours / postfilter: recall {ours['recall'] / max(base['recall'], 1e-9):.2f}x, "
                      f"hits {ours['mean_hits'] / max(base['mean_hits'], 1e-9):.2f}x, "
                      f"speed {ours['qps'] / base['qps']:.2f}x", flush=True)
        engine.close()


def measure(searcher, col, asked, vectors, paragraphs, tenant_of, field, chunks, mode, system, args) -> dict:
    """Hits, fill and recall of one system over every question, and its queries/s."""
    # group a batch's questions by tenant: one filter per search call, as the server's batcher does
    hits_n, short, found, seconds = [], 0, 0, 0.0
    for start in range(0, len(asked), args.batch):
        part = list(range(start, min(start + args.batch, len(asked))))
        by_tenant: dict[int, list[int]] = {}
        for j in part:
            by_tenant.setdefault(int(tenant_of[asked[j][1]]), []).append(j)
        for t, js in by_tenant.items():
            filt = check_filter(FORMS[args.form](field, f"t{t}"))
            qs, vs = [asked[j][0] for j in js], vectors[js]
            t0 = time.perf_counter()
            if system == "ours":
                hits = searcher.search_open(col, qs, args.k, filter=filt, mode=mode, vectors=vs).hits
            else:
                hits = searcher._ranked(col, qs, vs, args.k, filt, mode, None)
            seconds += time.perf_counter() - t0
            for j, h in zip(js, hits):
                hits_n.append(len(h))
                short += len(h) < min(args.k, chunks[t])
                found += paragraphs[asked[j][1]]["id"] in {x.doc_id for x in h}
    n = len(asked)
    return {"mean_hits": float(np.mean(hits_n)), "short_share": short / n, "recall": found / n,
            "qps": n / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", default="20,200", help="tenant counts to measure (comma-separated)")
    ap.add_argument("--paragraphs", type=int, default=None, help="SQuAD paragraphs to ingest (default all 2,067)")
    ap.add_argument("--questions", type=int, default=2000, help="questions asked (a fixed random sample)")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64, help="questions per batch (grouped by tenant)")
    ap.add_argument("--form", choices=sorted(FORMS), default="eq", help="how the tenant filter is written")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
