"""How many drafts should a speculating answer offer a run? Ours against fixed counts and
against the rules it replaced, per prompt (or per group of rows sharing runs), in one
process.

    .venv/bin/python benchmarks/draft_count.py                         # 24 RAG prompts (~400 tokens)
    .venv/bin/python benchmarks/draft_count.py --k 5 --whole-chunks    # the serving issue's ~800
    .venv/bin/python benchmarks/draft_count.py --rows 8 --k 1 --new-tokens 128 --ignore-eos  # shared runs

Ingests `--docs` SQuAD v1.1 dev paragraphs, builds `--prompts` RAG prompts the engine's way
(k and packing as configured, or `--k 5 --whole-chunks`), and answers each greedily
(`--new-tokens`, as `serve_answers.py`'s single stream) through one scheduler per system,
one row at a time (`--rows`: more), drafts from the prompt verified on the machine's plan's
weights:
  ours       the engine's rule (Ticket.drafts_for_speed): the count that keeps most tokens a
             second, from the plan's run times and the row's two agreement rates (a run's
             first draft; a draft after a kept one), a pair for drafts copied after a match
             of two tokens or more and one for drafts after a one-token match
             (WEAK_DRAFT_PRIOR); in shared runs one rate (drafts_worth);
  unsplit    the same with one pair of rates whatever the match (the rule before);
  one-rate   one agreement rate for every draft alone too (kept drafts against runs
             stopped, p^j for the j-th: the rule before that);
  fixed      always the configured count (Config.speculative_tokens; adaptive_drafts off).
Every prompt runs through the four back to back, the first rotating, so a slow minute of a
shared machine hits each alike; decode tok/s per answer (tokens after the first / the time
from the first streamed delta to the last) and the median of the per-prompt ratios ours /
other are printed. `--rows N`: groups of N prompts submitted at once instead (shared verify
runs, where drafts follow Plan.draft_worth's "shared" worth), each group through the four
in turn, generated tokens / the group's wall time (its prefill included, the same work in
all four) and the median per-group ratio. The tokens are the same in all four (checked).
One JSON line per system to bench-results/draft_count.jsonl, with the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (SQUAD, cpu_name, log_jsonl, rag_prompts, rotated, shuffled_questions,  # noqa: E402
                     squad_paragraphs)

from engine.config import Config  # noqa: E402
from engine.documents import Document  # noqa: E402
from engine.generate import Completion, SamplingParams  # noqa: E402
from engine.pipeline import Engine  # noqa: E402
from engine.scheduler import Scheduler, Ticket  # noqa: E402


class UnsplitTicket(Ticket):
    """The rule before: a lone row's two rates (p1, p) counted and used for every draft,
    whether it was copied after a one-token match or a longer one."""

    def agreement(self, weak: bool = False) -> tuple[float, float]:
        return super().agreement(False)

    def drafts_checked(self, offered: int, kept: int, weak: bool = False) -> None:
        super().drafts_checked(offered, kept, False)


class UnsplitScheduler(Scheduler):
    ticket_class = UnsplitTicket


class OneRateTicket(Ticket):
    """The rule before that: one agreement rate p = kept drafts / (kept drafts + runs
    stopped) for a lone row's runs too (shared runs use it in both), so the j-th draft is
    kept with p^j."""

    def agreement(self, weak: bool = False) -> tuple[float, float]:
        p = self.agreed / (self.agreed + self.stopped)
        return p, p


class OneRateScheduler(Scheduler):
    ticket_class = OneRateTicket


def answer(scheduler: Scheduler, ids: list[int], params: SamplingParams) -> tuple[float, list[int]]:
    stamps, done = [], None
    for ev in scheduler.submit(ids, params):
        if isinstance(ev, Completion):
            done = ev
        else:
            stamps.append(time.perf_counter())
    rate = (done.completion_tokens - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return rate, done.token_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--squad", type=Path, default=SQUAD)
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=None, help="passages a prompt (default: the engine's)")
    ap.add_argument("--whole-chunks", action="store_true", help="whole chunks, no packing (the ~800-token prompts)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1, help="prompts submitted at once (shared verify runs)")
    ap.add_argument("--ignore-eos", action="store_true", help="run every answer to --new-tokens")
    args = ap.parse_args()
    paragraphs = squad_paragraphs(args.squad, limit=args.docs)
    questions = shuffled_questions(paragraphs)
    questions = questions[len(questions) // 2:][:args.prompts]  # serve_answers.py's single-stream ones
    with tempfile.TemporaryDirectory(prefix="rag-draft-bench-") as tmp:
        config = Config(data_dir=Path(tmp), wal_fsync="off")
        engine = Engine(config)
        engine.create_collection("squad")
        engine.ingest("squad", [Document(p["id"], p["text"], f"squad/{p['id']}", {"title": p["title"]})
                                for p in paragraphs])
        engine.warmup(generation=True)
        prompts = rag_prompts(engine, "squad", questions, args.k, args.whole_chunks, args.new_tokens)
        gen, plan = engine.generator, engine.execution_plan
        drafts = config.draft_tokens
        print(f"CPU: {cpu_name()}; plan: {plan.describe()}; {len(prompts)} prompts of "
              f"{statistics.mean(map(len, prompts)):.0f} tokens on average, {args.new_tokens} new, "
              f"up to {drafts} drafts a run, {args.rows} at once", flush=True)
        kw = dict(max_rows=args.rows, prefix_cache_mb=0, draft_tokens=drafts, draft_worth=plan.draft_worth())
        systems = {"ours": Scheduler(gen, **kw), "unsplit": UnsplitScheduler(gen, **kw),
                   "one-rate": OneRateScheduler(gen, **kw),
                   "fixed": Scheduler(gen, adaptive_drafts=False, **kw)}
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=args.ignore_eos)
        groups = [prompts[g:g + args.rows] for g in range(0, len(prompts), args.rows)]
        try:
            for s in systems.values():
                if args.rows > 1:
                    s.wait_started()  # the calibration two answers at once would run
                s.submit(gen.encode("Hello"), params).result()  # warm-up
            rates = {n: [] for n in systems}
            names = list(systems)
            for _ in range(args.rounds):
                for i, group in enumerate(groups):
                    tokens = {}
                    for name in rotated(names, i):
                        if args.rows == 1:
                            rate, got = answer(systems[name], group[0], params)
                            tokens[name] = [got]
                        else:
                            t0 = time.perf_counter()
                            tickets = [systems[name].submit(ids, params) for ids in group]
                            done = [t.result() for t in tickets]
                            rate = sum(d.completion_tokens for d in done) / (time.perf_counter() - t0)
                            tokens[name] = [d.token_ids for d in done]
                        rates[name].append(rate)
                    if len({repr(t) for t in tokens.values()}) != 1:
                        raise SystemExit(f"group {i}: the systems' tokens differ: {tokens}")
        finally:
            for s in systems.values():
                s.close()
    ok = [j for j in range(len(rates["ours"])) if all(rates[n][j] == rates[n][j] for n in names)]
    for name, s in systems.items():
        ratio = statistics.median(rates["ours"][j] / rates[name][j] for j in ok)
        med = statistics.median(rates[name][j] for j in ok)
        unit = ("decode tok/s (median per answer)" if args.rows == 1
                else f"gen tok/s (median per group of {args.rows}, prefill included)")
        print(f"{name:9s} {med:6.1f} {unit}, verify runs {s.verify_runs}, "
              f"rows verified {s.rows_verified}, drafted {s.drafted}, kept {s.accepted}"
              + (f"; ours / {name} x{ratio:.3f} (median per {'prompt' if args.rows == 1 else 'group'})"
                 if name != "ours" else ""))
        log_jsonl("draft_count", {"system": name, "prompts": len(prompts), "rounds": args.rounds, "rows": args.rows,
                                  "prompt_tokens": statistics.mean(map(len, prompts)), "new_tokens": args.new_tokens,
                                  "gen_tok_per_s_median": med, "ours_over_this": ratio,
                                  "verify_runs": s.verify_runs, "drafted": s.drafted, "kept": s.accepted})


if __name__ == "__main__":
    main()
