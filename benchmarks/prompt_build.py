"""What does a RAG request cost outside the decoder? Search, building the prompt, and the
answer's per-sentence support, per question, ours against two baselines, each how the answer
path worked before one change (in this process, on the same questions):

- "compiled each prompt": the chat template compiled at every prompt (render_chat before it
  was compiled once per generator);
- "question embedded again": context packing embedding the question a second time (before
  it reused the search's embedding, SearchResult.vectors).

    .venv/bin/python benchmarks/prompt_build.py [--docs 300] [--questions 60] [--rounds 3]

This work runs in the server's RPC threads beside the generation loop, on the same cores,
and a lone stream's first token waits for it. Ingests `--docs` SQuAD paragraphs, warms the
support cache on 100 other questions (a server's steady state: most retrieved chunks' sentences
are embedded already), then per round times each system over the same `--questions`
questions (the order of the systems rotating): median ms per question for search,
build_prompt and support, and the ratio of each baseline's total to ours. One JSON line to
bench-results/prompt_build.jsonl, with the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SQUAD, cpu_name, log_jsonl, shuffled_questions, squad_paragraphs  # noqa: E402

from engine.config import Config  # noqa: E402
from engine.documents import Document  # noqa: E402
from engine.pipeline import Engine  # noqa: E402
from engine.rag import Source  # noqa: E402

ANSWER = "The answer is in the first source. It was built in 1901 by the city."


def compiled_each_time(gen, messages: list[dict]) -> str:
    """The baseline: the chat template compiled at every call (render_chat before): the
    generator's compiled template dropped before each render."""
    gen.__dict__.pop("_chat_template", None)
    return type(gen).render_chat(gen, messages)


def one_round(engine: Engine, questions: list[str], reuse_vector: bool) -> dict[str, float]:
    """Median ms per question of each stage, as the answer path does them (engine/rag.py)."""
    k = engine.config.answer_k
    stages: dict[str, list[float]] = {"search": [], "build_prompt": [], "support": []}
    for q in questions:
        t0 = time.perf_counter()
        found = engine.searcher.search("squad", [q], k)
        t1 = time.perf_counter()
        engine.build_prompt(q, found.hits[0], 32, vector=found.vectors[0] if reuse_vector else None)
        t2 = time.perf_counter()
        engine.answerer.supporter.support(ANSWER, [Source(i + 1, h) for i, h in enumerate(found.hits[0])])
        t3 = time.perf_counter()
        for name, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
            stages[name].append(dt * 1e3)
    return {name: statistics.median(v) for name, v in stages.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--squad", type=Path, default=SQUAD)
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--questions", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    paragraphs = squad_paragraphs(args.squad, limit=args.docs)
    questions = shuffled_questions(paragraphs)
    warm, timed = questions[:100], questions[100:100 + args.questions]
    print(f"CPU: {cpu_name()}; {len(paragraphs)} SQuAD paragraphs, {len(timed)} questions, {args.rounds} rounds",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="rag-prompt-build-") as tmp:
        engine = Engine(Config(data_dir=Path(tmp), wal_fsync="off"))
        engine.create_collection("squad")
        engine.ingest("squad", [Document(p["id"], p["text"], f"squad/{p['id']}", {"title": p["title"]})
                                for p in paragraphs])
        gen = engine.generator
        for q in warm:
            engine.build_prompt(q, engine.search("squad", q, engine.config.answer_k), 32)
        ours = type(gen).render_chat
        compiled_once = lambda: setattr(gen, "render_chat", ours.__get__(gen))  # noqa: E731
        each_prompt = lambda: setattr(gen, "render_chat", lambda m: compiled_each_time(gen, m))  # noqa: E731
        # name: (set the template's rendering, reuse the search's question vector)
        systems = {"ours": (compiled_once, True), "compiled each prompt": (each_prompt, True),
                   "question embedded again": (compiled_once, False)}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
        names = list(systems)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                render, reuse = systems[name]
                render()
                results[name].append(one_round(engine, timed, reuse))
        engine.close()
    totals = {}
    for name, rounds in results.items():
        med = {stage: statistics.median(x[stage] for x in rounds) for stage in rounds[0]}
        totals[name] = sum(med.values())
        print(f"{name:24s} " + "  ".join(f"{stage} {v:5.1f} ms" for stage, v in med.items())
              + f"  total {totals[name]:5.1f} ms a question")
    rec = {"questions": len(timed), "rounds": args.rounds, "ours_ms": totals["ours"]}
    for name in names[1:]:
        ratio = totals[name] / totals["ours"]
        print(f"{name} / ours: x{ratio:.2f} ({totals[name] - totals['ours']:+.1f} ms a question outside the decoder)")
        rec[name.replace(" ", "_") + "_ms"], rec[name.replace(" ", "_") + "_ratio"] = totals[name], ratio
    log_jsonl("prompt_build", rec)


if __name__ == "__main__":
    main()
