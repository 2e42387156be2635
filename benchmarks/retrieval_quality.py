"""Does the engine's retrieval (dense, and hybrid dense+BM25) find the paragraph that answers
a question better than BM25?

Corpus and questions: SQuAD v1.1 dev (2,067 Wikipedia paragraphs, ~10.5k questions, each
answered by exactly one paragraph). Every paragraph is ingested as one engine.documents.Document
(doc_id "title/paragraph-index") through engine.pipeline.Engine into a fresh collection per
index dtype (f32, and i8 with the engine's automatic exact rescoring). Questions are asked
with Engine.search_batch in batches, in both search modes: `dense` (HNSW only) and
`hybrid` (the default: the dense ranking fused with the store's FTS5 BM25 ranking, by each
fusion below); 20 chunks are fetched and deduplicated by doc_id
(best rank kept) into the top-10 paragraphs, because a long paragraph can span two chunks.

The baseline is BM25 (rank_bm25.BM25Okapi, k1=1.5, b=0.75) over the same paragraphs with a
lowercase \\w+ tokenizer (no stemming, no stop words), computed in the same run.

Quality: recall@1/5/10, MRR@10 and nDCG@10 (one relevant paragraph per question, so
nDCG = 1/log2(1 + rank)). Speed: queries/s. Embedding is the same for every index dtype,
so the engine gets an embedder that remembers vectors by text: each text is embedded once,
on first use (the f32 collection's ingest, and one timed pass over the questions), and the
per-dtype search_batch timings then measure search alone (index, rescoring, store reads,
hits). `e2e` throughput combines the two; `latency` is Engine.search of one question with
the real embedder (no cache), as a server request sees it.

Hybrid mode is measured once per fusion of the two rankings (--fusions; engine/kernels.py
`fuse`): reciprocal rank fusion, weighted RRF, and the convex combination of min-max
normalised cosine and BM25 scores (Bruch et al. 2023), at several weights. Each fusion
searches the same collections through a read-only engine of its own. --sample-corpus also
ranks 12 labelled questions about examples/corpus ("Which planet is the biggest?").

Run:
  .venv/bin/python benchmarks/retrieval_quality.py                  # int8 embedder, ~5 min
  .venv/bin/python benchmarks/retrieval_quality.py --variant both   # fp32 and int8, ~7 min
  .venv/bin/python benchmarks/retrieval_quality.py --limit-questions 1000
Results are appended to bench-results/retrieval_quality.jsonl, one JSON line per system.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.config import DEFAULT_EMBED_VARIANT, FUSIONS, Config  # noqa: E402
from engine.documents import Document  # noqa: E402
from engine.pipeline import Engine  # noqa: E402

DEFAULT_SQUAD = REPO.parent / "shared" / "data" / "squad-dev-v1.1.json"
RESULTS = REPO / "bench-results" / "retrieval_quality.jsonl"
TOP_DOCS = 10
WORD = re.compile(r"\w+")


# ---------------------------------------------------------------------- data
def load_squad(path: Path) -> tuple[list[Document], list[str], list[str]]:
    """(paragraph documents, questions, doc_id of the paragraph answering each question)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    docs, questions, gold = [], [], []
    for article in data:
        title = article["title"]
        for i, p in enumerate(article["paragraphs"]):
            doc_id = f"{title}/{i}"
            docs.append(Document(doc_id=doc_id, text=p["context"], source=f"squad-dev/{doc_id}",
                                 metadata={"title": title}))
            for qa in p["qas"]:
                questions.append(qa["question"])
                gold.append(doc_id)
    return docs, questions, gold


