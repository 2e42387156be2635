"""How many answers does the server deliver to concurrent clients, and how fast does each one flow?

    .venv/bin/python benchmarks/serve_answers.py                       # both regimes, c = 1,2,4,8,16
    .venv/bin/python benchmarks/serve_answers.py --regimes rag --concurrency 1,8 --seconds 40

The real server (server.app.create_server, gRPC over loopback) answers SQuAD v1.1 dev
questions over `--docs` of its paragraphs, from `c` client threads that each ask one
question after another for `--seconds`, in a process of their own as a load generator is
(`--in-process-clients`: threads of the server's process, whose interpreter lock they then
share with the server's handlers and scheduler). Two regimes, because a RAG request is
mostly prompt:
  decode  top_k 1 (prompts of ~150-300 tokens), 128 new tokens (ignore_eos): decode-bound;
  rag     top_k and packing as configured (default k 3 with 350-token packing: prompts of
          ~400-450 tokens; k 5 with whole chunks gave ~700-1,000), 32 new tokens: prefill-bound.
Per (regime, c): TTFT p50/p95, inter-token p50/p99 (gaps between streamed deltas), time
per output token p50/p99 over answers (TPOT as vLLM's benchmark defines it: an answer's
time after its first token over its tokens after the first; a delta may carry several
tokens, drafts kept in one run, or none a client can see, tokens with no text),
aggregate generated tokens/s, served prompt tokens/s, answers/s, prompt tokens served from
the prefix cache. The in-run baseline is the same server with the scheduler at one row
(`max_concurrent_generations=1`: answers run one at a time, as a server without continuous
batching does); ratios `ours / one-at-a-time` are printed. `--systems ours,no-drafts` runs
a second baseline, the same server with speculative decoding off (`speculative_tokens=0`),
and prints `ours / no-drafts`; `verify=VARIANT` one with drafts verified on VARIANT's
weights (Config.gen_verify_variant) instead of the plan's choice; `spinning` one whose
generator sessions' idle threads spin on after a run (Config.stop_spinning False); `stall=MS`
one with Config.prefill_stall_ms MS (how long a newcomer's prefill may hold streams up),
printing its own c=N/c=1 ratios; `throughput` one with Config.plan_objective "throughput"
(full batches on the plan's throughput variant, no drafts), its own ratios too;
`fixed-drafts` one whose speculating answers always draft up to the plan's count
(Config.adaptive_drafts False).
Systems that change the generator load their own. Per measurement, also where the server's
generation loop spent it (Engine.generation_usage: shares in prefill runs, one-token steps
and verify runs, the prefill runs' rate) and how the prompt tokens got their keys
(prefilled, riding in verify runs, from the prefix cache). Also measured in process: the
single-stream prefill rate at the rag prompt size (served prompt tokens/s at c=8 should be
>= 0.9x of it; the first of three runs, as before, and the best of them, both printed: the
first swung 960-1,400 tok/s on the Zen 5 EPYC), and a repeated question's TTFT against its
cold TTFT (prefix cache). Each
c > 1 also prints a ceiling: the generated tokens/s no scheduler could beat here, with every
token (uncached prompt or generated, as served) at the best in-process prefill rate; and for
c <= 8 a tighter one, the generated tokens at the best full-batch rate the machine's plan
measured (8-row one-token steps, or 8 x 4 verify runs keeping every draft).
With --peers, a single-stream section: the same RAG prompts (as text, chat template
included), one at a time, same threads, greedy, through ours (the machine's execution plan),
llama.cpp (llama-cpp-python built from source, on the GGUF that `make models` assembles) and
onnxruntime-genai (its int4 build of the HF folder `make models` produced); each peer runs in
its own virtual environment (`make peers`) through benchmarks/_peer_lm.py. Prefill tok/s
(prompt tokens / time to first token) and decode tok/s, with ratios ours / peer. Ours runs
through the scheduler three times, with speculative decoding as configured (drafts from the
prompt, Config.speculative_tokens), with drafts fixed at that count, and without (each
prompt through the three back to back, the first rotating); llama.cpp runs twice too, plain
and with its own prompt lookup drafting (LlamaPromptLookupDecoding, --peer-lookup tokens a
step). The prompts are
the engine's (k 3, packed: ~400 tokens) unless `--peer-k 5 --peer-whole-chunks` asks for the
longer ones the serving issue's single-stream targets were set at (whole chunks: ~850).
`--rounds N` measures every (regime, system, c) N times, the systems taking turns (a slow
minute of a shared machine then hits each alike), and the tables and ratios take each
number's median.
One JSON line per measurement goes to bench-results/serve_answers.jsonl, with the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402
from _common import (SQUAD, cpu_name, log_jsonl, pct, rag_prompts, rotated, shuffled_questions,  # noqa: E402
                     squad_paragraphs)

from engine.config import PLAN_OBJECTIVES, Config  # noqa: E402
from engine.documents import Document  # noqa: E402
from engine.generate import Completion, SamplingParams  # noqa: E402
from engine.pipeline import Engine  # noqa: E402
from engine.plan import MEASURE_BATCH_ROWS, MEASURE_VERIFY_TOKENS  # noqa: E402
from engine.scheduler import Scheduler  # noqa: E402
from server.app import create_server  # noqa: E402
from server.client import RagClient  # noqa: E402

# decode: answers run to max_new_tokens (ignore_eos), so the regime stays decode-bound
REGIMES = {"decode": {"top_k": 1, "max_new_tokens": 128, "ignore_eos": True},
           "rag": {"top_k": None, "max_new_tokens": 32, "ignore_eos": False}}


def one_stream(client: RagClient, question: str, top_k: int | None, max_new: int, ignore_eos: bool) -> dict:
    t0 = time.perf_counter()
    stamps, done = [], None
    for msg in client.answer("squad", question, k=top_k, max_new_tokens=max_new, ignore_eos=ignore_eos, timeout=600):
        kind = msg.WhichOneof("event")
        if kind == "delta":
            stamps.append(time.perf_counter())
        elif kind == "done":
            done = msg.done
    end = time.perf_counter()
    tokens = done.usage.completion_tokens
    return {"ttft": (stamps[0] - t0) if stamps else end - t0, "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
            "tpot": (end - stamps[0]) / (tokens - 1) if stamps and tokens > 1 else None,
            "tokens": tokens, "prompt": done.usage.prompt_tokens,
            "cached": done.usage.cached_tokens, "seconds": end - t0}


# Config fields that make another Generator: a system that changes one loads its own
GENERATOR_SETTINGS = ("gen_variant", "gen_prefill_variant", "gen_verify_variant", "plan_objective",
                      "stop_spinning", "threads")

_cursor = [0]  # questions are never reused across measurements: the prefix cache sees each once


def client_threads(port: int, questions: list[str], c: int, seconds: float, regime: str) -> dict:
    """c clients, each asking the next of `questions` as soon as its last answer is done, for
    `seconds`: their answers' measurements, errors, the wall time and how many questions went."""
    cfg = REGIMES[regime]
    results, errors = [], []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    used = [0]

    def client_loop() -> None:
        client = RagClient(f"127.0.0.1:{port}", timeout=600)
        try:
            while time.perf_counter() < stop_at:
                with lock:
                    q = questions[used[0] % len(questions)]
                    used[0] += 1
                try:
                    r = one_stream(client, q, cfg["top_k"], cfg["max_new_tokens"], cfg["ignore_eos"])
                except grpc.RpcError as e:
                    with lock:
                        errors.append(e.code().name)
                    continue
                with lock:
                    results.append(r)
        finally:
            client.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the wall includes finishing the answers in flight at stop_at
    return {"results": results, "errors": errors, "wall": time.perf_counter() - t0, "used": used[0]}


