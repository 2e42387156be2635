"""RAG answers (engine/pipeline.py answer_*): retrieve -> pack numbered sources -> stream."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.cli import main
from engine.config import NO_ANSWER
from engine.errors import FailedPrecondition, InvalidInput, NotFound
from engine.generate import FINISH_NO_CONTEXT, SamplingParams
from engine.pipeline import Answer, AnswerStart, Engine

CORPUS = Path(__file__).resolve().parent.parent / "examples" / "corpus"
SHORT = SamplingParams(max_new_tokens=48)


@pytest.fixture()
def rag(tmp_path, config, embedder, generator):
    eng = Engine(config.replace(data_dir=tmp_path / "data"), embedder=embedder, generator=generator)
    eng.create_collection("demo")
    eng.ingest_paths("demo", [CORPUS])
    yield eng
    eng.close()


def test_stream_order_sources_then_text_then_final(rag):
    events = list(rag.answer_stream("demo", "How hot should the water be for green tea?", params=SHORT))
    assert isinstance(events[0], AnswerStart) and isinstance(events[-1], Answer)
    deltas = events[1:-1]
    assert deltas and all(isinstance(d, str) and d for d in deltas)
    final = events[-1]
    assert "".join(deltas) == final.text
    assert "70" in final.text and "80" in final.text, final.text
    sources = events[0].sources
    assert sources[0].number == 1 and sources[0].hit.source.endswith("tea.txt")
    assert [s.number for s in sources] == list(range(1, len(sources) + 1))
    assert final.sources == sources and set(final.cited) <= {s.number for s in sources}
    assert final.prompt_tokens + SHORT.max_new_tokens <= rag.generator.window
    assert set(final.timings_ns) == {"embed", "search", "prompt", "queue", "prefill", "decode"}
    assert all(v >= 0 for v in final.timings_ns.values()) and final.timings_ns["prefill"] > 0


def test_unrelated_question_says_context_lacks_it(rag):
    a = rag.answer("demo", "How do I replace the battery of a 2009 car key fob?", params=SHORT)
    assert a.text == NO_ANSWER and a.finish_reason == FINISH_NO_CONTEXT and a.sources == []


def test_prompt_packs_only_what_fits(tmp_path, config, embedder, generator):
    eng = Engine(config.replace(data_dir=tmp_path / "d", answer_min_score=-1.0, answer_min_relative=0.0,
                                context_budget_tokens=0),  # whole chunks: what fits the window
                 embedder=embedder, generator=generator)
    eng.create_collection("demo")
    eng.ingest_paths("demo", [CORPUS])
    (hits,) = eng.search_batch("demo", ["tea"], 8)
    ids_all, all_sources = eng.build_prompt("tea?", hits, 64)
    assert len(all_sources) == len(hits) == 8  # a 2048 window holds the whole sample corpus
    ids_small, few = eng.build_prompt("tea?", hits, generator.window - 400)
    assert 0 < len(few) < len(all_sources) and len(ids_small) <= 400
    assert [s.hit.key for s in few] == [h.key for h in hits[:len(few)]], "top hits first, in rank order"
    text = generator.decode(ids_small)
    assert "[1]" in text and f"[{len(few) + 1}]" not in text
    eng.close()


def test_batch_answers_match_single(rag):
    """Same sources and the same answer content batched or one by one.

    (Token-level equality of batched and single greedy decoding is tested in
    test_generate.py; with different padding, int8 kernels may accumulate in a different
    order and flip a near-tie late in an answer, e.g. whether "[1]" follows the last word.)
    """
    qs = ["Who invented the Fresnel lens?", "Which planet is the hottest?",
          "How do I replace the battery of a 2009 car key fob?"]
    batch = rag.answer_batch("demo", qs, params=SHORT)
    single = [rag.answer("demo", q, params=SHORT) for q in qs]
    for b, s in zip(batch, single):
        assert [x.hit.key for x in b.sources] == [x.hit.key for x in s.sources]
        assert b.text[:12] == s.text[:12]
    assert "Fresnel" in batch[0].text
    assert batch[1].sources[0].hit.doc_id.endswith("#venus")
    assert batch[2].text == NO_ANSWER


def test_filter_answers_from_matching_documents_only(rag):
    """A filtered answer retrieves only chunks whose metadata match, streamed or batched: the
    planets' notes for a planet question (Mars's first); for a tea question, none of the tea
    notes; for a filter nothing matches, the no-context answer."""
    planets = {"kind": "planet"}
    a = rag.answer("demo", "Which planet has the tallest volcano?", params=SHORT, filter=planets)
    assert a.sources and all(s.hit.metadata["kind"] == "planet" for s in a.sources), a.sources
    assert a.sources[0].hit.doc_id.endswith("#mars"), a.sources
    tea = rag.answer("demo", "How hot should the water be for green tea?", params=SHORT, filter=planets)
    assert not any(s.hit.source.endswith("tea.txt") for s in tea.sources)
    assert all(s.hit.metadata["kind"] == "planet" for s in tea.sources)
    (b,) = rag.answer_batch("demo", ["Which planet has the tallest volcano?"], params=SHORT, filter=planets)
    assert b.text == a.text and [s.hit.key for s in b.sources] == [s.hit.key for s in a.sources]
    # each question its own filter, in one batch: the same answers as asked one by one
    qs = ["Which planet has the tallest volcano?", "How hot should the water be for green tea?"]
    own = rag.answer_batch("demo", qs, params=SHORT, filters=[planets, None])
    assert own[0].text == a.text and [s.hit.key for s in own[0].sources] == [s.hit.key for s in a.sources]
    alone = rag.answer("demo", qs[1], params=SHORT)
    assert own[1].text == alone.text and [s.hit.key for s in own[1].sources] == [s.hit.key for s in alone.sources]
    nothing = rag.answer("demo", "Which planet has the tallest volcano?", params=SHORT, filter={"kind": "none"})
    assert nothing.text == NO_ANSWER and nothing.finish_reason == FINISH_NO_CONTEXT and nothing.sources == []
    with pytest.raises(InvalidInput, match="filter must be a mapping"):
        rag.answer("demo", "tea?", params=SHORT, filter=["kind"])


@pytest.mark.parametrize("question, params, error, match", [
    ("", SHORT, InvalidInput, "empty"),
    ("word " * 3000, SHORT, InvalidInput, "context window"),
    ("tea?", SamplingParams(max_new_tokens=0), InvalidInput, "max_new_tokens"),
    ("tea?", SamplingParams(max_new_tokens=5000), InvalidInput, "max_new_tokens"),
    ("tea?", SamplingParams(temperature=-1), InvalidInput, "temperature"),
    ("tea?", SamplingParams(top_p=0), InvalidInput, "top_p"),
])
def test_bad_requests(rag, question, params, error, match):
    with pytest.raises(error, match=match):
        rag.answer("demo", question, params=params)


def test_unknown_and_empty_collections(rag):
    with pytest.raises(NotFound):
        rag.answer("nope", "tea?", params=SHORT)
    rag.create_collection("empty")
    with pytest.raises(FailedPrecondition, match="empty"):
        rag.answer("empty", "tea?", params=SHORT)


def test_cli_ask_json_and_batch(tmp_path, capsys):
    d = ["--data-dir", str(tmp_path / "data")]
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    assert main([*d, "ingest", str(corpus), "-c", "demo", "-q"]) == 0
    capsys.readouterr()
    assert main([*d, "ask", "Which planet is the largest?", "-c", "demo", "--json", "--max-new-tokens", "40"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "Jupiter" in out["answer"] and out["sources"][0]["doc_id"].endswith("#jupiter")
    assert out["usage"]["completion_tokens"] <= 40
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "a", "question": "How long does black tea steep?"}) + "\n"
                         + json.dumps("What is Olympus Mons?") + "\n")
    answers = tmp_path / "a.jsonl"
    assert main([*d, "ask", "--batch", str(questions), "--out", str(answers), "-c", "demo",
                 "--max-new-tokens", "40"]) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", 2]
    assert all(r["answer"] and r["sources"] for r in rows)
    # streamed mode prints the answer, then the sources
    assert main([*d, "ask", "Which planet is the largest?", "-c", "demo", "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert "Jupiter" in out and "Sources:" in out and "[1]" in out.split("Sources:")[1]
    assert main([*d, "ask", "", "-c", "demo"]) == 2
