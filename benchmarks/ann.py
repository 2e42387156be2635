"""At equal recall@10, how many queries per second does our HNSW index answer, against faiss and hnswlib?

Ours is engine.index.VectorIndex (usearch underneath) with dtype f32, f16 and i8; f16 and
i8 are measured both raw and with the exact f32 rescoring the engine does for quantized
indexes (`search(..., exact_vectors=..., oversample=...)`). The baselines are faiss
`IndexHNSWFlat` (inner-product metric) and hnswlib (space 'ip'), all at the same M,
efConstruction and a sweep of efSearch. Vectors are L2-normalised, so inner product equals
cosine for every system and all rank the same neighbours.

Datasets:
  fashion-mnist  60,000 x 784 training images (Debian dataset-fashion-mnist), queries = the
                 first --queries test images.
  squad          SQuAD v1.1 dev paragraphs (2,067) embedded with engine.embed.Embedder,
                 queries = the questions (all ~10.5k, or the first --queries); the vectors are
                 cached in --cache-dir, since embedding takes a minute or more.
Ground truth is exact brute force (numpy matmul). A returned id counts as a true neighbour
if its exact similarity reaches the 10th-best exact similarity (minus 1e-5), so ties among
duplicate images do not count as misses (the ann-benchmarks convention).

Threads: every system builds and batch-searches with --threads (default 2) threads:
usearch `threads=`, faiss `omp_set_num_threads`, hnswlib `num_threads` (--build-threads
sets the build separately). Each (system, ef) point is timed --repeats times, interleaved
round-robin across systems, and the fastest run is kept: other processes on a shared
machine only ever add time. Single-query latency percentiles (one call per query, the
server's path) are measured at each system's operating point: the smallest ef with
recall@10 >= --target. The rescoring variants fetch k * oversample candidates, so usearch
searches them with ef = max(ef, k * oversample).

`unreachable` is the share of a sample of base vectors that a search for the vector itself
(at the largest ef) does not return in its top 10: nodes the build left without a way in,
which no ef finds. HNSW's neighbour pruning strands a few on hard data even in a serial
build; usearch's concurrent add strands more (usearch issue #735).

Run:
  .venv/bin/python benchmarks/ann.py                      # both datasets, ~5 minutes
  .venv/bin/python benchmarks/ann.py --dataset fashion-mnist --queries 10000
Results are appended to bench-results/ann.jsonl, one JSON line per (dataset, system).
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.index import VectorIndex  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_SQUAD = REPO.parent / "shared" / "data" / "squad-dev-v1.1.json"
RESULTS = REPO / "bench-results" / "ann.jsonl"
K = 10
TIE_EPS = 1e-5


# ---------------------------------------------------------------------- data
def read_idx_images(path: Path) -> np.ndarray:
    """(n, rows*cols) uint8 from an idx3-ubyte(.gz) file (big-endian header: magic, n, rows, cols)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != 2051:
        raise ValueError(f"{path}: not an idx3 image file (magic {magic})")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows * cols)


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def load_fashion(n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    base = normalise(read_idx_images(FASHION_DIR / "train-images-idx3-ubyte.gz"))
    queries = normalise(read_idx_images(FASHION_DIR / "t10k-images-idx3-ubyte.gz")[:n_queries])
    return base, queries


def load_squad(path: Path, n_queries: int | None, variant: str,
               cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Paragraph and question vectors; cached in `cache_dir` (embedding takes minutes on 2 cores)."""
    from engine.config import Config, default_threads
    from engine.embed import Embedder

    config = Config()
    st = Path(path).stat()
    cache = (cache_dir / f"squad-{config.embed_model}-{variant}-{st.st_size}-{st.st_mtime_ns}-{n_queries}.npz"
             if cache_dir else None)
    if cache and cache.exists():
        with np.load(cache) as z:
            print(f"squad: vectors from {cache}")
            return z["base"], z["queries"]
    data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    paragraphs = [p["context"] for a in data for p in a["paragraphs"]]
    questions = [q["question"] for a in data for p in a["paragraphs"] for q in p["qas"]][:n_queries or None]
    emb = Embedder(config.embed_model_dir, variant=variant, threads=default_threads())
    t0 = time.perf_counter()
    base, queries = emb.embed(paragraphs), emb.embed(questions)
    print(f"squad: embedded {len(paragraphs)} paragraphs + {len(questions)} questions with "
          f"{emb.name} {variant} in {time.perf_counter() - t0:.1f}s")
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, base=base, queries=queries)
    return base, queries


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, similarities) of the exact top k by inner product, best first."""
    ids = np.empty((len(queries), k), np.int64)
    sims = np.empty((len(queries), k), np.float32)
    for s in range(0, len(queries), 1024):
        sc = queries[s:s + 1024] @ base.T
        part = np.argpartition(-sc, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sc, part, 1), axis=1)
        ids[s:s + 1024] = np.take_along_axis(part, order, 1)
        sims[s:s + 1024] = np.take_along_axis(sc, ids[s:s + 1024], 1)
    return ids, sims


def recall_at_k(found: np.ndarray, base: np.ndarray, queries: np.ndarray, truth_sims: np.ndarray) -> float:
    """Mean fraction of the k returned ids whose exact similarity reaches the k-th true one."""
    k = truth_sims.shape[1]
    found = found[:, :k]
    valid = found >= 0
    sims = np.einsum("qd,qkd->qk", queries, base[np.where(valid, found, 0)])
    hit = valid & (sims >= truth_sims[:, -1:] - TIE_EPS)
    return float(hit.sum(1).mean() / k)


# ---------------------------------------------------------------------- systems
class Ours:
    """engine.index.VectorIndex; `rescore` passes the f32 rows as the engine does for f16/i8."""

    def __init__(self, dtype: str, m: int, ef_construction: int, threads: int, build_threads: int,
                 rescore: bool = False, oversample: int = 1, parent: "Ours | None" = None):
        self.dtype, self.m, self.efc = dtype, m, ef_construction
        self.threads, self.build_threads = threads, build_threads
        self.rescore, self.oversample, self.parent = rescore, oversample, parent
        self.name = f"ours-{dtype}" + (f"+rescore(x{oversample})" if rescore else "")
        self.index: VectorIndex | None = None
        self.base: np.ndarray | None = None

    def build(self, base: np.ndarray) -> None:
        if self.parent is not None:  # same graph as the raw index of this dtype; only search differs
            self.index, self.base = self.parent.index, self.parent.base
            return
        self.base = base
        self.index = VectorIndex(ndim=base.shape[1], dtype=self.dtype, connectivity=self.m,
                                 expansion_add=self.efc, expansion_search=64, threads=self.build_threads)
        self.index.add(np.arange(len(base), dtype=np.int64), base)
        self.index.threads = self.threads

    def set_ef(self, ef: int) -> None:
        self.index.expansion_search = ef

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        keys, _ = self.index.search(queries, k, exact_vectors=self.base if self.rescore else None,
                                    oversample=self.oversample)
        return keys


class Faiss:
    name = "faiss-hnsw-flat"
    parent = None

    def __init__(self, m: int, ef_construction: int, threads: int, build_threads: int):
        import faiss

        self.faiss, self.m, self.efc = faiss, m, ef_construction
        self.threads, self.build_threads = threads, build_threads

    def build(self, base: np.ndarray) -> None:
        self.faiss.omp_set_num_threads(self.build_threads)
        self.index = self.faiss.IndexHNSWFlat(base.shape[1], self.m, self.faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = self.efc
        self.index.add(base)
        self.faiss.omp_set_num_threads(self.threads)

    def set_ef(self, ef: int) -> None:
        self.index.hnsw.efSearch = ef

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        return self.index.search(queries, k)[1]


class Hnswlib:
    name = "hnswlib"
    parent = None

    def __init__(self, m: int, ef_construction: int, threads: int, build_threads: int):
        self.m, self.efc, self.threads, self.build_threads = m, ef_construction, threads, build_threads

    def build(self, base: np.ndarray) -> None:
        import hnswlib

        self.index = hnswlib.Index(space="ip", dim=base.shape[1])
        self.index.init_index(max_elements=len(base), ef_construction=self.efc, M=self.m, random_seed=100)
        self.index.add_items(base, np.arange(len(base)), num_threads=self.build_threads)

    def set_ef(self, ef: int) -> None:
        self.index.set_ef(ef)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        # hnswlib searches with max(ef, k), like the others.
        return self.index.knn_query(queries, k=k, num_threads=self.threads)[0].astype(np.int64)


# ---------------------------------------------------------------------- measurement
def percentiles_ms(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def unreachable(system, base: np.ndarray, sample: np.ndarray, ef: int) -> float:
    """Share of sampled base rows missing from the top 10 of a search for themselves."""
    system.set_ef(ef)
    found = system.search(base[sample], K)
    return float(1.0 - (found == sample[:, None]).any(axis=1).mean())


def run(dataset: str, base: np.ndarray, queries: np.ndarray, *, m: int, ef_construction: int,
        efs: list[int], threads: int, build_threads: int, repeats: int, oversample: int, target: float,
        latency_queries: int, unreachable_sample: int) -> list[dict]:
    _, truth_sims = exact_topk(base, queries, K)
    print(f"\n== {dataset}: {base.shape[0]} x {base.shape[1]} base, {len(queries)} queries, k={K}, "
          f"M={m} efConstruction={ef_construction}, build threads={build_threads}, search threads={threads}, "
          f"best of {repeats}")

    systems = [Faiss(m, ef_construction, threads, build_threads), Hnswlib(m, ef_construction, threads, build_threads)]
    for dtype in ("f32", "f16", "i8"):
        raw = Ours(dtype, m, ef_construction, threads, build_threads)
        systems.append(raw)
        if dtype != "f32":
            systems.append(Ours(dtype, m, ef_construction, threads, build_threads, rescore=True,
                                oversample=oversample, parent=raw))

    build_s: dict[str, float] = {}
    for s in systems:
        t0 = time.perf_counter()
        s.build(base)
        build_s[s.name] = build_s[s.parent.name] if s.parent is not None else time.perf_counter() - t0

    # Warm up every system (page in the graph, JIT the rescoring kernel, start thread pools).
    for s in systems:
        s.set_ef(max(efs))
        s.search(queries[:64], K)

    times: dict[tuple[str, int], list[float]] = {}
    recalls: dict[tuple[str, int], float] = {}
    for rep in range(repeats):
        for ef in efs:
            for s in systems:
                s.set_ef(ef)
                t0 = time.perf_counter()
                found = s.search(queries, K)
                times.setdefault((s.name, ef), []).append(time.perf_counter() - t0)
                if rep == 0:
                    recalls[(s.name, ef)] = recall_at_k(found, base, queries, truth_sims)

    sample = np.random.default_rng(0).choice(len(base), min(unreachable_sample, len(base)), replace=False)
    lost = {s.name: unreachable(s, base, sample, max(efs)) for s in systems}

    def qps(name: str, ef: int) -> float:
        return len(queries) / min(times[(name, ef)])

    print(f"{'system':28s} " + " ".join(f"{'ef=' + str(ef):>17s}" for ef in efs) + "   (recall@10 / QPS)")
    for s in systems:
        cells = " ".join(f"{recalls[(s.name, ef)]:.4f}/{qps(s.name, ef):7.0f}" for ef in efs)
        print(f"{s.name:28s} {cells}")

    def operating_ef(name: str) -> int | None:
        return next((ef for ef in efs if recalls[(name, ef)] >= target), None)

    faiss_ef = operating_ef(Faiss.name)
    faiss_qps = qps(Faiss.name, faiss_ef) if faiss_ef else None
    records = []
    print(f"-- operating point: smallest ef with recall@10 >= {target}; 1-query latency over "
          f"{min(latency_queries, len(queries))} queries; unreachable of {len(sample)} sampled base rows")
    for s in systems:
        ef = operating_ef(s.name)
        rec = {"benchmark": "ann", "dataset": dataset, "system": s.name, "n": int(base.shape[0]),
               "dim": int(base.shape[1]), "queries": int(len(queries)), "k": K, "M": m,
               "ef_construction": ef_construction, "threads": threads, "build_threads": build_threads,
               "repeats": repeats, "build_s": round(build_s[s.name], 3), "unreachable": lost[s.name],
               "memory_bytes": s.index.memory_bytes() if isinstance(s, Ours) else None,
               "sweep": [{"ef": e, "recall_at_10": round(recalls[(s.name, e)], 5), "qps": round(qps(s.name, e), 1)}
                         for e in efs],
               "target_recall": target, "ef": ef}
        records.append(rec)
        if ef is None:
            print(f"{s.name:28s} never reaches recall@10 {target} (best {max(recalls[(s.name, e)] for e in efs):.4f}) "
                  f"build={build_s[s.name]:.1f}s unreachable={lost[s.name]:.2%}")
            continue
        s.set_ef(ef)
        lat = []
        for i in range(min(latency_queries, len(queries))):
            q = queries[i:i + 1]
            t0 = time.perf_counter()
            s.search(q, K)
            lat.append(time.perf_counter() - t0)
        p50, p99 = percentiles_ms(lat)
        q_ = qps(s.name, ef)
        ratio = q_ / faiss_qps if faiss_qps else float("nan")
        eff = f"(eff {max(ef, K * s.oversample)})" if getattr(s, "rescore", False) else ""
        print(f"{s.name:28s} ef={ef:<4d}{eff:9s} recall@10={recalls[(s.name, ef)]:.4f} QPS={q_:8.0f} "
              f"latency p50={p50:.3f}ms p99={p99:.3f}ms build={build_s[s.name]:5.1f}s "
              f"unreachable={lost[s.name]:.2%} QPS vs faiss x{ratio:.2f}")
        rec.update(recall_at_10=round(recalls[(s.name, ef)], 5), qps=round(q_, 1), p50_ms=round(p50, 4),
                   p99_ms=round(p99, 4), qps_vs_faiss=round(ratio, 3))
    ours = [r for r in records if r["system"].startswith("ours") and r.get("qps")]
    if ours and faiss_qps:
        best = max(ours, key=lambda r: r["qps"])
        print(f"-- {dataset}: best of ours at recall@10 >= {target}: {best['system']} {best['qps']:.0f} QPS = "
              f"x{best['qps_vs_faiss']:.2f} faiss ({faiss_qps:.0f} QPS); target x1.00 "
              f"{'met' if best['qps_vs_faiss'] >= 1 else 'MISSED'}")
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=("fashion-mnist", "squad", "all"), default="all")
    ap.add_argument("--queries", type=int, default=None,
                    help="queries per dataset (default: the first 1000 fashion-mnist test images; every SQuAD "
                         "question, since small-index timings need more queries to be stable)")
    ap.add_argument("--squad", type=Path, default=DEFAULT_SQUAD, help="SQuAD v1.1 dev JSON")
    ap.add_argument("--variant", choices=("fp32", "int8"), default="int8", help="embedding model variant (squad)")
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "rag-bench-cache"),
                    help="where SQuAD vectors are cached ('' to always embed)")
    ap.add_argument("--M", type=int, default=16, help="HNSW connectivity for every system")
    ap.add_argument("--ef-construction", type=int, default=128)
    ap.add_argument("--ef", default="16,24,32,48,64,96,128,192,256", help="comma-separated efSearch sweep")
    ap.add_argument("--threads", type=int, default=2, help="search threads for every system")
    ap.add_argument("--build-threads", type=int, default=None, help="build threads (default: --threads)")
    ap.add_argument("--unreachable-sample", type=int, default=2000, help="base rows checked for reachability")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--oversample", type=int, default=4, help="candidates = k * oversample when rescoring")
    ap.add_argument("--target", type=float, default=0.99, help="recall@10 of the operating point")
    ap.add_argument("--latency-queries", type=int, default=300)
    args = ap.parse_args()
    efs = sorted(int(x) for x in args.ef.split(","))

    datasets = ("fashion-mnist", "squad") if args.dataset == "all" else (args.dataset,)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for ds in datasets:
        if ds == "fashion-mnist":
            base, queries = load_fashion(args.queries or 1000)
        else:
            cache = Path(args.cache_dir) if args.cache_dir else None
            base, queries = load_squad(args.squad, args.queries, args.variant, cache)
        records = run(ds, base, queries, m=args.M, ef_construction=args.ef_construction, efs=efs,
                      threads=args.threads, build_threads=args.build_threads or args.threads,
                      repeats=args.repeats, oversample=args.oversample, target=args.target,
                      latency_queries=args.latency_queries, unreachable_sample=args.unreachable_sample)
        with RESULTS.open("a") as f:
            for r in records:
                r["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
