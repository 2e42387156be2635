"""Helpers shared by the benchmarks: data paths, SQuAD loading, percentiles, JSON lines."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SQUAD = REPO.parent / "shared" / "data" / "squad-dev-v1.1.json"
RESULTS = REPO / "bench-results"


def rotated(names: list, i: int) -> list:
    """`names` starting at the i-th (cyclically): systems take turns going first, so a slow
    minute of a shared machine hits each alike."""
    k = i % len(names)
    return names[k:] + names[:k]


def squad_paragraphs(path: Path = SQUAD, limit: int | None = None) -> list[dict]:
    """[{"id", "title", "text", "questions": [(question, [answers])]}] in file order."""
    out = []
    for art in json.loads(Path(path).read_text(encoding="utf-8"))["data"]:
        for i, p in enumerate(art["paragraphs"]):
            out.append({"id": f"{art['title']}/{i}", "title": art["title"], "text": p["context"],
                        "questions": [(qa["question"], [a["text"] for a in qa["answers"]]) for qa in p["qas"]]})
            if limit and len(out) >= limit:
                return out
    return out


def shuffled_questions(paragraphs: list[dict]) -> list[str]:
    """Every question of `paragraphs` in a fixed shuffle, so consecutive ones do not ask about
    the same paragraph."""
    qs = [q for p in paragraphs for q, _ in p["questions"]]
    return [qs[(i * 7919) % len(qs)] for i in range(len(qs))]


def rag_prompts(engine, collection: str, questions: list[str], k: int | None = None,
                whole_chunks: bool = False, new_tokens: int = 32) -> list[list[int]]:
    """Each question's RAG prompt as the engine builds it (search, k passages, packing as
    configured; `whole_chunks`: whole chunks, no packing, the serving issue's ~850-token ones)."""
    import copy

    answerer = engine.answerer
    if whole_chunks:
        answerer = copy.copy(answerer)
        answerer.config = engine.config.replace(context_budget_tokens=0)
    k = k or engine.config.answer_k
    return [answerer.build_prompt(q, engine.search(collection, q, k), new_tokens)[0] for q in questions]


def pct(xs, p: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), p)) if len(xs) else float("nan")


def cpu_name() -> str:
    """The CPU model and the vector extensions that matter here (numbers depend on them)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model} ({', '.join(isa) or 'no AVX2'})"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def log_jsonl(name: str, record: dict) -> None:
    """Append one measurement to bench-results/NAME.jsonl and print it."""
    RESULTS.mkdir(exist_ok=True)
    rec = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": cpu_name(), "rev": git_rev(),
           **record}
    line = json.dumps(rec)
    with (RESULTS / f"{name}.jsonl").open("a") as f:
        f.write(line + "\n")
    print(line, flush=True)
