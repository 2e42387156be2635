"""How good are our RAG answers on SQuAD v1.1 dev, and is a miss retrieval's fault or the model's?

    .venv/bin/python benchmarks/answer_quality.py [--n 100] [--seed 0] [--squad PATH]

Ingests all 2,067 dev paragraphs (one JSONL record each) with `rag ingest`, answers a fixed
random sample of questions with `rag ask --batch` (batched embedding + batched generation,
the default int8 generator, greedy), and scores exact match and token F1 against the gold
answers with the official SQuAD normalisation (citation markers like [1] removed first).
Then the same questions are answered with only the gold paragraph as passage [1], through
the same prompt template, which separates retrieval misses from generation misses. One JSON
line per mode goes to bench-results/answer_quality.jsonl.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.config import DEFAULT_PROMPT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, NO_ANSWER, Config  # noqa: E402
from engine.generate import SamplingParams  # noqa: E402
from engine.pipeline import Engine, Hit  # noqa: E402

DEFAULT_SQUAD = REPO.parent / "shared" / "data" / "squad-dev-v1.1.json"


def normalize(s: str) -> str:
    s = re.sub(r"\[\d+\]", " ", s).lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def score(preds: list[str], golds: list[list[str]]) -> tuple[float, float]:
    em = sum(max(normalize(p) == normalize(g) for g in gs) for p, gs in zip(preds, golds)) / len(preds)
    f = sum(max(f1(p, g) for g in gs) for p, gs in zip(preds, golds)) / len(preds)
    return 100 * em, 100 * f


def log(rec: dict) -> None:
    out = REPO / "bench-results"
    out.mkdir(exist_ok=True)
    with open(out / "answer_quality.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), **rec}) + "\n")


def contains(pred: str, golds: list[str]) -> bool:
    p = f" {normalize(pred)} "
    return any(f" {normalize(g)} " in p for g in golds if normalize(g))


def rag_pass(args, rag: list[str], tmp: Path, mode: str, paragraphs: list[dict], sample: list[dict],
             qfile: Path) -> list[str]:
    """Ingest `paragraphs`, answer `sample` with `rag ask --batch`, print and log the scores."""
    corpus = tmp / f"{mode}.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in paragraphs))
    data_dir = ["--data-dir", str(tmp / mode), *args.rag_global]
    t0 = time.perf_counter()
    subprocess.run([*rag, *data_dir, "ingest", str(corpus), "-c", "squad", "-q"], check=True)
    t1 = time.perf_counter()
    afile = tmp / f"{mode}-answers.jsonl"
    subprocess.run([*rag, *data_dir, "ask", "--batch", str(qfile), "--out", str(afile), "-c", "squad",
                    "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
                    *args.ask_args], check=True)
    t2 = time.perf_counter()
    answers = {json.loads(line)["id"]: json.loads(line) for line in afile.read_text().splitlines()}
    got = [answers[q["id"]] for q in sample]
    corpus_name = f"{corpus.resolve()}#"
    rec = {"mode": mode, "seed": args.seed, "rag_args": args.rag_global + args.ask_args,
           **answer_scores(sample, got, lambda pid: corpus_name + pid), "s_per_question": (t2 - t1) / len(sample),
           "ingest_s": t1 - t0}
    preds = [a["answer"] for a in got]
    if rec["rag_args"]:
        print(f"{mode} with {' '.join(rec['rag_args'])}:")
    print_scores(mode, rec)
    print(f"{'':17s} {rec['s_per_question']:.2f} s/question (ingest {t1 - t0:.0f} s)", flush=True)
    log(rec)
    return preds


def answer_scores(sample: list[dict], got: list[dict], doc_id) -> dict:
    """The table's columns for answers `got` (Answer.to_json() dicts) to `sample`; doc_id(pid)
    is the collection's id of a SQuAD paragraph."""
    from engine.support import degenerate as is_degenerate

    preds = [a["answer"] for a in got]
    golds = [q["answers"] for q in sample]
    n = len(sample)
    em, f = score(preds, golds)
    retrieved = sum(any(s["doc_id"] == doc_id(q["pid"]) for s in a["sources"]) for q, a in zip(sample, got))
    declined = sum(p.startswith("The context does not contain") for p in preds)
    answered = [a for a in got if not a["answer"].startswith("The context does not contain")]
    returned_degenerate = sum(is_degenerate(a["answer"], [s["label"] for s in a["sources"]]) is not None
                              for a in answered)
    gold_sentences = [x for q, a in zip(sample, got) for x in a["support"]
                      if contains(a["answer"][slice(*x["answer_span"])], q["answers"])]
    sentences = [x for a in answered for x in a["support"]]
    prompt_tokens = sorted(a["usage"]["prompt_tokens"] // (1 + a["retries"]) for a in got)
    prefill = sorted(a["timings_ns"]["prefill"] / 1e9 / (1 + a["retries"]) for a in got)
    return {"n": n, "em": em, "f1": f, "contains_gold": sum(contains(p, g) for p, g in zip(preds, golds)) / n,
            "gold_in_prompt": retrieved / n, "declined": declined / n, "degenerate_returned": returned_degenerate / n,
            "degenerate_first": sum(bool(a["degenerate"]) for a in got) / n,
            "extracted": sum(a["extracted"] for a in got) / n,
            "citation_rate": sum(any(s["cited"] for s in a["sources"]) for a in answered) / max(len(answered), 1),
            "gold_sentences_supported": sum(x["supported"] for x in gold_sentences) / max(len(gold_sentences), 1),
            "gold_sentences": len(gold_sentences),
            "sentences_supported": sum(x["supported"] for x in sentences) / max(len(sentences), 1),
            "answers_flagged": sum(any(not x["supported"] for x in a["support"]) for a in answered)
            / max(len(answered), 1),
            "prompt_tokens_p50": prompt_tokens[n // 2], "prefill_s_p50": prefill[n // 2]}


def print_scores(mode: str, rec: dict) -> None:
    print(f"{mode:17s} EM {rec['em']:5.1f}  F1 {rec['f1']:5.1f}  contains-gold {rec['contains_gold']:.2f}  gold paragraph in prompt "
          f"{rec['gold_in_prompt']:.2f}  declined {rec['declined']:.2f}  degenerate {rec['degenerate_returned']:.2f} "
          f"(first try {rec['degenerate_first']:.2f}, extracted {rec['extracted']:.2f})  cited "
          f"{rec['citation_rate']:.2f}\n{'':17s} gold-span sentences supported {rec['gold_sentences_supported']:.2f} "
          f"(of {rec['gold_sentences']}), answers with an unsupported sentence {rec['answers_flagged']:.2f}, "
          f"median prompt {rec['prompt_tokens_p50']} tokens, prefill {rec['prefill_s_p50']:.2f} s", flush=True)


CITE = "cite the passage numbers like [1]"
# Prompt variants for --prompts: (system prompt, user template). "one-sentence" is Config's
# default, chosen by this table (README "Checked answers"); "brief" was the default before.
PROMPTS = {
    "brief": (DEFAULT_SYSTEM_PROMPT, f"{{context}}\nQuestion: {{question}}\nAnswer briefly and {CITE}."),
    "one-sentence": (DEFAULT_SYSTEM_PROMPT, DEFAULT_PROMPT_TEMPLATE),
    "question-first": (DEFAULT_SYSTEM_PROMPT, "Question: {question}\n\n{context}\nAnswer the question briefly and "
                       f"{CITE}."),
    "short-phrase": (DEFAULT_SYSTEM_PROMPT, "{context}\nQuestion: {question}\nReply with the shortest phrase from the "
                     "passages that answers the question, then the passage number, like: in 1912 [2]"),
    "terse-system": ("Answer from the numbered passages only and cite them like [1]. If they do not contain the "
                     f"answer, reply: {NO_ANSWER}", DEFAULT_PROMPT_TEMPLATE),
}


def squad_engine(config: Config, paragraphs: list[dict]) -> Engine:
    """An in-process engine with every paragraph ingested into collection "squad" (doc id = pid)."""
    from engine.documents import Document

    engine = Engine(config)
    engine.create_collection("squad")
    engine.ingest("squad", [Document(p["id"], p["text"], p["id"], {"title": p["title"]}) for p in paragraphs])
    return engine


def prompt_sweep(args, paragraphs: list[dict], sample: list[dict], tmp: Path) -> None:
    """The same questions through the real answer path (Answerer.batch: retrieval, packing,
    the retry of degenerate answers, support) with each prompt in --prompts, in one process
    over one ingest: the table README "Checked answers" keeps."""
    from engine.rag import Answerer

    # no prefix cache: a later prompt would reuse the passages an earlier one prefilled
    engine = squad_engine(Config(data_dir=tmp / "prompts", gen_prefill_variant=args.prefill_variant,
                                 prefix_cache_mb=0), paragraphs)
    questions = [q["question"] for q in sample]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    budget = args.budget or None
    for model in (args.gen_models.split(",") if args.gen_models else [engine.config.gen_model]):
        # another generator over the same ingest (a reader of the collection)
        eng = engine if model == engine.config.gen_model else Engine(engine.config.replace(gen_model=model))
        print(f"{model}: k {args.k}, context budget {budget or 'off (whole chunks)'}, neighbours {args.neighbours}; "
              f"plan {eng.generator.prefill_variant} > {eng.generator.variant}", flush=True)
        for name in args.prompts.split(","):
            system, template = PROMPTS[name]
            cfg = eng.config.replace(system_prompt=system, prompt_template=template, context_budget_tokens=budget,
                                     context_neighbours=args.neighbours)
            ans = Answerer(cfg, eng.searcher, lambda: eng.generator, lambda: eng.scheduler, lambda: eng.embedder)
            t0 = time.perf_counter()
            got = [a.to_json() for a in ans.batch("squad", questions, k=args.k, params=params)]
            rec = {"mode": "prompt", "gen_model": model, "plan": f"{eng.generator.prefill_variant}>{eng.generator.variant}",
                   "prompt": name, "k": args.k, "budget": budget, "neighbours": args.neighbours, "seed": args.seed,
                   **answer_scores(sample, got, lambda pid: pid), "s_per_question": (time.perf_counter() - t0) / len(sample)}
            print_scores(f"prompt {name}", rec)
            print(f"{'':17s} {rec['s_per_question']:.2f} s/question", flush=True)
            log(rec)
        if eng is not engine:
            eng.close()
    engine.close()


def packing_sweep(args, paragraphs: list[dict], sample: list[dict], tmp: Path) -> None:
    """Context packing (Config.context_budget_tokens), retrieval only: for k x budget x
    neighbours, how often a gold answer is inside the prompt's passages, and the median
    prompt size. No generation, so the whole sweep takes minutes."""
    from engine.rag import Answerer

    engine = squad_engine(Config(data_dir=tmp / "packing"), paragraphs)
    questions = [q["question"] for q in sample]
    hits = engine.search_batch("squad", questions, 5)
    supporter = engine.answerer.supporter
    print(f"{'k':>2} {'budget':>6} {'nb':>2}  gold in prompt  median prompt tokens  p90", flush=True)
    for k in args.ks:
        for budget in args.budgets:
            for nb in ((1,) if budget is None else args.nbs):
                cfg = engine.config.replace(context_budget_tokens=budget, context_neighbours=nb)
                ans = Answerer(cfg, engine.searcher, lambda: engine.generator, lambda: engine.scheduler,
                               lambda: engine.embedder)
                ans._supporter = supporter  # one sentence cache for the whole sweep
                found, sizes = 0, []
                for q, h in zip(sample, hits):
                    ids, sources = ans.build_prompt(q["question"], h[:k], args.max_new_tokens)
                    found += any(contains(s.hit.text, q["answers"]) for s in sources)
                    sizes.append(len(ids))
                sizes.sort()
                rec = {"mode": "packing", "n": len(sample), "seed": args.seed, "k": k, "budget": budget,
                       "neighbours": nb, "gold_in_prompt": found / len(sample),
                       "prompt_tokens_p50": sizes[len(sizes) // 2], "prompt_tokens_p90": sizes[9 * len(sizes) // 10]}
                print(f"{k:>2} {str(budget):>6} {nb:>2}  {rec['gold_in_prompt']:14.3f}  {rec['prompt_tokens_p50']:20d}  "
                      f"{rec['prompt_tokens_p90']}", flush=True)
                log(rec)
    engine.close()


def run(args) -> None:
    data = json.loads(Path(args.squad).read_text())["data"]
    paragraphs, questions = [], []
    for art in data:
        for i, para in enumerate(art["paragraphs"]):
            pid = f"{art['title']}-{i}"
            paragraphs.append({"id": pid, "text": para["context"], "title": art["title"]})
            for qa in para["qas"]:
                questions.append({"id": qa["id"], "question": qa["question"], "pid": pid,
                                  "answers": [a["text"] for a in qa["answers"]], "context": para["context"]})
    sample = random.Random(args.seed).sample(questions, args.n)
    print(f"{len(paragraphs)} paragraphs, {len(questions)} questions; sample of {len(sample)} (seed {args.seed})")
    rag = [str(Path(sys.executable).parent / "rag")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "squad.jsonl"
        corpus.write_text("".join(json.dumps(p) + "\n" for p in paragraphs))
        qfile = tmp / "q.jsonl"
        qfile.write_text("".join(json.dumps({"id": q["id"], "question": q["question"]}) + "\n" for q in sample))
        preds = [""] * len(sample)
        golds = [q["answers"] for q in sample]
        if args.packing:
            packing_sweep(args, paragraphs, sample, tmp)
            return
        if args.prompts:
            prompt_sweep(args, paragraphs, sample, tmp)
            return
        if not args.skip_rag:
            preds = rag_pass(args, rag, tmp, "rag", paragraphs, sample, qfile)
        if args.gold_removed and not args.skip_rag:
            # the same questions over a collection without their gold paragraphs: answers should
            # decline, or have their sentences flagged as unsupported
            gone = {q["pid"] for q in sample}
            rag_pass(args, rag, tmp, "rag-gold-removed", [p for p in paragraphs if p["id"] not in gone], sample, qfile)

        if args.skip_gold:
            return
        # Gold paragraph as the only passage, same template and generator.
        engine = Engine(Config(data_dir=tmp / "data", gen_prefill_variant=args.prefill_variant))
        gen = engine.generator
        params = SamplingParams(max_new_tokens=args.max_new_tokens)
        t3 = time.perf_counter()
        prompts = []
        for q in sample:
            hit = Hit(rank=1, score=1.0, cosine=1.0, key=-1, doc_id=q["pid"], source=q["pid"], ordinal=0, start=0,
                      end=len(q["context"]), text=q["context"], metadata={"title": q["pid"].rsplit("-", 1)[0]})
            ids, _ = engine.build_prompt(q["question"], [hit], params.max_new_tokens)
            prompts.append(ids)
        if args.plans:  # the engine's own plan is one of them
            compare_plans(engine, prompts, golds, params, args)
            engine.close()
            return
        gold_preds = []
        for i in range(0, len(prompts), args.batch_size):
            gold_preds += [c.text for c in gen.generate_ids(prompts[i:i + args.batch_size], params)]
        t4 = time.perf_counter()
        em_g, f_g = score(gold_preds, golds)
        print(f"gold paragraph given      EM {em_g:5.1f}  F1 {f_g:5.1f}  ({(t4 - t3) / len(sample):.2f} s/question)")
        log({"mode": "gold", "n": len(sample), "seed": args.seed, "em": em_g, "f1": f_g})
        for q, p, g in list(zip(sample, preds, gold_preds))[:args.show]:
            print(f"  Q: {q['question']}\n     gold: {q['answers'][0]!r}\n     rag:  {p[:120]!r}\n     gold-ctx: {g[:120]!r}")
        engine.close()


def compare_plans(engine, prompts, golds, params, args) -> None:
    """Gold-paragraph answers from each execution plan (prefill weights > decode weights,
    engine/plan.py; a "+spec" suffix: through the scheduler one at a time as a stream, with
    speculative decoding from the prompt, 3 drafts a run, verified on the decode's weights,
    "+spec=w8a8" on w8a8's): F1/EM, and greedy agreement with fp32 (same answer; shared token
    prefix) and, for a +spec plan, with the same plan without."""
    from engine.generate import Generator
    from engine.scheduler import Scheduler

    outs = {}
    for plan in args.plans.split(","):
        base, spec, verify = plan.partition("+spec")
        prefill, _, decode = base.partition(">")
        gen = Generator(engine.config.gen_model_dir, variant=decode or prefill, prefill_variant=prefill,
                        verify_variant=verify.removeprefix("=") or None, threads=2)
        t0 = time.perf_counter()
        comps = []
        if spec:
            scheduler = Scheduler(gen, max_rows=1, prefix_cache_mb=0, draft_tokens=3)
            comps = [scheduler.submit(p, params).result() for p in prompts]
            scheduler.close()
        else:
            for i in range(0, len(prompts), args.batch_size):
                comps += gen.generate_ids(prompts[i:i + args.batch_size], params)
        outs[plan] = (comps, (time.perf_counter() - t0) / len(prompts))
        del gen
    for plan, (comps, _) in outs.items():
        base = outs.get(plan.partition("+spec")[0])
        if plan.endswith("+spec") and base is not None:
            same = sum(a.token_ids == b.token_ids for a, b in zip(comps, base[0])) / len(comps)
            accepted = sum(c.accepted_prediction_tokens for c in comps) / sum(c.completion_tokens for c in comps)
            print(f"{plan}: same answer as {plan.partition('+spec')[0]} {same * 100:5.1f}%, "
                  f"{accepted * 100:.0f}% of answer tokens drafted from the prompt")
            log({"mode": "gold-spec", "plan": plan, "n": len(prompts), "seed": args.seed, "same_as_plan": same,
                 "accepted_share": accepted})
    ref = outs.get("fp32") or outs.get("fp32>fp32")
    for plan, (comps, spq) in outs.items():
        em, f = score([c.text for c in comps], golds)
        rec = {"mode": "gold-plan", "plan": plan, "n": len(prompts), "seed": args.seed, "em": em, "f1": f,
               "s_per_question": spq}
        line = f"gold, plan {plan:10s} EM {em:5.1f}  F1 {f:5.1f}  ({spq:.2f} s/question)"
        if ref is not None:
            same = sum(a.token_ids == b.token_ids for a, b in zip(comps, ref[0])) / len(comps)
            prefix = [next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                           min(len(a.token_ids), len(b.token_ids))) for a, b in zip(comps, ref[0])]
            rec.update(same_as_fp32=same, mean_shared_prefix_tokens=sum(prefix) / len(prefix))
            line += f"  same answer as fp32 {same * 100:5.1f}%, shared prefix {rec['mean_shared_prefix_tokens']:.1f} tokens"
        print(line, flush=True)
        log(rec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--squad", default=str(DEFAULT_SQUAD))
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--show", type=int, default=5, help="example answers to print")
    p.add_argument("--plans", default="",
                   help='also answer the gold-paragraph prompts with each plan, PREFILL>DECODE comma-separated, '
                        'e.g. "fp32,int8,fp32>int8" (engine/plan.py); "w8a8>int4+spec": that plan through the '
                        'scheduler with speculative decoding (verified on the decode\'s weights; "+spec=w8a8": '
                        'on w8a8\'s)')
    p.add_argument("--prefill-variant", default="auto", help="the generator's prefill weights (default: the plan)")
    p.add_argument("--skip-rag", action="store_true", help="only the gold-paragraph modes (no ingest, no rag ask)")
    p.add_argument("--rag-global", type=lambda x: x.split(), default=[],
                   help='extra global `rag` options for the rag modes, e.g. "--context-budget-tokens 350"')
    p.add_argument("--ask-args", type=lambda x: x.split(), default=[], help='extra `rag ask` options, e.g. "-k 3"')
    p.add_argument("--skip-gold", action="store_true", help="only the rag modes (no gold-paragraph mode)")
    p.add_argument("--prompts", default="", help=f"compare prompts in process: a comma list of {', '.join(PROMPTS)}")
    p.add_argument("--gen-models", default="",
                   help="with --prompts: generation models (folders in models/) to compare on the same questions, "
                        "comma-separated, e.g. qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct")
    p.add_argument("--k", type=int, default=3, help="passages per question with --prompts")
    p.add_argument("--budget", type=int, default=350, help="context budget with --prompts (0: whole chunks)")
    p.add_argument("--neighbours", type=int, default=2, help="context neighbours with --prompts")
    ints = lambda x: [int(v) for v in x.split(",")]  # noqa: E731
    p.add_argument("--ks", type=ints, default=[2, 3, 5], help="passages per question, with --packing")
    p.add_argument("--budgets", type=lambda x: [int(v) or None for v in x.split(",")], default=[None, 150, 250, 350, 450],
                   help="context budgets with --packing (0: whole chunks)")
    p.add_argument("--nbs", type=ints, default=[0, 1, 2], help="neighbours with --packing")
    p.add_argument("--packing", action="store_true",
                   help="only the context-packing sweep (k x budget x neighbours; retrieval, no generation)")
    p.add_argument("--gold-removed", action="store_true",
                   help="also answer the questions over the corpus without their gold paragraphs (support flags)")
    run(p.parse_args())


if __name__ == "__main__":
    main()
