"""How fast is our chunker (Numba kernels) against the plain-Python reference, on real text?

    .venv/bin/python benchmarks/chunk_throughput.py [--rounds 3] [--corpus DIR]

Corpus: every *.rst.txt of the Python 3.11 docs' reST sources (Debian python3.11-doc,
~500 files, ~11 MB). The embedding model's tokenizer (no special tokens, no truncation)
tokenizes every file once up front, and the offsets are read out of the encodings in the
form each chunker takes, all timed on their own; both then chunk the same token offsets
(target 254 = the model window, overlap 32):

  ours       engine.chunk.token_ranges (Numba gap_classes + select_chunks) on int64 offset
             arrays (engine.chunk.offsets_array), then (start, end, n_tokens, text) spans
  reference  tests/chunk_reference.py reference_chunks (pure Python, same rules) on the
             encodings' offset lists

Prints kernel-only MB/s for each (median over rounds, the systems taking turns; wall time,
and CPU time of the calling thread, which a busy neighbour disturbs less), the speedup
(median over rounds of reference / ours), per-file latency percentiles, the number of files
whose chunks differ (must be 0), and the end-to-end MB/s of ours as ingestion runs it
(engine.chunk.Chunker.chunk_many: tokenize + read offsets + chunk) with each stage's share.
One JSON line per system goes to bench-results/chunk_throughput.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from chunk_reference import reference_chunks  # noqa: E402
from engine import kernels  # noqa: E402
from engine.chunk import Chunker, offsets_array, token_ranges  # noqa: E402
from engine.config import DEFAULT_CHUNK_OVERLAP, DEFAULT_EMBED_MODEL, DEFAULT_MODELS_DIR  # noqa: E402
from engine.embed import Embedder  # noqa: E402

CORPUS = Path("/usr/share/doc/python3.11/html/_sources")
RESULTS = REPO / "bench-results" / "chunk_throughput.jsonl"


def ours_chunks(text: str, arrays: tuple[np.ndarray, np.ndarray], target: int, overlap: int) -> list[tuple]:
    """Our chunker on offset arrays, as engine.chunk.Chunker runs it, in the reference's tuple form."""
    starts, ends = arrays
    first, last = token_ranges(text, starts, ends, target, overlap)
    out = []
    for a, b in zip(first.tolist(), last.tolist()):
        s, e = int(starts[a]), int(ends[b])
        out.append((s, e, b - a + 1, text[s:e]))
    return out


