"""How does the gRPC server hold up under concurrent clients, and what does serving cost?

    .venv/bin/python benchmarks/grpc_load.py [--concurrency 1,8,32,128] [--seconds 10]

Starts `rag serve` in a separate process on a temporary data dir, ingests SQuAD v1.1 dev
paragraphs (or the sample corpus if SQuAD is absent), then drives it from this process
with N concurrent client threads for `--seconds` each: `Search` (one query per call,
micro-batched by the server), `SearchBatch` (64 queries per call) and `Answer` (time to
first token, inter-token latency; beyond the server's generation limits calls are
rejected with RESOURCE_EXHAUSTED, counted as `rejected`). Finally the same queries are
searched in process (Engine.search_batch on the same collection, same batch size), and the
ratio served/in-process for SearchBatch is printed (target >= 0.8). One JSON line per
measurement goes to bench-results/grpc_load.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from server.client import RagClient  # noqa: E402

SQUAD = REPO.parent / "shared" / "data" / "squad-dev-v1.1.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def corpus() -> tuple[list[dict], list[str]]:
    if SQUAD.exists():
        data = json.loads(SQUAD.read_text())["data"]
        docs, qs = [], []
        for art in data:
            for i, p in enumerate(art["paragraphs"]):
                docs.append({"id": f"{art['title']}-{i}", "text": p["context"], "metadata": {"title": art["title"]}})
                qs += [qa["question"] for qa in p["qas"]]
        return docs, qs
    docs = [{"id": p.name, "text": p.read_text()} for p in (REPO / "examples/corpus").rglob("*.*")
            if p.suffix in (".txt", ".md")]
    return docs, [f"question {i} about tea bread lighthouses planets" for i in range(2000)]


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def log(rec: dict) -> None:
    out = REPO / "bench-results"
    out.mkdir(exist_ok=True)
    with open(out / "grpc_load.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), **rec}) + "\n")


def drive(address: str, n: int, seconds: float, work) -> dict:
    """Run `work(client, i)` in n threads for `seconds`; returns latencies and errors."""
    stop = time.perf_counter() + seconds
    lat: list[float] = []
    extra: list = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    clients = [RagClient(address, timeout=300) for _ in range(min(n, 16))]

    def loop(t: int) -> None:
        i = t
        c = clients[t % len(clients)]
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                more = work(c, i)
                with lock:
                    lat.append(time.perf_counter() - t0)
                    if more:
                        extra.append(more)
            except grpc.RpcError as e:
                with lock:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1
                time.sleep(0.05)
            i += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(t,)) for t in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    return {"calls": len(lat), "wall": wall, "lat": lat, "extra": extra, "errors": errors}


def run(args) -> None:
    docs, questions = corpus()
    docs = docs[:args.docs]
    port = free_port()
    address = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "RAG_DATA_DIR": tmp}
        proc = subprocess.Popen([str(Path(sys.executable).parent / "rag"), "serve", "--address", address],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            client = RagClient(address, timeout=600)
            for _ in range(600):
                try:
                    client.info()
                    break
                except grpc.RpcError:
                    time.sleep(0.2)
            client.create_collection("bench")
            t0 = time.perf_counter()
            client.ingest("bench", docs)
            print(f"server up; ingested {len(docs)} documents in {time.perf_counter() - t0:.1f}s; "
                  f"{len(questions)} queries available")
            bs = args.batch_size
            batches = [questions[i:i + bs] for i in range(0, len(questions) - bs, bs)]
            client.search("bench", questions[0], 10)  # warm-up
            served_batch_qps = {}
            for n in args.concurrency:
                r = drive(address, n, args.seconds, lambda c, i: c.search("bench", questions[i % len(questions)], 10))
                qps = r["calls"] / r["wall"]
                print(f"Search       c={n:<4} {qps:8.1f} QPS  p50 {pct(r['lat'], 50) * 1e3:7.1f} ms  "
                      f"p95 {pct(r['lat'], 95) * 1e3:7.1f}  p99 {pct(r['lat'], 99) * 1e3:7.1f}  errors {r['errors']}",
                      flush=True)
                log({"rpc": "Search", "concurrency": n, "qps": qps, "p50_ms": pct(r["lat"], 50) * 1e3,
                     "p95_ms": pct(r["lat"], 95) * 1e3, "p99_ms": pct(r["lat"], 99) * 1e3, "errors": r["errors"]})
                r = drive(address, n, args.seconds,
                          lambda c, i: c.search_batch("bench", batches[i % len(batches)], 10))
                qps = r["calls"] * bs / r["wall"]
                served_batch_qps[n] = qps
                print(f"SearchBatch  c={n:<4} {qps:8.1f} QPS  p50 {pct(r['lat'], 50) * 1e3:7.1f} ms  "
                      f"p95 {pct(r['lat'], 95) * 1e3:7.1f}  p99 {pct(r['lat'], 99) * 1e3:7.1f}  "
                      f"(batches of {bs})  errors {r['errors']}", flush=True)
                log({"rpc": "SearchBatch", "concurrency": n, "qps": qps, "batch": bs,
                     "p50_ms": pct(r["lat"], 50) * 1e3, "p95_ms": pct(r["lat"], 95) * 1e3,
                     "p99_ms": pct(r["lat"], 99) * 1e3, "errors": r["errors"]})
            for n in args.answer_concurrency:
                def answer(c, i):
                    t0 = time.perf_counter()
                    first, last, gaps = None, None, []
                    for msg in c.answer("bench", questions[i % len(questions)], max_new_tokens=args.new_tokens):
                        if msg.WhichOneof("event") == "delta":
                            now = time.perf_counter()
                            if first is None:
                                first = now - t0
                            else:
                                gaps.append(now - last)
                            last = now
                    return (first, gaps)

                r = drive(address, n, args.seconds * 3, answer)
                ttft = [x[0] for x in r["extra"] if x[0] is not None]
                itl = [g for x in r["extra"] for g in x[1]]
                print(f"Answer       c={n:<4} {r['calls'] / r['wall']:8.2f} answers/s  TTFT p50 "
                      f"{pct(ttft, 50) * 1e3:7.0f} ms p95 {pct(ttft, 95) * 1e3:7.0f}  inter-token p50 "
                      f"{pct(itl, 50) * 1e3:6.1f} ms p99 {pct(itl, 99) * 1e3:6.1f}  rejected/errors {r['errors']}",
                      flush=True)
                log({"rpc": "Answer", "concurrency": n, "answers_per_s": r["calls"] / r["wall"],
                     "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p95_ms": pct(ttft, 95) * 1e3,
                     "itl_p50_ms": pct(itl, 50) * 1e3, "itl_p99_ms": pct(itl, 99) * 1e3, "errors": r["errors"]})
            client.close()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        # In-process baseline on the same collection, same batches, server stopped.
        from engine.config import Config
        from engine.pipeline import Engine

        eng = Engine(Config(data_dir=Path(tmp)))
        eng.search_batch("bench", batches[0], 10)
        t0 = time.perf_counter()
        done = 0
        while time.perf_counter() - t0 < args.seconds:
            eng.search_batch("bench", batches[done % len(batches)], 10)
            done += 1
        local_qps = done * bs / (time.perf_counter() - t0)
        eng.close()
        best = max(served_batch_qps.values())
        print(f"in-process search_batch {local_qps:8.1f} QPS; served SearchBatch best {best:8.1f} QPS; "
              f"ratio served/in-process {best / local_qps:.2f} (target >= 0.8)")
        log({"rpc": "SearchBatch-vs-in-process", "in_process_qps": local_qps, "served_qps": best,
             "ratio": best / local_qps})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128])
    p.add_argument("--answer-concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--docs", type=int, default=2067)
    p.add_argument("--new-tokens", type=int, default=32)
    run(p.parse_args())


if __name__ == "__main__":
    main()
