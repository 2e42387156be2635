"""Could a newcomer's prefill run beside the running batch's decode steps instead of between them?

    .venv/bin/python benchmarks/prefill_overlap.py                   # 1 and 8 rows, 256-token newcomer
    .venv/bin/python benchmarks/prefill_overlap.py --rows 8 --chunk 64 --rounds 3

The scheduler (engine/scheduler.py) runs one thing at a time: a decode step over the batch,
then one prefill chunk of a newcomer, then a step, so while someone joins, every stream's
inter-token gap is a step plus a chunk. The alternative measured here runs the newcomer's
prefill (chunks of `--chunk` on the plan's prefill weights) in a second thread while the
first keeps stepping the batch (`--rows` rows of `--keys` random keys on the plan's decode
weights), with onnxruntime's idle threads spinning or sleeping
(`session.intra_op.allow_spinning` 0) in either session. Baseline, in the same process on
the same data: serial, as the scheduler does, with both sessions' idle threads spinning (the
Generator's sessions) or both sleeping. (Here, serial with both sleeping joined a newcomer
1.36x / 1.53x faster than spinning on the AMX Xeon, one spinning session's threads taking the
cores from the other's run; served, `serve_answers.py` in two A/B pairs, sleeping was 0.86-0.96x
spinning, so the Generator keeps spinning: README "Serving answers".) Per setting: the step time while the
newcomer prefills (median and p99: the streams' inter-token gap), the prefill time, and
the wall time both need against serial (steps alone + prefill alone); also the step time
with no prefill beside it, since sleeping threads slow a one-token step. One JSON line per
setting to bench-results/prefill_overlap.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_name, log_jsonl, pct  # noqa: E402

from engine.config import Config  # noqa: E402
from engine.embed import make_session  # noqa: E402
from engine.generate import VARIANT_FILES, Generator, KVBatch  # noqa: E402
from engine.plan import resolve  # noqa: E402

SETTINGS = {  # name -> (serial, decode threads spin, prefill threads spin)
    "serial, both spinning": (True, True, True),
    "serial, both sleeping": (True, False, False),
    "overlap, both spinning": (False, True, True),
    "overlap, prefill sleeping": (False, True, False),
    "overlap, both sleeping": (False, False, False),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    ap.add_argument("--keys", type=int, default=404, help="keys per decoding row")
    ap.add_argument("--prompt", type=int, default=256, help="the newcomer's prompt tokens")
    ap.add_argument("--chunk", type=int, default=64, help="prefill chunk tokens")
    ap.add_argument("--rounds", type=int, default=2, help="prefills per setting (medians over rounds)")
    ap.add_argument("--threads", type=int, default=Config().threads)
    a = ap.parse_args()

    cfg = Config()
    plan = resolve(cfg.gen_model_dir)
    print(f"CPU: {cpu_name()}; prefill {plan.prefill}, decode {plan.decode}, {a.threads} threads; "
          f"newcomer {a.prompt} tokens in chunks of {a.chunk}, rows of {a.keys} keys", flush=True)
    gens = {}
    for spin in (True, False):  # one Generator per spinning setting, sessions made accordingly
        g = Generator(cfg.gen_model_dir, variant=plan.decode, prefill_variant=plan.prefill, threads=a.threads)
        g.session = make_session(cfg.gen_model_dir / VARIANT_FILES[plan.decode], "cpu", a.threads, spinning=spin)
        g._prefill_session = make_session(cfg.gen_model_dir / VARIANT_FILES[plan.prefill], "cpu", a.threads,
                                          spinning=spin)
        gens[spin] = g
    rng = np.random.default_rng(0)
    newcomer = [int(x) for x in rng.integers(1000, 20000, a.prompt)]
    kv = [(rng.standard_normal((1, gens[True].num_kv_heads, a.keys, gens[True].head_dim)) * 0.5).astype(np.float32)
          for _ in gens[True].past_names]

    def prefill(g: Generator) -> float:
        t0, past = time.perf_counter(), None
        for s in range(0, len(newcomer), a.chunk):
            _, past = g.prefill(newcomer[s:s + a.chunk], past)
        return time.perf_counter() - t0

    for rows in a.rows:
        batches = {}
        for spin, g in gens.items():
            b = KVBatch(g)
            for _ in range(rows):
                b.add(kv, a.keys + 4096)
            batches[spin] = b
        ids = np.full((rows, 1), 100, np.int64)

        def step(b: KVBatch) -> float:
            t = time.perf_counter()
            b.step(ids)
            return time.perf_counter() - t

        for spin in gens:  # warm-up
            step(batches[spin])
            prefill(gens[spin])
        alone = {spin: [step(batches[spin]) for _ in range(16)] for spin in gens}
        serial_prefill = {spin: [prefill(gens[spin]) for _ in range(a.rounds)] for spin in gens}
        base = {}
        for name, (serial, dspin, pspin) in SETTINGS.items():
            if serial:  # the scheduler's way: a step, a chunk, a step...
                gaps, walls = [], []
                g, b = gens[dspin], batches[dspin]
                for _ in range(a.rounds):
                    t0, past = time.perf_counter(), None
                    for s in range(0, len(newcomer), a.chunk):
                        t = time.perf_counter()
                        b.step(ids)
                        _, past = g.prefill(newcomer[s:s + a.chunk], past)
                        gaps.append(time.perf_counter() - t)
                    walls.append(time.perf_counter() - t0)
                steps_done = len(gaps)
                pre = pct(serial_prefill[dspin], 50)
                wall = sum(walls) / a.rounds
                serial_wall = wall
            else:
                g_pre, b = gens[pspin], batches[dspin]
                gaps, walls, pres = [], [], []
                for _ in range(a.rounds):
                    out = []
                    th = threading.Thread(target=lambda: out.append(prefill(g_pre)))
                    t0 = time.perf_counter()
                    th.start()
                    while th.is_alive():
                        gaps.append(step(b))
                    th.join()
                    walls.append(time.perf_counter() - t0)
                    pres.append(out[0])
                steps_done = len(gaps)
                pre = pct(pres, 50)
                # the same work done serially: these steps alone plus the prefill alone
                serial_wall = (steps_done / a.rounds) * pct(alone[True], 50) + pct(serial_prefill[True], 50)
                wall = sum(walls) / a.rounds
            rec = {"rows": rows, "keys": a.keys, "prompt": a.prompt, "chunk": a.chunk, "setting": name,
                   "step_alone_ms": pct(alone[dspin], 50) * 1e3,
                   "gap_p50_ms": pct(gaps, 50) * 1e3, "gap_p99_ms": pct(gaps, 99) * 1e3,
                   "prefill_ms": pre * 1e3, "steps_per_prefill": steps_done / a.rounds,
                   "wall_ms": wall * 1e3, "serial_wall_ms": serial_wall * 1e3, "wall_ratio": serial_wall / wall,
                   "threads": a.threads, "prefill_variant": plan.prefill, "decode_variant": plan.decode}
            base.setdefault("gap", rec["gap_p50_ms"])
            print(f"rows {rows} {name:26s}: step alone {rec['step_alone_ms']:6.1f} ms, gap while joining "
                  f"p50/p99 {rec['gap_p50_ms']:6.1f}/{rec['gap_p99_ms']:6.1f} ms (x{rec['gap_p50_ms'] / base['gap']:.2f} "
                  f"serial's), prefill {rec['prefill_ms']:6.0f} ms, {rec['steps_per_prefill']:.1f} steps meanwhile, "
                  f"same work serially / this x{rec['wall_ratio']:.2f}", flush=True)
            log_jsonl("prefill_overlap", rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
