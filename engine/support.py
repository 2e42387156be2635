"""Answer checks after generation: degenerate answers, and what backs each sentence.

  - `degenerate(text, labels)`: why an answer cannot be returned as it is ("empty",
    "citation_only": nothing but markers like [1], "header_copy": a passage's header or
    title), or None. engine/rag.py regenerates such an answer once with a stricter
    instruction, and otherwise answers with the best-supported source sentence, marked
    as extracted.
  - `Supporter.support(answer, sources)`: each answer sentence paired with the source
    sentence that backs it best, with that sentence's character span in its document,
    the cosine similarity of the two (the embedding model), the share of the answer
    sentence's content words found in it, and a flag when neither reaches its threshold.
  - `Supporter.best_sentence(question, sources)`: the source sentence closest to the
    question (the extractive fallback).
  - `Supporter.pack(question, hits, budget, count_tokens)`: context packing. The sentences
    of the retrieved chunks closest to the question, each with its neighbours, up to a
    token budget, as blocks of consecutive sentences in document order, each block a hit
    of its own whose start:end is its exact span in the source document.

Sentences are split by the chunker's rule (engine/kernels.sentence_spans).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import kernels
from .chunk import codepoints
from .errors import InvalidInput

CITATION = re.compile(r"\[(\d{1,3})\]")
OPEN_CITATION = re.compile(r"\[\d{0,3}$")  # a marker still being generated: "[", "[1"
WORD = re.compile(r"\w+", re.UNICODE)
# Words that carry no content of their own: an answer sentence is not "supported" by
# sharing them. Small on purpose (English function words).
STOPWORDS = frozenset("""a an the and or but if of to in on at by for with from as is are was were be been being
it its this that these those there here he she they them his her their we you your i me my our us do does did
not no so than then too very can could would should will shall may might must has have had having what which who
whom whose when where why how all any both each few more most other some such only own same just also into over
under about after before between through during out up down off again further once""".split())


@dataclasses.dataclass(frozen=True, slots=True)
class SentenceSupport:
    """One sentence of an answer (answer_start:answer_end of its text) and its best support."""

    answer_start: int
    answer_end: int
    supported: bool
    score: float       # cosine of the answer sentence and the source sentence
    overlap: float     # share of the answer sentence's content words in the source sentence
    source: int        # the number of the source ([n]) holding that sentence; 0 when none
    doc_id: str = ""
    start: int = 0     # the source sentence's character span in its document
    end: int = 0
    text: str = ""

    def to_json(self) -> dict:
        return {"answer_span": [self.answer_start, self.answer_end], "supported": self.supported,
                "score": round(self.score, 4), "overlap": round(self.overlap, 4), "source": self.source,
                "doc_id": self.doc_id, "span": [self.start, self.end], "text": self.text}


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Sentence spans of `text`; a piece that is only citation markers joins the sentence before it."""
    starts, ends = kernels.sentence_spans(codepoints(text))
    spans: list[tuple[int, int]] = []
    for a, b in zip(starts.tolist(), ends.tolist()):
        if spans and not content_words(text[a:b]) and not WORD.search(CITATION.sub(" ", text[a:b])):
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    return spans


def content_words(text: str) -> set[str]:
    return {w for w in WORD.findall(CITATION.sub(" ", text).lower()) if w not in STOPWORDS}


def _norm(text: str) -> str:
    return " ".join(WORD.findall(CITATION.sub(" ", text).lower().replace("_", " ")))


def source_label(hit) -> str:
    """The label a passage carries in the prompt: `[n] (label)`."""
    return hit.metadata.get("title") or Path(hit.source).name or hit.doc_id


def degenerate(text: str, labels: Sequence[str]) -> str | None:
    """Why `text` is not an answer ("empty", "citation_only", "header_copy": one of the
    passages' `labels`, as source_label gives them), or None."""
    bare = CITATION.sub(" ", text)
    if not WORD.search(bare):
        return "citation_only" if CITATION.search(text) else "empty"
    norm = _norm(text)
    if any(norm == _norm(label) for label in labels):
        return "header_copy"
    return None


HEADER = re.compile(r"\s*\[(\d{1,3})\]\s*\(([^)\n]*)\)\s*")  # "[n] (label)", as the prompt numbers passages


def copied_header(text: str, labels: Sequence[str]) -> tuple[int, int] | None:
    """(length, n) of a copy of passage n's header "[n] (label)" that `text` starts with."""
    m = HEADER.match(text)
    if m and 1 <= int(m.group(1)) <= len(labels) and m.group(2).strip() == labels[int(m.group(1)) - 1]:
        return m.end(), int(m.group(1))
    return None


def without_header(text: str, labels: Sequence[str]) -> str:
    """An answer that opens with a copy of its passage's header ("[1] (policy.txt) Refund
    ...", the 0.5B model quoting the passage) without it, citing the passage at the end
    instead. Text that is only a header is left to degenerate()."""
    h = copied_header(text, labels)
    rest = text[h[0]:] if h else ""
    if h is None or not WORD.search(CITATION.sub(" ", rest)):
        return text
    if f"[{h[1]}]" in rest:
        return rest
    return rest + ("" if rest[-1:].isspace() else " ") + f"[{h[1]}]"


def may_become_degenerate(prefix: str, labels: Sequence[str]) -> bool:
    """Whether an answer that starts with `prefix` can still end up degenerate: it has no
    word yet, or it is still a passage header's beginning. A stream holds its text back
    while this is true, so a degenerate answer is never shown."""
    prefix = OPEN_CITATION.sub("", prefix)
    if not WORD.search(CITATION.sub(" ", prefix)):
        return True
    norm = _norm(prefix)
    return any(_norm(label).startswith(norm) for label in labels)