def drive(port: int, questions: list[str], c: int, seconds: float, regime: str, *, in_process: bool = False) -> dict:
    """c clients against the server at `port`: in a process of their own (as a load generator
    is: their threads then never wait on the server's interpreter lock, nor it on theirs), or
    `in_process`, threads of this one. Questions are never reused across measurements."""
    start = _cursor[0]
    window = questions[start % len(questions):] + questions[:start % len(questions)]
    if in_process:
        out = client_threads(port, window, c, seconds, regime)
    else:
        job = {"port": port, "questions": window, "c": c, "seconds": seconds, "regime": regime}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--drive-clients"],
                              input=json.dumps(job), capture_output=True, text=True, timeout=seconds + 3600)
        if proc.returncode:
            raise SystemExit(f"the client process failed:\n{proc.stderr[-2000:]}")
        out = json.loads(proc.stdout.splitlines()[-1])
    _cursor[0] += out["used"]
    results, wall = out["results"], out["wall"]
    gaps = [g for r in results for g in r["gaps"]]
    tpots = [r["tpot"] for r in results if r["tpot"] is not None]
    return {"answers": len(results), "errors": out["errors"], "wall_s": wall, "questions_from": start,
            "answers_per_s": len(results) / wall,
            "gen_tok_per_s": sum(r["tokens"] for r in results) / wall,
            "gen_tokens": sum(r["tokens"] for r in results),
            "prompt_tok_per_s": sum(r["prompt"] for r in results) / wall,
            "prompt_tokens_p50": pct([r["prompt"] for r in results], 50),
            "cached_tokens": sum(r["cached"] for r in results),
            "prompt_tokens": sum(r["prompt"] for r in results),
            "ttft_p50_s": pct([r["ttft"] for r in results], 50), "ttft_p95_s": pct([r["ttft"] for r in results], 95),
            "itl_p50_ms": pct(gaps, 50) * 1e3, "itl_p99_ms": pct(gaps, 99) * 1e3,
            "tpot_p50_ms": pct(tpots, 50) * 1e3, "tpot_p99_ms": pct(tpots, 99) * 1e3}