class MemoEmbedder:
    """The engine's Embedder, remembering each text's vector so it is computed once per run.

    `bypass` turns the memory off (for latency measurements that must pay for embedding).
    Everything else (name, dim, tokenizers) is the wrapped Embedder's.
    """

    def __init__(self, inner) -> None:
        self.inner = inner
        self.memo: dict[str, np.ndarray] = {}
        self.bypass = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed(self, texts):
        texts = list(texts)
        if self.bypass:
            return self.inner.embed(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if missing:
            self.memo.update(zip(missing, self.inner.embed(missing)))
        if not texts:
            return np.empty((0, self.inner.dim), np.float32)
        return np.stack([self.memo[t] for t in texts])


# ---------------------------------------------------------------------- metrics
def metrics(ranks: list[int | None]) -> dict[str, float]:
    """Rank-based quality over questions; `ranks` are 1-based ranks of the gold doc or None."""
    n = len(ranks)
    r = np.array([x if x is not None else 0 for x in ranks])
    found = r > 0
    return {
        "recall@1": float(np.mean(found & (r <= 1))),
        "recall@5": float(np.mean(found & (r <= 5))),
        "recall@10": float(np.mean(found & (r <= 10))),
        "mrr@10": float(np.sum(1.0 / r[found]) / n),
        "ndcg@10": float(np.sum(1.0 / np.log2(1.0 + r[found])) / n),
    }


def gold_rank(doc_ids: list[str], gold: str) -> int | None:
    try:
        return doc_ids.index(gold) + 1
    except ValueError:
        return None


def dedupe(hits, n: int) -> list[str]:
    """The first `n` distinct doc_ids of hits ordered best first (a doc keeps its best rank)."""
    out: list[str] = []
    for h in hits:
        if h.doc_id not in out:
            out.append(h.doc_id)
            if len(out) == n:
                break
    return out


def fmt_quality(m: dict[str, float]) -> str:
    return (f"R@1={m['recall@1']:.4f} R@5={m['recall@5']:.4f} R@10={m['recall@10']:.4f} "
            f"MRR@10={m['mrr@10']:.4f} nDCG@10={m['ndcg@10']:.4f}")


def pct_ms(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


# ---------------------------------------------------------------------- systems
def run_bm25(docs: list[Document], questions: list[str], gold: list[str]) -> dict:
    from rank_bm25 import BM25Okapi

    t0 = time.perf_counter()
    bm25 = BM25Okapi([WORD.findall(d.text.lower()) for d in docs])
    build_s = time.perf_counter() - t0
    ids = [d.doc_id for d in docs]
    bm25.get_scores(WORD.findall(questions[0].lower()))  # warm up
    ranks, lat = [], []
    t_all = time.perf_counter()
    for q, g in zip(questions, gold):
        t0 = time.perf_counter()
        scores = bm25.get_scores(WORD.findall(q.lower()))
        top = np.argpartition(-scores, TOP_DOCS)[:TOP_DOCS]
        top = top[np.argsort(-scores[top], kind="stable")]
        lat.append(time.perf_counter() - t0)
        ranks.append(gold_rank([ids[i] for i in top], g))
    seconds = time.perf_counter() - t_all
    p50, p99 = pct_ms(lat)
    return {"system": "bm25", "quality": metrics(ranks), "qps": len(questions) / seconds,
            "p50_ms": p50, "p99_ms": p99, "build_s": build_s}


def run_dense(engine: Engine, memo: MemoEmbedder, name: str, questions: list[str], gold: list[str], *,
              batch: int, fetch_k: int, embed_qps: float, latency_questions: int, mode: str) -> dict:
    """Quality and speed of one collection in one search mode; question vectors are already in `memo`."""
    engine.search_batch(name, questions[:batch], fetch_k, mode=mode)  # warm up (index pages, kernels)
    ranks: list[int | None] = []
    batch_s = []
    for s in range(0, len(questions), batch):
        qs = questions[s:s + batch]
        t0 = time.perf_counter()
        hits = engine.search_batch(name, qs, fetch_k, mode=mode)
        batch_s.append(time.perf_counter() - t0)
        ranks.extend(gold_rank(dedupe(h, TOP_DOCS), g) for h, g in zip(hits, gold[s:s + batch]))
    search_qps = len(questions) / sum(batch_s)
    e2e_qps = 1.0 / (1.0 / embed_qps + 1.0 / search_qps)
    # One question per call with the real embedder: what a single server request costs.
    memo.bypass = True
    lat = []
    for q in questions[:latency_questions]:
        t0 = time.perf_counter()
        engine.search(name, q, fetch_k, mode=mode)
        lat.append(time.perf_counter() - t0)
    memo.bypass = False
    p50, p99 = pct_ms(lat)
    return {"quality": metrics(ranks), "qps": e2e_qps, "search_qps": search_qps, "p50_ms": p50, "p99_ms": p99}


def fusion_label(fusion: str, alpha: float | None) -> str:
    return fusion if alpha is None else f"{fusion}{alpha:g}"


def parse_fusions(text: str) -> list[tuple[str, float | None]]:
    """"rrf,convex:0.6" -> [("rrf", None), ("convex", 0.6)]; no alpha: the Config default."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, alpha = item.partition(":")
        if name not in FUSIONS:
            raise SystemExit(f"unknown fusion {name!r}; use {FUSIONS}")
        out.append((name, float(alpha) if alpha else None))
    return out


def run(docs: list[Document], questions: list[str], gold: list[str], *, variant: str, dtypes: list[str],
        bm25: dict, batch: int, fetch_k: int, latency_questions: int, chunk_tokens: int | None,
        fusions: list[tuple[str, float | None]]) -> list[dict]:
    records = []
    with tempfile.TemporaryDirectory(prefix="rag-bench-") as tmp:
        # fsync off: durability is not what this measures, and it would add disk noise.
        config = Config(data_dir=Path(tmp), embed_variant=variant, wal_fsync="off")
        memo = MemoEmbedder(Engine(config).embedder)
        engine = Engine(config, embedder=memo)
        engine.warmup()
        ingest_s = {}
        for dtype in dtypes:
            name = f"squad-{dtype}"
            overlap = None if chunk_tokens is None else min(config.chunk_overlap, chunk_tokens // 4)
            engine.create_collection(name, index_dtype=dtype, chunk_tokens=chunk_tokens, chunk_overlap=overlap)
            report = engine.ingest(name, docs)
            if report.failures:
                raise RuntimeError(f"{len(report.failures)} paragraphs failed to ingest: {report.failures[:3]}")
            ingest_s[dtype] = report.seconds
        info = engine.describe(f"squad-{dtypes[0]}")
        t0 = time.perf_counter()
        memo.embed(questions)
        embed_s = time.perf_counter() - t0
        embed_qps = len(questions) / embed_s
        print(f"\n== embed {info.embed_model} {variant}: {info.documents} paragraphs -> {info.chunks} chunks "
              f"(chunk_tokens={info.chunk_tokens}); {len(questions)} questions embedded at {embed_qps:.0f}/s; "
              f"ingest {ingest_s[dtypes[0]]:.1f}s for the first collection (embedding included)")
        for dtype in dtypes:
            r = run_dense(engine, memo, f"squad-{dtype}", questions, gold, batch=batch, fetch_k=fetch_k,
                          embed_qps=embed_qps, latency_questions=latency_questions, mode="dense")
            r.update(system=f"dense-{dtype}" + ("+rescore" if dtype != "f32" else ""), ingest_s=ingest_s[dtype],
                     index_dtype=dtype, embed_qps=embed_qps, mode="dense")
            records.append(r)
            # Each fusion reads the same collections through a read-only engine of its own.
            for fusion, alpha in fusions:
                reader = Engine(config.replace(read_only=True, fusion=fusion,
                                               fusion_alpha=config.fusion_alpha if alpha is None else alpha),
                                embedder=memo)
                r = run_dense(reader, memo, f"squad-{dtype}", questions, gold, batch=batch, fetch_k=fetch_k,
                              embed_qps=embed_qps, latency_questions=latency_questions, mode="hybrid")
                reader.close()
                r.update(system=f"hybrid-{fusion_label(fusion, alpha)}-{dtype}" + ("+rescore" if dtype != "f32" else ""),
                         ingest_s=ingest_s[dtype], index_dtype=dtype, embed_qps=embed_qps, mode="hybrid",
                         fusion=fusion, fusion_alpha=alpha)
                records.append(r)
        engine.close()
    base_q = bm25["quality"]
    for r in records + [bm25]:
        q = r["quality"]
        speed = (f"e2e {r['qps']:6.0f} q/s (search alone {r['search_qps']:6.0f} q/s), "
                 f"1-query latency p50={r['p50_ms']:.2f}ms p99={r['p99_ms']:.2f}ms"
                 if "search_qps" in r else
                 f"    {r['qps']:6.0f} q/s, 1-query latency p50={r['p50_ms']:.2f}ms p99={r['p99_ms']:.2f}ms")
        ratio = (f"R@5 vs bm25 x{q['recall@5'] / base_q['recall@5']:.3f}, "
                 f"q/s vs bm25 x{r['qps'] / bm25['qps']:.2f}")
        label = r["system"] + (f" [{variant}]" if r is not bm25 else "")
        print(f"{label:34s} {fmt_quality(q)} | {speed} | {ratio}")
        r["recall5_vs_bm25"] = q["recall@5"] / base_q["recall@5"]
        r["qps_vs_bm25"] = r["qps"] / bm25["qps"]
    for r in records:
        r["embed_variant"] = variant
    return records


# Labelled questions about examples/corpus: (question, the end of the doc_id that answers it).
SAMPLE_QUESTIONS = [
    ("Which planet is the biggest?", "#jupiter"),
    ("Which planet is the smallest?", "#mercury"),
    ("Which planet is the hottest?", "#venus"),
    ("Where is the tallest volcano?", "#mars"),
    ("What is the Great Red Spot?", "#jupiter"),
    ("How long is a year on Mercury?", "#mercury"),
    ("How hot should the water be for green tea?", "tea.txt"),
    ("How long does black tea steep?", "tea.txt"),
    ("What temperature does oolong need?", "tea.txt"),
    ("Who invented the lens used in lighthouses?", "lighthouse.html"),
    ("How often do I feed a sourdough starter?", "bread.md"),
    ("How does an HNSW search find nearest neighbours?", "hnsw.md"),
]


def run_sample_corpus(variant: str, fusions: list[tuple[str, float | None]]) -> list[dict]:
    """Rank of the answering document for each labelled question, per search mode and fusion."""
    records = []
    with tempfile.TemporaryDirectory(prefix="rag-bench-sample-") as tmp:
        config = Config(data_dir=Path(tmp), embed_variant=variant, wal_fsync="off")
        writer = Engine(config)
        writer.create_collection("sample")
        writer.ingest_paths("sample", [REPO / "examples" / "corpus"])
        questions = [q for q, _ in SAMPLE_QUESTIONS]
        systems = [("dense", None, None)] + [("hybrid", f, a) for f, a in fusions]
        for mode, fusion, alpha in systems:
            engine = writer if fusion is None else Engine(
                config.replace(read_only=True, fusion=fusion,
                               fusion_alpha=config.fusion_alpha if alpha is None else alpha),
                embedder=writer.embedder)
            ranks = []
            for hits, (_, want) in zip(engine.search_batch("sample", questions, 10, mode=mode), SAMPLE_QUESTIONS):
                ids = [h.doc_id for h in hits]
                ranks.append(next((i + 1 for i, d in enumerate(dict.fromkeys(ids)) if d.endswith(want)), None))
            if engine is not writer:
                engine.close()
            label = "dense" if fusion is None else f"hybrid-{fusion_label(fusion, alpha)}"
            m = metrics(ranks)
            print(f"sample corpus {label:24s} {fmt_quality(m)}  ranks {ranks}")
            records.append({"system": f"sample-{label}", "quality": m, "ranks": ranks, "mode": mode,
                            "fusion": fusion, "fusion_alpha": alpha, "embed_variant": variant})
        writer.close()
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--squad", type=Path, default=DEFAULT_SQUAD, help="SQuAD v1.1 dev JSON")
    ap.add_argument("--limit-questions", type=int, default=0, help="use only the first N questions (0 = all)")
    ap.add_argument("--variant", choices=("fp32", "int8", "both"), default=DEFAULT_EMBED_VARIANT,
                    help="embedding model variant")
    ap.add_argument("--dtypes", default="f32,i8", help="index dtypes, one collection each")
    ap.add_argument("--batch", type=int, default=256, help="questions per search_batch call")
    ap.add_argument("--fetch-k", type=int, default=20, help="chunks fetched before deduplicating to 10 docs")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="chunk size (default: the Config default)")
    ap.add_argument("--latency-questions", type=int, default=200, help="single-question calls for latency")
    ap.add_argument("--fusions", default="rrf,weighted_rrf:0.7,convex:0.5,convex:0.6,convex:0.7",
                    help="hybrid fusions to measure, NAME[:ALPHA] comma-separated (no ALPHA: the default)")
    ap.add_argument("--sample-corpus", action="store_true",
                    help="also measure every fusion on the labelled questions about examples/corpus")
    args = ap.parse_args()

    docs, questions, gold = load_squad(args.squad)
    if args.limit_questions:
        questions, gold = questions[:args.limit_questions], gold[:args.limit_questions]
    print(f"SQuAD dev: {len(docs)} paragraphs, {len(questions)} questions")
    bm25 = run_bm25(docs, questions, gold)
    variants = ("fp32", "int8") if args.variant == "both" else (args.variant,)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    records = []
    for v in variants:
        if args.sample_corpus:
            print(f"\n== sample corpus ({len(SAMPLE_QUESTIONS)} labelled questions about examples/corpus)")
            records += run_sample_corpus(v, parse_fusions(args.fusions))
        records += run(docs, questions, gold, variant=v, dtypes=dtypes, bm25=bm25, batch=args.batch,
                       fetch_k=args.fetch_k, latency_questions=args.latency_questions,
                       chunk_tokens=args.chunk_tokens, fusions=parse_fusions(args.fusions))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with RESULTS.open("a") as f:
        for r in records + [bm25]:
            f.write(json.dumps({"benchmark": "retrieval_quality", "time": stamp, "questions": len(questions),
                                "paragraphs": len(docs), "fetch_k": args.fetch_k, "top_docs": TOP_DOCS,
                                "chunk_tokens": args.chunk_tokens, **r})
                    + "\n")


if __name__ == "__main__":
    main()
