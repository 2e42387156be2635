"""What do huge pages for the weights buy? `rag serve` with glibc's malloc on transparent huge
pages (RAG_HUGE_PAGES=1: engine/cli.py restart_with_huge_pages) against the same process
without them (the default).

    .venv/bin/python benchmarks/huge_pages.py [--pairs 6]

glibc reads its tunables at process start only, so each measurement is a process of its own:
`--pairs` pairs, each one process with the environment `rag serve` restarts itself with
(engine.cli.huge_pages_env: GLIBC_TUNABLES=glibc.malloc.hugetlb=1) and one without, the order
alternating from pair to pair (a slow minute of a shared machine then hits both alike). Each
process loads the generation model as the server does (the machine's execution plan) and
times, on random tokens: the load (the Generator and its row-slots graph), a 400-token prefill
(best of 3), a lone row's one-token run and 4-token verify run (medians of 100 after 10), and
an 8-row verify run of 2 tokens a row (median of 20), and reports the anonymous memory on
huge pages. Prints each pair, the medians, and per measure the median of the paired ratios
(time without / time with: above 1, huge pages are faster) with how many pairs huge pages
won. One JSON line to bench-results/huge_pages.jsonl, with the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_name, log_jsonl  # noqa: E402

MEASURES = ("load_s", "prefill_ms", "step_ms", "verify_ms", "rows8_ms")


def measure() -> dict:
    """In this process: the server's generator, timed (see the module docstring)."""
    import numpy as np

    from engine.config import Config
    from engine.generate import KVBatch
    from engine.pipeline import Engine

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="rag-huge-pages-") as tmp:
        t0 = time.perf_counter()
        engine = Engine(Config(data_dir=Path(tmp)))
        g = engine.generator
        _ = g.rows_session  # the server loads it when its scheduler calibrates
        load = time.perf_counter() - t0
        prompt = [int(x) for x in rng.integers(1000, 20000, 400)]
        prefill = []
        for _ in range(4):
            t0 = time.perf_counter()
            _, kv = g.prefill(prompt)
            prefill.append(time.perf_counter() - t0)
        batch = KVBatch(g, verify=True)
        for _ in range(8):
            batch.add(kv, 600)

        def timed(f, n: int, skip: int) -> float:
            times = []
            for _ in range(n + skip):
                t0 = time.perf_counter()
                f()
                times.append(time.perf_counter() - t0)
            return statistics.median(times[skip:]) * 1e3

        lone = KVBatch(g, verify=True)
        lone.add(kv, 600)
        step = timed(lambda: lone.verify(0, [5]), 100, 10)
        verify = timed(lambda: lone.verify(0, [5, 6, 7, 8]), 100, 10)
        rows8 = timed(lambda: batch.verify_rows(list(range(8)), [[5, 6]] * 8), 20, 3)
        huge = next((int(line.split()[1]) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()
                     if line.startswith("AnonHugePages")), 0)
        plan = engine.execution_plan.describe()
        engine.close()
    return {"load_s": load, "prefill_ms": min(prefill[1:]) * 1e3, "step_ms": step, "verify_ms": verify,
            "rows8_ms": rows8, "anon_huge_mb": huge / 1024, "plan": plan}


def child(huge: bool) -> dict:
    from engine.cli import huge_pages_env

    env = huge_pages_env({**os.environ, "RAG_HUGE_PAGES": "1"}) if huge else None
    if huge and env is None:
        raise SystemExit("huge pages are not available here (engine.cli.huge_pages_env: off Linux or glibc < 2.35, "
                         "transparent huge pages \"never\", or GLIBC_TUNABLES already set)")
    if not huge:
        env = {k: v for k, v in os.environ.items() if k not in ("RAG_HUGE_PAGES", "RAG_HUGE_PAGES_RESTARTED")}
        env["GLIBC_TUNABLES"] = ":".join(t for t in env.get("GLIBC_TUNABLES", "").split(":")
                                         if t and not t.startswith("glibc.malloc.hugetlb"))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child"], env=env,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode:
        raise SystemExit(f"the measuring process failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure()))
        return
    print(f"CPU: {cpu_name()}; {args.pairs} pairs of processes, huge pages on and off, order alternating", flush=True)
    runs: dict[str, list[dict]] = {"huge pages": [], "4 KB pages": []}
    for i in range(args.pairs):
        order = [True, False] if i % 2 == 0 else [False, True]
        for huge in order:
            runs["huge pages" if huge else "4 KB pages"].append(child(huge))
        on, off = runs["huge pages"][-1], runs["4 KB pages"][-1]
        print(f"pair {i + 1}: " + "; ".join(f"{m} {off[m]:.2f} -> {on[m]:.2f}" for m in MEASURES)
              + f" (on huge pages {on['anon_huge_mb']:.0f} MB against {off['anon_huge_mb']:.0f})", flush=True)
    print(f"plan: {runs['huge pages'][0]['plan']}")
    record = {"pairs": args.pairs}
    for m in MEASURES:
        on = [r[m] for r in runs["huge pages"]]
        off = [r[m] for r in runs["4 KB pages"]]
        ratios = [b / a for a, b in zip(on, off)]
        wins = sum(r > 1 for r in ratios)
        print(f"{m:11s} 4 KB pages {statistics.median(off):8.2f}  huge pages {statistics.median(on):8.2f}  "
              f"paired ratio (4 KB / huge) median x{statistics.median(ratios):.3f}, huge pages faster in "
              f"{wins} of {len(ratios)}")
        record.update({f"{m}_4k": statistics.median(off), f"{m}_huge": statistics.median(on),
                       f"{m}_ratio": statistics.median(ratios), f"{m}_huge_wins": wins})
    record["anon_huge_mb"] = statistics.median(r["anon_huge_mb"] for r in runs["huge pages"])
    log_jsonl("huge_pages", record)


if __name__ == "__main__":
    main()