def loop_usage(before: dict, after: dict, wall: float) -> dict:
    """Where the server's generation loop spent a measurement (Engine.generation_usage
    before and after it, `wall` seconds apart: the client process's start included): the
    share of that time in prefill runs, one-token steps and verify runs, the rate of the
    prefill runs (tokens prefilled in runs of their own / their seconds), and the shares of
    the prompt tokens prefilled, riding in verify runs and found in the prefix cache."""
    secs = {k: after["seconds"][k] - before["seconds"][k] for k in after["seconds"]}
    runs = {k: after["runs"][k] - before["runs"][k] for k in after["runs"]}
    tokens = {k: after["prompt_tokens"][k] - before["prompt_tokens"][k] for k in after["prompt_tokens"]}
    prompt = max(sum(tokens.values()), 1)
    return {**{f"loop_{k}_share": v / wall for k, v in secs.items()}, **{f"loop_{k}_runs": v for k, v in runs.items()},
            "loop_prefill_run_tok_per_s": tokens["prefilled"] / secs["prefill"] if secs["prefill"] else 0.0,
            **{f"prompt_{k}_share": v / prompt for k, v in tokens.items()}}


def print_loop_usage(summary: dict) -> None:
    print("\nwhere the generation loop's time went (share of each measurement, its client process's start "
          "included), and how prompt tokens got their keys")
    for (regime, name, c), r in summary.items():
        if "loop_prefill_share" not in r:
            continue
        outside = 1 - r["loop_prefill_share"] - r["loop_step_share"] - r["loop_verify_share"]
        print(f"{regime:7s} {c:<3d} {name:15s} prefill runs {100 * r['loop_prefill_share']:3.0f}% "
              f"({r['loop_prefill_runs']:.0f}, {r['loop_prefill_run_tok_per_s']:,.0f} tok/s), verify runs "
              f"{100 * r['loop_verify_share']:3.0f}% ({r['loop_verify_runs']:.0f}), steps "
              f"{100 * r['loop_step_share']:3.0f}% ({r['loop_step_runs']:.0f}), outside runs {100 * outside:3.0f}%; "
              f"prompt tokens prefilled {100 * r['prompt_prefilled_share']:.0f}%, riding "
              f"{100 * r['prompt_riding_share']:.0f}%, cached {100 * r['prompt_cached_share']:.0f}%")