def timed_pass(fn, docs, inputs, target, overlap):
    """Wall seconds, CPU seconds, per-file wall seconds and the chunks of one pass."""
    per_doc, results = [], []
    t0, c0 = time.perf_counter(), time.thread_time()
    for text, x in zip(docs, inputs):
        t = time.perf_counter()
        results.append(fn(text, x, target, overlap))
        per_doc.append(time.perf_counter() - t)
    return time.perf_counter() - t0, time.thread_time() - c0, per_doc, results


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def clock(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run(args) -> list[dict]:
    paths = sorted(args.corpus.rglob("*.rst.txt"))
    if not paths:
        raise SystemExit(f"no *.rst.txt under {args.corpus}: apt-get install python3.11-doc, or pass --corpus")
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    emb = Embedder(args.model_dir, variant="int8", threads=1)
    target = emb.max_length - emb.special_tokens
    overlap = args.overlap
    tok = emb.raw_tokenizer

    kernels.warmup()  # compile (or load the cache) before timing
    first = tok.encode(docs[0], add_special_tokens=False)
    ours_chunks(docs[0], offsets_array(first), target, overlap)

    encodings, tokenize_s = clock(lambda: tok.encode_batch(docs, add_special_tokens=False))
    lists, lists_s = clock(lambda: [e.offsets for e in encodings])
    arrays, arrays_s = clock(lambda: [offsets_array(e) for e in encodings])
    ntokens = sum(len(o) for o in lists)
    print(f"{len(docs)} files, {mb:.1f} MB, {ntokens} tokens, target {target}, overlap {overlap}, "
          f"{args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    print(f"up front: tokenize (encode_batch, {os.cpu_count()} cores) {tokenize_s:.2f} s = {mb / tokenize_s:.2f} MB/s; "
          f"offsets as lists (reference input) {lists_s:.2f} s; as arrays (ours, offsets_array) {arrays_s:.2f} s")

    systems = {"ours": (ours_chunks, arrays), "reference": (reference_chunks, lists)}
    wall: dict[str, list[float]] = {k: [] for k in systems}
    cpu: dict[str, list[float]] = {k: [] for k in systems}
    per_doc: dict[str, list[float]] = {}
    results: dict[str, list] = {}
    for _ in range(args.rounds):
        for name, (fn, inputs) in systems.items():
            w, c, docs_t, res = timed_pass(fn, docs, inputs, target, overlap)
            wall[name].append(w)
            cpu[name].append(c)
            per_doc[name], results[name] = docs_t, res
    mismatched = sum(a != b for a, b in zip(results["ours"], results["reference"]))
    nchunks = sum(len(r) for r in results["ours"])

    # End to end, the way ingestion calls it: Chunker.chunk_many tokenizes in one parallel
    # batch, reads the offsets out, then chunks. Each round also times those stages one
    # after another, for their shares.
    chunker = Chunker(tok, target=target, overlap=overlap)
    named = list(zip(map(str, paths), docs))
    e2e, stages = [], []
    for _ in range(args.rounds):
        e2e.append(clock(lambda: chunker.chunk_many(named))[1])
        encs, t_tok = clock(lambda: tok.encode_batch(docs, add_special_tokens=False))
        arrs, t_off = clock(lambda: [offsets_array(e) for e in encs])
        _, t_chunk = clock(lambda: [ours_chunks(d, a, target, overlap) for d, a in zip(docs, arrs)])
        stages.append((t_tok, t_off, t_chunk))
    e2e_s = statistics.median(e2e)
    t_tok, t_off, t_chunk = (statistics.median(x) for x in zip(*stages))
    staged = t_tok + t_off + t_chunk

    speedup = statistics.median(r / o for r, o in zip(wall["reference"], wall["ours"]))
    cpu_speedup = statistics.median(r / o for r, o in zip(cpu["reference"], cpu["ours"]))
    records = []
    for name in systems:
        med = statistics.median(wall[name])
        rec = {"system": name, "files": len(docs), "mb": mb, "tokens": ntokens, "chunks": nchunks,
               "target": target, "overlap": overlap, "rounds": args.rounds, "median_s": med,
               "cpu_median_s": statistics.median(cpu[name]), "mb_per_s": mb / med,
               "cpu_mb_per_s": mb / statistics.median(cpu[name]), "tokens_per_s": ntokens / med,
               "file_p50_ms": 1e3 * pct(per_doc[name], 0.5), "file_p99_ms": 1e3 * pct(per_doc[name], 0.99),
               "speedup": speedup if name == "ours" else 1.0,
               "cpu_speedup": cpu_speedup if name == "ours" else 1.0, "mismatched_files": mismatched}
        if name == "ours":
            rec.update(e2e_s=e2e_s, e2e_mb_per_s=mb / e2e_s, e2e_tokenize_s=t_tok, e2e_offsets_s=t_off,
                       e2e_chunk_s=t_chunk, offsets_lists_s=lists_s, offsets_arrays_s=arrays_s)
        records.append(rec)
        print(f"{name:10s} kernel {rec['mb_per_s']:7.2f} MB/s wall ({rec['cpu_mb_per_s']:7.2f} MB/s CPU)  "
              f"{rec['tokens_per_s'] / 1e6:6.2f} M tokens/s  per file p50 {rec['file_p50_ms']:6.3f} ms "
              f"p99 {rec['file_p99_ms']:7.3f} ms  speedup {rec['speedup']:5.1f}x wall, {rec['cpu_speedup']:5.1f}x CPU")
    print(f"identical chunks: {len(docs) - mismatched}/{len(docs)} files ({nchunks} chunks), mismatches {mismatched}")
    print(f"ours end to end (Chunker.chunk_many: tokenize + offsets + chunk): {mb / e2e_s:.2f} MB/s "
          f"({e2e_s:.2f} s); the same stages timed one by one ({staged:.2f} s): tokenize "
          f"{100 * t_tok / staged:.0f}%, offsets out of the encodings {100 * t_off / staged:.0f}%, "
          f"chunk kernels + spans {100 * t_chunk / staged:.0f}%")
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--overlap", type=int, default=DEFAULT_CHUNK_OVERLAP)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODELS_DIR / DEFAULT_EMBED_MODEL)
    args = parser.parse_args(argv)
    records = run(args)
    RESULTS.parent.mkdir(exist_ok=True)
    host = {"python": platform.python_version(), "machine": platform.machine(), "time": time.time(),
            "loadavg": os.getloadavg()[0]}
    with open(RESULTS, "a") as f:
        for rec in records:
            f.write(json.dumps({"benchmark": "chunk_throughput", **host, **rec}) + "\n")
    return 0 if records[0]["mismatched_files"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
