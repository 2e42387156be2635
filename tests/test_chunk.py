"""engine/chunk.py: token-aware chunks, identical to the plain-Python reference on real text."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunk_reference import reference_chunks
from engine.chunk import Chunker
from engine.errors import InvalidInput

REPO = Path(__file__).resolve().parent.parent


def real_texts() -> list[tuple[str, str]]:
    """Real prose: the sample corpus and standard-library sources shipped with every Python."""
    texts = [(str(p.relative_to(REPO)), p.read_text()) for p in sorted((REPO / "examples/corpus").rglob("*"))
             if p.is_file()]
    for mod in (textwrap, inspect):
        texts.append((mod.__name__, inspect.getsource(mod)))
    texts.append(("readme", (REPO / "README.md").read_text()))
    return texts


@pytest.fixture(scope="module")
def chunker(embedder):
    return Chunker(embedder.raw_tokenizer, target=256, overlap=32,
                   window=embedder.max_length - embedder.special_tokens)


def check_against_reference(chunker, doc_id, text):
    chunks = chunker.chunk(doc_id, text)
    offsets = chunker.tokenizer.encode(text, add_special_tokens=False).offsets
    ref = reference_chunks(text, offsets, chunker.target, chunker.overlap)
    assert [(c.start, c.end, c.n_tokens, c.text) for c in chunks] == ref
    return chunks


@pytest.mark.parametrize("doc_id, text", real_texts(), ids=lambda x: x if len(x) < 40 else "")
def test_real_text_matches_reference(chunker, doc_id, text):
    chunks = check_against_reference(chunker, doc_id, text)
    assert chunks, "real text gives at least one chunk"
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    assert all(c.doc_id == doc_id for c in chunks)
    for c in chunks:
        assert 0 <= c.start < c.end <= len(text)
        assert c.text == text[c.start:c.end]
        assert 1 <= c.n_tokens <= chunker.target


def test_long_text_respects_window_and_overlap(chunker, embedder):
    text = inspect.getsource(inspect)  # ~3,400 lines of real code and prose
    chunks = chunker.chunk("inspect", text)
    assert len(chunks) > 20
    assert chunker.target == embedder.max_length - embedder.special_tokens == 254
    for a, b in zip(chunks, chunks[1:]):
        assert b.start > a.start
        assert b.start <= a.end or not text[a.end:b.start].strip(), "no text is skipped between chunks"
    # Every chunk embeds whole: re-tokenized with special tokens it fits the model window.
    for n in embedder.count_tokens([c.text for c in chunks]):
        assert n <= embedder.max_length


def test_prefers_paragraph_boundaries(embedder):
    para = "This sentence has exactly some words in it. " * 6
    text = "\n\n".join(para.strip() for _ in range(6))
    chunker = Chunker(embedder.raw_tokenizer, target=120, overlap=0)
    chunks = chunker.chunk("d", text)
    assert len(chunks) > 1
    for c in chunks[:-1]:
        assert text[c.end:c.end + 2] == "\n\n", "chunks end at a blank line when one is in reach"


def test_sentence_boundary_when_no_paragraph(embedder):
    text = " ".join(f"Sentence number {i} talks about item {i}." for i in range(200))
    chunks = Chunker(embedder.raw_tokenizer, target=50, overlap=5).chunk("d", text)
    assert all(c.text.endswith(".") for c in chunks)


def test_short_and_empty_texts(chunker):
    assert chunker.chunk("d", "") == []
    assert chunker.chunk("d", "   \n\t ") == []
    (only,) = chunker.chunk("d", "  Hello world.  ")
    assert (only.start, only.end, only.text) == (2, 14, "Hello world.")


def test_bad_settings(embedder):
    with pytest.raises(InvalidInput):
        Chunker(embedder.raw_tokenizer, target=0, overlap=0)
    with pytest.raises(InvalidInput):
        Chunker(embedder.raw_tokenizer, target=10, overlap=10)
    assert Chunker(embedder.raw_tokenizer, target=1000, overlap=32, window=254).target == 254


unicode_text = st.text(
    alphabet=st.one_of(st.sampled_from(list(" \n\n\t.!?,;:-'\"()[]")), st.characters(codec="utf-8",
                       exclude_categories=("Cs",))),
    max_size=2000)


@given(text=unicode_text, target=st.integers(2, 64), data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_property_identical_to_reference(embedder, text, target, data):
    overlap = data.draw(st.integers(0, target - 1))
    chunker = Chunker(embedder.raw_tokenizer, target=target, overlap=overlap)
    chunks = check_against_reference(chunker, "p", text)
    offsets = embedder.raw_tokenizer.encode(text, add_special_tokens=False).offsets
    if not offsets:
        assert chunks == []
        return
    # Spans lie inside the text and, together, cover every token.
    assert chunks[0].start == offsets[0][0] and chunks[-1].end == offsets[-1][1]
    # (<=: one character can be several tokens, e.g. decomposed Hangul, and a tiny target may split it)
    assert all(a.start <= b.start for a, b in zip(chunks, chunks[1:]))
    for ts, te in offsets:
        assert any(c.start <= ts and te <= c.end for c in chunks), f"token at {ts}:{te} is in no chunk"