def ceiling(regime: str, c: int, c1: int, ours: dict, one: dict, single: dict, rates: dict) -> str:
    """The most generated tokens/s c streams could get here, whatever the scheduler: every
    token, an uncached prompt token or a generated one, takes a place in some run, and no run
    processes tokens faster than a long prefill does (the best of the in-process runs: a run
    of many tokens is arithmetic-bound; a full verify run of 8 rows x 4 tokens is slower, see
    engine/plan.py's verify_full), so gen tok/s <= prefill rate / (1 + uncached prompt tokens
    per generated token), that ratio as this measurement served it. A second, tighter one
    for c <= MEASURE_BATCH_ROWS, from the rates the machine's plan measured (`rates`): the
    prompt tokens at that prefill rate and the generated ones at the best full-batch rate of
    any variant, one-token steps of 8 rows or verify runs of 8 rows x 4 tokens keeping every
    draft (no run of c <= 8 rows decodes faster per token than those, unless longer runs
    with more drafts kept). Logged as a JSON line too."""
    fresh = (ours["prompt_tokens"] - ours["cached_tokens"]) / max(ours["gen_tokens"], 1)
    prefill = single["prefill_best_tok_per_s"]
    top = prefill / (1 + fresh)
    full = max(((r.get(phase, 0.0), f"{v} {how}") for v, r in rates.items()
                for phase, how in (("batch_decode", f"{MEASURE_BATCH_ROWS}-row one-token steps"),
                                   ("verify_full", f"{MEASURE_BATCH_ROWS} x {MEASURE_VERIFY_TOKENS} verify runs "
                                                   "keeping every draft"))), default=(0.0, ""))
    runs = 1 / (fresh / prefill + 1 / full[0]) if full[0] > 0 and c <= MEASURE_BATCH_ROWS else None
    log_jsonl("serve_answers", {"system": "ceiling", "regime": regime, "concurrency": c,
                                "uncached_prompt_per_gen_token": fresh,
                                "prefill_tok_per_s": prefill, "gen_tok_per_s": top,
                                "vs_ours_c1": top / one["gen_tok_per_s"], "ours_share": ours["gen_tok_per_s"] / top,
                                "full_batch_gen_tok_per_s": full[0] if runs else None, "full_batch_run": full[1],
                                "runs_gen_tok_per_s": runs,
                                "runs_vs_ours_c1": runs / one["gen_tok_per_s"] if runs else None})
    line = (f"{regime} c={c}: ceiling {top:.0f} gen tok/s ({fresh:.2f} uncached prompt tokens a generated one, "
            f"all at the best in-process prefill rate {prefill:.0f} tok/s): "
            f"x{top / one['gen_tok_per_s']:.2f} ours c={c1}; served x{ours['gen_tok_per_s'] / top:.2f} of it")
    if runs:
        line += (f"; at the plan's full-batch rate ({full[0]:.0f} tok/s, {full[1]}) {runs:.0f} gen tok/s: "
                 f"x{runs / one['gen_tok_per_s']:.2f} ours c={c1}; served x{ours['gen_tok_per_s'] / runs:.2f} of it")
    return line


def single_stream_prefill(engine: Engine, question: str, other: str) -> dict:
    """In process, no server: the prefill rate of one RAG prompt alone, and a repeated
    question's TTFT against its cold one (the second run reads its prefix from the cache).
    The scheduler first answers `other`, so the cold run does not find the prompts' common
    head uncached (nor, before the calibration waited for two answers at once, for the loop's
    calibration, which loads and times graphs)."""
    params = SamplingParams(max_new_tokens=1)

    def prompt(q: str) -> list[int]:
        return engine.build_prompt(q, engine.search("squad", q, engine.config.answer_k), 32)[0]

    ids = prompt(question)
    times = []
    for _ in range(3):  # the first is the reported rate (as before); the best bounds the ceilings
        t0 = time.perf_counter()
        next(ev for ev in engine.generator.stream_ids(ids, params) if isinstance(ev, Completion))
        times.append(time.perf_counter() - t0)
    alone = times[0]
    engine.scheduler.submit(prompt(other), params).result()
    cold = engine.scheduler.submit(ids, params).result()
    warm = engine.scheduler.submit(ids, params).result()
    return {"prompt_tokens": len(ids), "prefill_tok_per_s": len(ids) / alone,
            "prefill_best_tok_per_s": len(ids) / min(times),
            "cold_ttft_s": cold.first_token_ns / 1e9, "warm_ttft_s": warm.first_token_ns / 1e9,
            "cold_cached_tokens": cold.cached_tokens, "warm_cached_tokens": warm.cached_tokens,
            "repeat_speedup": cold.first_token_ns / warm.first_token_ns}


