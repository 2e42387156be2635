"""What does durability cost a write? Small ingests under each write-ahead log fsync policy.

    .venv/bin/python benchmarks/durability_cost.py [--docs 300] [--repeats 3]

Ingests SQuAD v1.1 dev paragraphs (or the sample corpus if SQuAD is absent) one document
per `Engine.ingest` call, as a client sending one document per request does, into a fresh
collection per policy: `batch` (fdatasync before every acknowledgement, the default),
`interval` (at most every 100 ms) and `off` (left to the OS). Policies are interleaved
over `--repeats` rounds in this one process with the same embedder. Printed per policy:
documents/s end to end, commit latency percentiles (log append + sync + store + index,
embedding excluded), snapshot time on close, and `cost = off_docs_per_s / docs_per_s`.
One JSON line per policy goes to bench-results/durability_cost.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.config import Config  # noqa: E402
from engine.embed import Embedder  # noqa: E402
from engine.documents import Document  # noqa: E402
from engine.pipeline import Collection, Engine  # noqa: E402

SQUAD = REPO.parent / "shared" / "data" / "squad-dev-v1.1.json"
POLICIES = ("batch", "interval", "off")


def corpus(n: int) -> list[Document]:
    if SQUAD.exists():
        data = json.loads(SQUAD.read_text())["data"]
        docs = [Document(f"{a['title']}-{i}", p["context"], a["title"])
                for a in data for i, p in enumerate(a["paragraphs"])]
    else:
        docs = [Document(p.name, p.read_text(), p.name) for p in sorted((REPO / "examples/corpus").rglob("*.*"))
                if p.suffix in (".txt", ".md")]
    return docs[:n]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def run(docs: list[Document], repeats: int) -> list[dict]:
    base = Config()
    embedder = Embedder(base.embed_model_dir, variant=base.embed_variant, threads=base.threads)
    embedder.warmup()
    commit_ms: dict[str, list[float]] = {p: [] for p in POLICIES}
    seconds = {p: 0.0 for p in POLICIES}
    snapshot_ms = {p: [] for p in POLICIES}
    real_commit = Collection.commit

    def timed_commit(self, *a, **kw):
        t = time.perf_counter()
        try:
            return real_commit(self, *a, **kw)
        finally:
            commit_ms[self.config.wal_fsync].append((time.perf_counter() - t) * 1e3)

    Collection.commit = timed_commit  # measure the real method, unchanged, from outside
    try:
        for _ in range(repeats):
            for policy in POLICIES:
                with tempfile.TemporaryDirectory(dir=REPO / ".cache") as tmp:
                    eng = Engine(base.replace(data_dir=Path(tmp), wal_fsync=policy), embedder=embedder)
                    eng.create_collection("c")
                    t0 = time.perf_counter()
                    for d in docs:
                        eng.ingest("c", [d])
                    seconds[policy] += time.perf_counter() - t0
                    t1 = time.perf_counter()
                    eng.close()
                    snapshot_ms[policy].append((time.perf_counter() - t1) * 1e3)
    finally:
        Collection.commit = real_commit
    rows = []
    off_rate = len(docs) * repeats / seconds["off"]
    for p in POLICIES:
        rate = len(docs) * repeats / seconds[p]
        ms = commit_ms[p]
        rows.append({"benchmark": "durability_cost", "policy": p, "docs": len(docs), "repeats": repeats,
                     "docs_per_s": round(rate, 1), "commit_ms_p50": round(pct(ms, 50), 3),
                     "commit_ms_p99": round(pct(ms, 99), 3), "commit_ms_mean": round(statistics.fmean(ms), 3),
                     "snapshot_ms": round(statistics.fmean(snapshot_ms[p]), 1),
                     "cost": round(off_rate / rate, 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    (REPO / ".cache").mkdir(exist_ok=True)
    rows = run(corpus(args.docs), args.repeats)
    out = REPO / "bench-results"
    out.mkdir(exist_ok=True)
    with open(out / "durability_cost.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
            print(f"{r['policy']:>8}: {r['docs_per_s']:8.1f} docs/s  commit p50 {r['commit_ms_p50']:.2f} ms  "
                  f"p99 {r['commit_ms_p99']:.2f} ms  snapshot {r['snapshot_ms']:.0f} ms  "
                  f"cost vs off = {r['cost']:.2f}x")


if __name__ == "__main__":
    main()
