"""Answer checks (engine/support.py, engine/rag.py): sentences, degenerate answers and their
retry / extraction, and per-sentence support with spans into the source documents."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import kernels
from engine.chunk import codepoints
from engine.cli import main
from engine.documents import Document
from engine.errors import InvalidInput
from engine.generate import FINISH_EOS, Completion, SamplingParams
from engine.pipeline import Answer, Engine
from engine.rag import Source
from engine.search import Hit
from engine.support import Supporter, degenerate, may_become_degenerate, sentence_spans

REFUND = "Refund policy: you can return any item within 30 days of purchase for a full refund."
TEA = ("Green tea is best brewed with water at 70 to 80 degrees Celsius. Boiling water makes it bitter. "
       "Steep it for two to three minutes.")
SHORT = SamplingParams(max_new_tokens=48)


def reference_spans(text: str) -> list[tuple[int, int]]:
    """Plain-Python statement of the rule: split at whitespace that contains a line break or
    follows . ! ? (past closing marks and [n] markers); trim whitespace."""
    out, start, i, n = [], None, 0, len(text)
    space = set(" \t\n\r\x0b\x0c")
    while i < n:
        if text[i] not in space:
            start = i if start is None else start
            i += 1
            continue
        j = i
        while j < n and text[j] in space:
            j += 1
        if start is not None:
            body = re.sub(r"(\[\d+\]|[)\]}\"'\u2019\u201d])+$", "", text[start:i])
            if "\n" in text[i:j] or "\r" in text[i:j] or (body and body[-1] in ".!?"):
                out.append((start, i))
                start = None
        i = j
    if start is not None:
        out.append((start, len(text.rstrip(" \t\n\r\x0b\x0c"))))
    return out


@given(st.lists(st.sampled_from(["Tea", "is", "hot.", "Why?", "(yes.)", "[2].", "ok.[3]", " ", "  ", "\n", "A.B.",
                                 '"Fine!"', "x"]), max_size=30))
def test_sentence_spans_follow_the_rule(parts):
    text = " ".join(parts)
    starts, ends = kernels.sentence_spans(codepoints(text))
    assert list(zip(starts.tolist(), ends.tolist())) == reference_spans(text)


def test_sentence_spans_keep_citations_with_their_sentence():
    text = "Denver won [1]. They scored 24 points.[2] [3]\nNew line"
    assert [text[a:b] for a, b in sentence_spans(text)] == ["Denver won [1].", "They scored 24 points.[2] [3]",
                                                            "New line"]


def test_degenerate_answers_are_named():
    sources = ["Refund policy"]
    assert degenerate("", sources) == "empty" and degenerate("  \n", sources) == "empty"
    assert degenerate("[1]", sources) == "citation_only" and degenerate("[1] [1].", sources) == "citation_only"
    assert degenerate("[1] (Refund policy)", sources) == "header_copy"
    assert degenerate("Refund_policy", sources) == "header_copy"
    assert degenerate("30 days [1]", sources) is None
    assert degenerate("The context does not contain the answer.", sources) is None


def test_a_stream_holds_back_what_could_still_be_degenerate():
    sources = ["Refund policy"]
    for prefix in ("", " ", "[", "[1", "[1]", "[1] (", "[1] (Refund", "Refund pol"):
        assert may_become_degenerate(prefix, sources), prefix
    for prefix in ("30", "You can", "[1] 30", "Refund policy says"):
        assert not may_become_degenerate(prefix, sources), prefix


def test_support_pairs_each_sentence_with_its_source_sentence(embedder):
    doc = "Intro line.\n" + TEA
    hit_start = len("Intro line.\n")
    src = Source(1, Hit(rank=1, score=1.0, cosine=1.0, key=7, doc_id="tea", source="tea.txt", ordinal=0,
                        start=hit_start, end=len(doc), text=TEA, metadata={}))
    s = Supporter(embedder, min_score=0.6, min_overlap=0.5)
    answer = "Brew green tea at 70 to 80 degrees Celsius [1]. The moon is made of green cheese."
    first, second = s.support(answer, [src])
    assert answer[first.answer_start:first.answer_end] == "Brew green tea at 70 to 80 degrees Celsius [1]."
    assert first.supported and first.source == 1 and first.doc_id == "tea"
    assert doc[first.start:first.end] == first.text == "Green tea is best brewed with water at 70 to 80 degrees Celsius."
    assert first.overlap >= 0.5 and 0 < first.score <= 1.0001
    assert answer[second.answer_start:second.answer_end] == "The moon is made of green cheese."
    assert not second.supported and second.score < 0.6 and second.overlap < 0.5
    assert s.support("[1]", [src]) == []  # nothing to support
    number, hit, (a, b), text = s.best_sentence("How long should tea steep?", [src])
    assert number == 1 and doc[a:b] == text == "Steep it for two to three minutes."


@pytest.fixture()
def refund(tmp_path, config, embedder, generator):
    eng = Engine(config.replace(data_dir=tmp_path / "data"), embedder=embedder, generator=generator)
    eng.create_collection("c")
    eng.ingest("c", [Document("refund", REFUND, "policy.txt", {})])
    yield eng
    eng.close()


def test_refund_question_answers_30_days_with_a_citation(refund):
    """The default prompt once answered this with "[1]" alone: a degenerate answer is never
    returned; the stream never shows it either (its deltas add up to the final text)."""
    q = "How many days do I have to return an item?"
    events = list(refund.answer_stream("c", q, params=SHORT))
    final = events[-1]
    assert isinstance(final, Answer)
    assert "".join(e for e in events if isinstance(e, str)) == final.text
    for a in (final, refund.answer_batch("c", [q, q], params=SHORT)[1]):
        assert "30 days" in a.text and a.cited == [1], a.text
        assert degenerate(a.text, [s.hit.source for s in a.sources]) is None
        assert a.support and all(x.supported for x in a.support) and a.support[0].source == 1
        assert REFUND[a.support[0].start:a.support[0].end] == a.support[0].text
    if final.retries:  # the first generation was degenerate and said so
        assert final.degenerate in ("empty", "citation_only", "header_copy")


def test_twice_degenerate_answers_are_extracted(refund):
    """When the retry is degenerate too, the answer is the source sentence closest to the
    question, marked as extracted (two generations' real Completions, as the scheduler gives)."""
    q = "How many days do I have to return an item?"
    (hits,) = refund.search_batch("c", [q], 5)
    ids, sources = refund.build_prompt(q, hits, 48)
    comps = [Completion(text=t, finish_reason=FINISH_EOS, prompt_tokens=len(ids), completion_tokens=2, token_ids=[])
             for t in ("[1]", "[1] [1]")]
    a = refund.answerer._finish(q, comps, sources, 0, 0, 0, "citation_only")
    assert a.extracted and a.retries == 1 and a.degenerate == "citation_only"
    assert a.text == f"{REFUND} [1]" and a.cited == [1]
    assert a.completion_tokens == 4 and a.support[0].supported
    as_json = a.to_json()
    assert as_json["extracted"] and as_json["support"][0]["span"] == [0, len(REFUND)]


def test_cli_ask_marks_support(tmp_path, capsys):
    (tmp_path / "policy.txt").write_text(REFUND)
    data = ["--data-dir", str(tmp_path / "d")]
    assert main([*data, "ingest", str(tmp_path / "policy.txt"), "-c", "c", "-q"]) == 0
    capsys.readouterr()
    assert main([*data, "ask", "How many days do I have to return an item?", "-c", "c",
                 "--max-new-tokens", "48"]) == 0
    out = capsys.readouterr().out
    assert "30 days" in out and "Support:" in out and "supported" in out and "[0:" in out
    assert main([*data, "ask", "How many days do I have to return an item?", "-c", "c", "--json",
                 "--max-new-tokens", "48"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["support"] and got["support"][0]["supported"] and got["support"][0]["source"] == 1
    assert REFUND[slice(*got["support"][0]["span"])] == got["support"][0]["text"]


def test_pack_keeps_the_closest_sentences_with_exact_spans(embedder, generator):
    doc = "Intro line.\n" + TEA + " Oolong sits between green and black tea. Pu-erh is aged for years."
    start = len("Intro line.\n")
    hit = Hit(rank=1, score=1.0, cosine=1.0, key=9, doc_id="tea", source="tea.txt", ordinal=0, start=start,
              end=len(doc), text=doc[start:], metadata={})
    s = Supporter(embedder, min_score=0.6, min_overlap=0.5)
    blocks = s.pack("How long should I steep the tea?", [hit], 12, generator.count_tokens, neighbours=0)
    assert [b.text for b in blocks] == ["Steep it for two to three minutes."]
    assert doc[blocks[0].start:blocks[0].end] == blocks[0].text and blocks[0].doc_id == "tea"
    wide = s.pack("How long should I steep the tea?", [hit], 60, generator.count_tokens, neighbours=1)
    assert any("Steep it for two to three minutes." in b.text for b in wide)
    assert sum(generator.count_tokens(b.text) for b in wide) <= 60
    for b in wide:  # consecutive sentences become one block, in document order
        assert doc[b.start:b.end] == b.text and hit.start <= b.start < b.end <= hit.end
    assert [b.start for b in wide] == sorted(b.start for b in wide)
    assert s.pack("tea?", [], 100, generator.count_tokens) == []


def test_a_context_budget_packs_sentences_into_the_prompt(refund, config):
    eng = Engine(refund.config.replace(context_budget_tokens=40), embedder=refund.embedder,
                 generator=refund.generator)
    try:
        (hits,) = eng.search_batch("c", ["How many days do I have to return an item?"], 5)
        ids, sources = eng.build_prompt("How many days do I have to return an item?", hits, 48)
        assert [s.hit.text for s in sources] == [REFUND] and sources[0].hit.start == 0
        a = eng.answer("c", "How many days do I have to return an item?", params=SHORT)
        assert "30" in a.text and a.cited == [1]
    finally:
        eng.close()
    with pytest.raises(Exception, match="context_budget_tokens"):
        config.replace(context_budget_tokens=3)


def test_an_answer_embeds_its_question_once(refund, monkeypatch):
    """Context packing and extraction reuse the search's embedding of the question
    (embedding it again took 0.5-1.1 ms of every RAG request), and pack the same with it."""
    q, q2 = "How many days do I have to return an item?", "Can I get my money back?"
    calls: list[list[str]] = []
    embed = refund.embedder.embed

    def counting(texts):
        calls.append(list(texts))
        return embed(texts)

    monkeypatch.setattr(refund.embedder, "embed", counting)
    a = refund.answer("c", q, params=SHORT)
    assert "30" in a.text and refund.config.context_budget_tokens
    assert [c for c in calls if q in c] == [[q]], "the question was embedded more than once"
    calls.clear()
    refund.answer_batch("c", [q, q2], params=SHORT)
    assert [c for c in calls if q in c or q2 in c] == [[q, q2]]

    (hits,) = refund.search_batch("c", [q], 5)
    s = refund.answerer.supporter
    vector = embed([q])[0]
    with_vector = s.pack(q, hits, 40, refund.generator.count_tokens, vector=vector)
    assert with_vector and with_vector == s.pack(q, hits, 40, refund.generator.count_tokens)
    assert s.best_sentence(q, [Source(1, hits[0])], vector=vector) == s.best_sentence(q, [Source(1, hits[0])])
    with pytest.raises(InvalidInput, match="dimensions"):
        s.pack(q, hits, 40, refund.generator.count_tokens, vector=vector[:10])


def test_a_copied_passage_header_is_dropped_and_cited_at_the_end():
    """The default prompt asks for the passage's own words, and the 0.5B model sometimes
    quotes the header too ("[1] (policy.txt) Refund ..."): the answer drops it and cites the
    passage at the end; a header alone stays degenerate."""
    from engine.support import copied_header, without_header

    labels = ["policy.txt", "tea.txt"]
    assert without_header(f"[1] (policy.txt) {REFUND}", labels) == f"{REFUND} [1]"
    assert without_header("[2] (tea.txt)\nSteep it for three minutes [2].", labels) == "Steep it for three minutes [2]."
    assert without_header("[1] (tea.txt) Steep it.", labels) == "[1] (tea.txt) Steep it."  # not passage 1's header
    assert without_header("[1] (policy.txt)", labels) == "[1] (policy.txt)"
    assert degenerate(without_header("[1] (policy.txt)", labels), labels) is not None
    assert copied_header("[1] (policy.txt) Refund", labels) == (len("[1] (policy.txt) "), 1)
    assert without_header("30 days [1]", labels) == "30 days [1]"