PEERS = {  # name -> (python of its virtual environment, model it loads), as `make peers` builds them
    "llama.cpp": (REPO / ".cache/peers/llama/bin/python",
                  REPO / ".cache/gguf/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct.gguf"),
    "onnxruntime-genai int4": (REPO / ".cache/peers/genai/bin/python",
                               REPO / ".cache/genai/qwen2.5-coder-0.5b-instruct-int4"),
}


def single_stream_peers(engine: Engine, questions: list[str], args) -> dict:
    """Ours and each peer, one prompt at a time, on the same RAG prompt texts."""
    gen = engine.generator
    prompts = rag_prompts(engine, "squad", questions[:args.peer_prompts], args.peer_k,  # --peer-whole-chunks:
                          args.peer_whole_chunks, args.peer_new_tokens)  # the long RAG prompts
    texts = [gen.tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]
    params = SamplingParams(max_new_tokens=args.peer_new_tokens)
    plan = engine.execution_plan
    k, adaptive = engine.config.draft_tokens, engine.config.adaptive_drafts
    # as configured first (the ratios below are against it), then drafts fixed at k, then none;
    # each prompt through all three back to back, the first rotating (a lone pass of a few
    # prompts per system swung ±10% between passes on the Zen 5 EPYC)
    ours = {}
    for draft, adapt in dict.fromkeys(((k, adaptive), (k, False), (0, False))):
        scheduler = Scheduler(gen, max_rows=1, prefix_cache_mb=0, draft_tokens=draft, adaptive_drafts=adapt,
                              draft_worth=plan.draft_worth())  # as the engine's (Engine.scheduler)
        scheduler.submit(gen.encode("Hello"), params).result()  # warms up, as each peer does (_peer_lm.py)
        spec = (f", {'adaptive ' if adapt else ''}drafts of {'up to ' if adapt else ''}{draft} from the prompt "
                f"verified on {gen.verify_variant}" if draft else "")
        ours[f"ours ({plan.prefill} prefill, {plan.decode} decode{spec})"] = scheduler
    results = {name: [] for name in ours}
    names = list(ours)
    for i, ids in enumerate(prompts):
        for name in rotated(names, i):
            t0 = time.perf_counter()
            stamps = []
            for ev in ours[name].submit(ids, params):
                if not isinstance(ev, Completion):
                    stamps.append(time.perf_counter())
            results[name].append({"prompt_tokens": len(ids), "prefill_s": stamps[0] - t0,
                                  "decode_tok_per_s": (ev.completion_tokens - 1) / (stamps[-1] - stamps[0])
                                  if len(stamps) > 1 else float("nan"), "accepted": ev.accepted_prediction_tokens})
    for scheduler in ours.values():
        scheduler.close()
    threads = engine.config.threads
    for name, (python, model) in PEERS.items():
        if not python.exists() or not model.exists():
            print(f"peer {name}: not set up ({python if not python.exists() else model} missing); `make peers`")
            continue
        for lookup in ((0, args.peer_lookup) if name == "llama.cpp" and args.peer_lookup else (0,)):
            job = {"peer": "llama" if name == "llama.cpp" else "genai", "model": str(model), "threads": threads,
                   "new_tokens": args.peer_new_tokens, "prompts": texts, "prompt_lookup": lookup}
            proc = subprocess.run([str(python), str(REPO / "benchmarks/_peer_lm.py")], input=json.dumps(job),
                                  capture_output=True, text=True, timeout=3600)
            label = f"{name} (prompt lookup, {lookup} a step)" if lookup else name
            if proc.returncode:
                print(f"peer {label} failed:\n{proc.stderr[-2000:]}")
                continue
            results[label] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary = {}
    for name, rs in results.items():
        tokens = sum(r["prompt_tokens"] for r in rs)
        summary[name] = {"prompts": len(rs), "prompt_tokens_mean": tokens / len(rs),
                         "prefill_tok_per_s": tokens / sum(r["prefill_s"] for r in rs),
                         "ttft_p50_s": pct([r["prefill_s"] for r in rs], 50),
                         "decode_tok_per_s": statistics.median(r["decode_tok_per_s"] for r in rs)}
        log_jsonl("serve_answers", {"system": name, "regime": "single-stream", "threads": threads, **summary[name]})
    return summary