class Supporter:
    """Per-sentence support of answers by their sources, with the embedding model."""

    def __init__(self, embedder, *, min_score: float, min_overlap: float, cache_chunks: int = 4096) -> None:
        self.embedder = embedder
        self.min_score = min_score
        self.min_overlap = min_overlap
        self._chunks: collections.OrderedDict = collections.OrderedDict()  # chunk key -> (spans, vectors)
        self._cache_chunks = cache_chunks

    def _source_sentences(self, sources: Sequence):
        """[(source number, hit, (a, b) within hit.text)], and their unit vectors."""
        def key(hit):
            return hit.doc_id, hit.key, hit.start, hit.end

        todo = {}
        for s in sources:
            if key(s.hit) in self._chunks:
                self._chunks.move_to_end(key(s.hit))
            else:
                todo[key(s.hit)] = (s.hit, sentence_spans(s.hit.text))
        texts = [hit.text[a:b] for hit, spans in todo.values() for a, b in spans]
        if texts:
            vecs = self.embedder.embed(texts)
            i = 0
            for k, (_, spans) in todo.items():
                self._chunks[k] = (spans, vecs[i:i + len(spans)])
                i += len(spans)
        else:
            for k, (_, spans) in todo.items():
                self._chunks[k] = (spans, np.zeros((0, self.embedder.dim), np.float32))
        items, vectors = [], []
        for s in sources:
            spans, vecs = self._chunks[key(s.hit)]
            items += [(s.number, s.hit, span) for span in spans]
            vectors.append(vecs)
        while len(self._chunks) > self._cache_chunks:
            self._chunks.popitem(last=False)
        return items, (np.concatenate(vectors) if items else None)

    def support(self, answer: str, sources: Sequence) -> list[SentenceSupport]:
        spans = [(a, b) for a, b in sentence_spans(answer) if WORD.search(CITATION.sub(" ", answer[a:b]))]
        if not spans:
            return []
        items, vectors = self._source_sentences(sources)
        if not items:
            return [SentenceSupport(a, b, False, 0.0, 0.0, 0) for a, b in spans]
        q = self.embedder.embed([CITATION.sub(" ", answer[a:b]).strip() for a, b in spans])
        cos = q @ vectors.T
        words = [content_words(hit.text[x:y]) for _, hit, (x, y) in items]
        out = []
        for i, (a, b) in enumerate(spans):
            mine = content_words(answer[a:b])
            overlap = np.array([len(mine & w) / len(mine) if mine else 0.0 for w in words])
            j = int(np.argmax(cos[i] + overlap))  # both signals, each in [0, 1]
            number, hit, (x, y) = items[j]
            score, share = float(cos[i, j]), float(overlap[j])
            out.append(SentenceSupport(a, b, score >= self.min_score or share >= self.min_overlap, score, share,
                                       number, hit.doc_id, hit.start + x, hit.start + y, hit.text[x:y]))
        return out

    def _question(self, question: str, vector: np.ndarray | None) -> np.ndarray:
        """The question's unit vector: `vector` if given (checked against the model's size), else embedded."""
        if vector is None:
            return self.embedder.embed([question])[0]
        vector = np.asarray(vector, np.float32).reshape(-1)
        if vector.shape != (self.embedder.dim,):
            raise InvalidInput(f"question vector has {vector.shape[0]} dimensions; the embedding model has "
                               f"{self.embedder.dim}")
        return vector

    def pack(self, question: str, hits: Sequence, budget: int, count_tokens, neighbours: int = 1, *,
             vector: np.ndarray | None = None) -> list:
        """Blocks (hits narrowed to runs of sentences) that fit `budget` tokens of context:
        sentences taken best first by cosine with the question, each with `neighbours`
        sentences either side from the same chunk; blocks ordered by their chunk's rank,
        then by position in the chunk. `vector`: the question's embedding, if the caller has
        it (the search's: embedding it again took 0.5-1.1 ms of a RAG request, prompt_build.py)."""
        from .rag import Source

        items, vectors = self._source_sentences([Source(i + 1, h) for i, h in enumerate(hits)])
        if not items:
            return []
        q = self._question(question, vector)
        cost: dict[int, int] = {}
        chosen: set[int] = set()
        used = 0
        for j in np.argsort(-(vectors @ q), kind="stable").tolist():
            group = [k for k in range(j - neighbours, j + neighbours + 1)
                     if 0 <= k < len(items) and items[k][0] == items[j][0] and k not in chosen]
            for k in group:
                if k not in cost:
                    _, hit, (a, b) = items[k]
                    cost[k] = count_tokens(hit.text[a:b]) + 1
            add = sum(cost[k] for k in group)
            if used + add <= budget:
                chosen.update(group)
                used += add
        blocks = []
        for number, hit in enumerate(hits, 1):
            run: list[int] = []
            for k in [k for k in sorted(chosen) if items[k][0] == number] + [-1]:
                if run and (k != run[-1] + 1):
                    a, b = items[run[0]][2][0], items[run[-1]][2][1]
                    blocks.append(dataclasses.replace(hit, start=hit.start + a, end=hit.start + b, text=hit.text[a:b]))
                    run = []
                if k >= 0:
                    run.append(k)
        return blocks

    def best_sentence(self, question: str, sources: Sequence, *, vector: np.ndarray | None = None):
        """(source number, hit, (start, end) in the document, text) of the source sentence
        closest to the question, or None without sources. `vector`: as in `pack`."""
        items, vectors = self._source_sentences(sources)
        if not items:
            return None
        q = self._question(question, vector)
        number, hit, (x, y) = items[int(np.argmax(vectors @ q))]
        return number, hit, (hit.start + x, hit.start + y), hit.text[x:y]