def print_peers(summary: dict) -> None:
    print("\nsingle stream (same prompts, one at a time)   prompt tok  prefill tok/s  TTFT p50 s  decode tok/s")
    for name, r in summary.items():
        print(f"{name:45s} {r['prompt_tokens_mean']:10.0f} {r['prefill_tok_per_s']:14.1f} {r['ttft_p50_s']:11.2f} "
              f"{r['decode_tok_per_s']:13.1f}")
    ours = next(iter(summary.values()))
    for name, r in list(summary.items())[1:]:
        print(f"ours / {name}: prefill x{ours['prefill_tok_per_s'] / r['prefill_tok_per_s']:.2f}, "
              f"decode x{ours['decode_tok_per_s'] / r['decode_tok_per_s']:.2f}")


def run(args) -> None:
    paragraphs = squad_paragraphs(args.squad, limit=args.docs)
    questions = shuffled_questions(paragraphs)  # consecutive clients ask about different paragraphs
    print(f"CPU: {cpu_name()}; {len(paragraphs)} SQuAD paragraphs, {len(questions)} questions; "
          f"{args.seconds:.0f}s per measurement", flush=True)
    with tempfile.TemporaryDirectory(prefix="rag-serve-bench-") as tmp:
        base = Config(data_dir=Path(tmp), wal_fsync="off", max_queued_generations=64,
                      max_concurrent_generations=max(args.concurrency),
                      **({"gen_variant": args.variant} if args.variant else {}),
                      **({"plan_objective": args.plan_objective} if args.plan_objective else {}),
                      **({"gen_verify_variant": args.verify_variant} if args.verify_variant else {}),
                      **({"prefill_stall_ms": args.prefill_stall_ms} if args.prefill_stall_ms else {}),
                      **({"speculative_tokens": args.speculative_tokens} if args.speculative_tokens is not None else {}))
        writer = Engine(base)
        writer.create_collection("squad")
        writer.ingest("squad", [Document(p["id"], p["text"], f"squad/{p['id']}", {"title": p["title"]})
                                for p in paragraphs])
        writer.warmup(generation=True)
        print(f"plan: {writer.execution_plan.describe()}", flush=True)
        rates = writer.execution_plan.rates or {}
        systems = {"ours": base, "one-at-a-time": base.replace(max_concurrent_generations=1),
                   "no-drafts": base.replace(speculative_tokens=0)}
        systems.update({name: base.replace(gen_verify_variant=name.split("=", 1)[1])
                        for name in args.systems if name.startswith("verify=")})
        systems["spinning"] = base.replace(stop_spinning=False)
        systems["fixed-drafts"] = base.replace(adaptive_drafts=False)
        systems["throughput"] = base.replace(plan_objective="throughput")
        systems.update({name: base.replace(prefill_stall_ms=float(name.split("=", 1)[1]))
                        for name in args.systems if name.startswith("stall=")})
        systems = {k: v for k, v in systems.items() if k in args.systems}
        single = single_stream_prefill(writer, questions[0], questions[1])
        log_jsonl("serve_answers", {"system": "in-process", "regime": "rag", **single})
        peers = single_stream_peers(writer, questions[len(questions) // 2:], args) if args.peers else {}
        rounds: dict[tuple, list[dict]] = {}
        for round_ in range(args.rounds):  # systems take turns, so a slow minute hits each alike
            for regime in args.regimes:
                for name, cfg in systems.items():
                    same = all(getattr(cfg, k) == getattr(base, k) for k in GENERATOR_SETTINGS)
                    engine = Engine(cfg, embedder=writer.embedder, generator=writer.generator if same else None)
                    srv, port = create_server(cfg, "127.0.0.1:0", engine=engine)
                    try:
                        drive(port, questions, 1, min(10.0, args.seconds), regime,  # warm-up, not reported
                              in_process=args.in_process_clients)
                        for c in args.concurrency:
                            before, t0 = engine.generation_usage(), time.perf_counter()
                            r = drive(port, questions, c, args.seconds, regime, in_process=args.in_process_clients)
                            r.update(loop_usage(before, engine.generation_usage(), time.perf_counter() - t0))
                            r["clients"] = "in-process" if args.in_process_clients else "own process"
                            rounds.setdefault((regime, name, c), []).append(r)
                            log_jsonl("serve_answers", {"system": name, "regime": regime, "concurrency": c,
                                                        "round": round_, **r})
                    finally:
                        srv.stop(0)
        writer.close()
    # one figure per (regime, system, c): each number's median over the rounds
    summary = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
               for key, rs in rounds.items()}
    if args.rounds > 1:
        print(f"\nmedians of {args.rounds} rounds, the systems taking turns")
    for (regime, name, c), rs in rounds.items():
        if (errors := [e for r in rs for e in r["errors"]]):
            print(f"{regime} c={c} {name}: {len(errors)} failed answers: {sorted(set(errors))}")
    print("\nregime  c   system          answers/s  gen tok/s  prompt tok/s  TTFT p50/p95 s   ITL p50/p99 ms  "
          "TPOT p50/p99 ms  cached")
    for (regime, name, c), r in summary.items():
        print(f"{regime:7s} {c:<3d} {name:15s} {r['answers_per_s']:9.3f} {r['gen_tok_per_s']:10.1f} "
              f"{r['prompt_tok_per_s']:13.1f}  {r['ttft_p50_s']:6.2f}/{r['ttft_p95_s']:6.2f}  "
              f"{r['itl_p50_ms']:7.1f}/{r['itl_p99_ms']:7.1f}  {r['tpot_p50_ms']:7.1f}/{r['tpot_p99_ms']:7.1f}  "
              f"{r['cached_tokens']:.0f}/{r['prompt_tokens']:.0f}")
    for regime in args.regimes:
        for c in args.concurrency:
            ours, base_r = summary.get((regime, "ours", c)), summary.get((regime, "one-at-a-time", c))
            one = summary.get((regime, "ours", min(args.concurrency)))
            if ours is None or one is None:
                continue
            vs = f"x{ours['gen_tok_per_s'] / base_r['gen_tok_per_s']:.2f}" if base_r else "(not run)"
            for other in [n for n in args.systems
                          if n in ("no-drafts", "spinning", "fixed-drafts") or n.startswith("verify=")]:
                if (nd := summary.get((regime, other, c))):
                    vs += (f", ours/{other} x{ours['gen_tok_per_s'] / nd['gen_tok_per_s']:.2f} "
                           f"(answers/s x{ours['answers_per_s'] / nd['answers_per_s']:.2f})")
            print(f"{regime} c={c}: gen tok/s ours/one-at-a-time {vs}, "
                  f"ours c={c}/c={min(args.concurrency)} x{ours['gen_tok_per_s'] / one['gen_tok_per_s']:.2f}, "
                  f"ITL p99 c={c}/c={min(args.concurrency)} x{ours['itl_p99_ms'] / one['itl_p99_ms']:.2f} "
                  f"(TPOT p99 x{ours['tpot_p99_ms'] / one['tpot_p99_ms']:.2f}), "
                  f"served prompt tok/s / in-process prefill x{ours['prompt_tok_per_s'] / single['prefill_tok_per_s']:.2f}"
                  f" (x{ours['prompt_tok_per_s'] / single['prefill_best_tok_per_s']:.2f} its best of three)")
            if c > min(args.concurrency):
                print(ceiling(regime, c, min(args.concurrency), ours, one, single, rates))
            for other in [n for n in args.systems if n.startswith("stall=") or n == "throughput"]:  # own ratios
                mine, mine_one = summary.get((regime, other, c)), summary.get((regime, other, min(args.concurrency)))
                if mine and mine_one:
                    print(f"{regime} c={c} {other}: gen tok/s c={c}/c={min(args.concurrency)} "
                          f"x{mine['gen_tok_per_s'] / mine_one['gen_tok_per_s']:.2f}, ITL p99 "
                          f"x{mine['itl_p99_ms'] / mine_one['itl_p99_ms']:.2f}, served prompt tok/s / in-process "
                          f"prefill x{mine['prompt_tok_per_s'] / single['prefill_tok_per_s']:.2f} (best of three "
                          f"x{mine['prompt_tok_per_s'] / single['prefill_best_tok_per_s']:.2f}), TTFT p50 "
                          f"{mine['ttft_p50_s']:.2f} s against ours' {ours['ttft_p50_s']:.2f}")
    print_loop_usage(summary)
    if peers:
        print_peers(peers)
    print(f"repeated question TTFT: cold {single['cold_ttft_s']:.2f}s, warm {single['warm_ttft_s']:.2f}s "
          f"(x{single['repeat_speedup']:.1f}; {single['warm_cached_tokens']} of {single['prompt_tokens']} prompt tokens "
          f"from the prefix cache, cold {single['cold_cached_tokens']}: the prompts' common head)")


def main() -> None:
    if sys.argv[1:] == ["--drive-clients"]:  # the client process of drive()
        job = json.loads(sys.stdin.read())
        print(json.dumps(client_threads(job["port"], job["questions"], job["c"], job["seconds"], job["regime"])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--squad", type=Path, default=SQUAD)
    ap.add_argument("--docs", type=int, default=300, help="SQuAD paragraphs ingested")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    ap.add_argument("--seconds", type=float, default=40.0, help="per (regime, system, concurrency)")
    ap.add_argument("--regimes", type=lambda s: [x for x in s.split(",") if x], default=list(REGIMES),
                    help="comma-separated (\"\" with --peers: the single-stream section only)")
    ap.add_argument("--variant", choices=("fp32", "int8", "int4", "w8a8"), default=None,
                    help="generator weights that decode (default: the machine's plan)")
    ap.add_argument("--verify-variant", choices=("fp32", "int8", "int4", "w8a8"), default=None,
                    help="generator weights of speculative decoding's verify runs (default: the machine's plan)")
    ap.add_argument("--plan-objective", choices=PLAN_OBJECTIVES, default=None,
                    help="which of the plan's decode variants serves (default: the engine's, latency)")
    ap.add_argument("--prefill-stall-ms", type=float, default=None,
                    help="the scheduler's prefill stall target (default: the engine's)")
    ap.add_argument("--speculative-tokens", type=int, default=None,
                    help="drafts a greedy stream checks per run (default: the engine's; 0 = off)")
    ap.add_argument("--systems", type=lambda s: [x for x in s.split(",") if x], default=["ours", "one-at-a-time"],
                    help="which of ours,one-at-a-time,no-drafts,spinning,fixed-drafts,throughput (plan_objective "
                         "throughput),verify=VARIANT (drafts verified on VARIANT's weights),stall=MS "
                         "(prefill_stall_ms MS) to run (the ratios need ours)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every (regime, system, c) this many times, the systems taking turns; "
                         "tables and ratios take each number's median")
    ap.add_argument("--in-process-clients", action="store_true",
                    help="run the client threads in the server's process (default: a process of their own)")
    ap.add_argument("--peers", action="store_true",
                    help="also the single-stream section against llama.cpp and onnxruntime-genai (make peers)")
    ap.add_argument("--peer-prompts", type=int, default=8, help="prompts in the single-stream section")
    ap.add_argument("--peer-new-tokens", type=int, default=32)
    ap.add_argument("--peer-k", type=int, default=None,
                    help="chunks retrieved for the single-stream prompts (default: the engine's answer_k)")
    ap.add_argument("--peer-whole-chunks", action="store_true",
                    help="single-stream prompts of whole chunks, no context packing (with --peer-k 5: the "
                         "~850-token RAG prompts the serving issue's single-stream targets name)")
    ap.add_argument("--peer-lookup", type=int, default=3,
                    help="llama.cpp's prompt lookup drafts per step in its second run (0: no second run)")
    args = ap.parse_args()
    if not args.squad.exists():
        raise SystemExit(f"{args.squad} not found; pass --squad PATH to SQuAD v1.1 dev JSON")
    run(args)


if __name__ == "__main__":
    main()
