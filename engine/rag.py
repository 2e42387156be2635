"""Answers: retrieved hits -> a prompt with numbered sources -> generated text.

Retrieval goes through the one search path (engine/search.py). Only hits whose cosine
similarity passes the relevance gate (`relevant`) are shown to the generator; as many of
them as fit the context window, minus the tokens the answer may take, are packed into the
prompt as `[1] (title)\\ntext` blocks. With none left, the answer is NO_ANSWER without
running the generator: a small model given unrelated passages answers from memory.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import NO_ANSWER, Config
from .errors import FailedPrecondition, InvalidInput, Overloaded
from .search import Hit, Searcher, check_k, check_queries

CITATION = re.compile(r"\[(\d{1,3})\]")


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
    """A retrieved chunk as numbered in the prompt: `[number]`."""

    number: int
    hit: Hit


@dataclasses.dataclass(slots=True)
class AnswerStart:
    """First event of a streamed answer: the sources packed into the prompt."""

    sources: list[Source]


@dataclasses.dataclass(slots=True)
class Answer:
    """A finished answer. `cited` are the source numbers the text refers to."""

    question: str
    text: str
    finish_reason: str
    sources: list[Source]
    cited: list[int]
    prompt_tokens: int
    completion_tokens: int
    timings_ns: dict[str, int]
    cached_tokens: int = 0  # prompt tokens whose KV came from the scheduler's prefix cache

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.text, "finish_reason": self.finish_reason,
                "sources": [{"number": s.number, "source": s.hit.source, "doc_id": s.hit.doc_id,
                             "span": [s.hit.start, s.hit.end], "score": s.hit.score, "cosine": s.hit.cosine,
                             "cited": s.number in self.cited} for s in self.sources],
                "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                          "cached_tokens": self.cached_tokens},
                "timings_ns": self.timings_ns}


class Answerer:
    """Prompt packing and generation over `searcher`, with the generator `generator()` loads."""

    def __init__(self, config: Config, searcher: Searcher, generator: Callable[[], object],
                 scheduler: Callable[[], object]) -> None:
        self.config = config
        self.searcher = searcher
        self._generator = generator
        self._scheduler = scheduler

    def render(self, question: str, context: str) -> str:
        gen = self._generator()
        user = self.config.prompt_template.format(context=context, question=question)
        if gen.chat_template:
            return gen.render_chat([{"role": "system", "content": self.config.system_prompt},
                                    {"role": "user", "content": user}])
        return f"{self.config.system_prompt}\n\n{user}\nAnswer:"

    def relevant(self, hits: Sequence[Hit]) -> list[Hit]:
        """Hits good enough to show the generator, by cosine similarity (DEFAULT_ANSWER_MIN_SCORE)."""
        if not hits:
            return []
        floor = self.config.answer_min_score
        if self.config.answer_min_relative > 0:  # hybrid order need not put the best cosine first
            floor = max(floor, max(h.cosine for h in hits) * self.config.answer_min_relative)
        return [h for h in hits if h.cosine >= floor]

    def build_prompt(self, question: str, hits: Sequence[Hit], max_new_tokens: int) -> tuple[list[int], list[Source]]:
        """Prompt token ids with as many top hits as fit in window - max_new_tokens, numbered [1].."""
        gen = self._generator()
        budget = gen.window - max_new_tokens
        base = len(gen.encode(self.render(question, "")))
        if base > budget:
            raise InvalidInput(f"the question takes {base} tokens with the prompt template; with max_new_tokens="
                               f"{max_new_tokens} that exceeds the {gen.window}-token context window. "
                               "Shorten the question or lower max_new_tokens")
        blocks: list[str] = []
        sources: list[Source] = []
        used = base
        for hit in self.relevant(hits):
            label = hit.metadata.get("title") or Path(hit.source).name or hit.doc_id
            block = f"[{len(sources) + 1}] ({label})\n{hit.text.strip()}\n\n"
            cost = len(gen.encode(block))
            if used + cost > budget:
                break
            blocks.append(block)
            sources.append(Source(len(sources) + 1, hit))
            used += cost
        while True:  # token counts of pieces need not add up exactly: check the whole
            ids = gen.encode(self.render(question, "".join(blocks) or "(no passages)\n"))
            if len(ids) <= budget or not blocks:
                return ids, sources
            blocks.pop()
            sources.pop()

    def retrieve(self, name: str, questions: Sequence[str], k: int | None, params):
        """(params, hits per question, embed_ns, search_ns), after every check an answer needs."""
        from .generate import SamplingParams

        params = params or SamplingParams(max_new_tokens=self.config.max_new_tokens)
        k = check_k(self.config.answer_k if k is None else k)
        questions = check_queries(questions, "questions")
        col = self.searcher.open(name)
        params.check(self._generator().window)
        if col.store.counts()[1] == 0:
            raise FailedPrecondition(f"collection {name!r} is empty; ingest documents before asking questions")
        found = self.searcher.search_open(col, questions, k, filter=None, mode=self.searcher.check_mode(None))
        return params, found.hits, found.embed_ns, found.search_ns

    def stream(self, name: str, question: str, *, k: int | None = None, params=None,
               cancelled: Callable[[], bool] | None = None, deadline: float | None = None):
        """Yields AnswerStart (sources), then text deltas (str), then the final Answer.
        Generation runs in the scheduler, batched with every other answer in flight."""
        from .generate import Completion

        params, (hits,), embed_ns, search_ns = self.retrieve(name, [question], k, params)
        t0 = time.perf_counter_ns()
        ids, sources = self.build_prompt(question, hits, params.max_new_tokens)
        prompt_ns = time.perf_counter_ns() - t0
        if not sources:
            yield AnswerStart(sources)
            yield NO_ANSWER
            yield self._answer(question, self._no_context(), sources, embed_ns, search_ns, prompt_ns)
            return
        ticket = self._scheduler().submit(ids, params, cancelled=cancelled, deadline=deadline)
        try:
            yield AnswerStart(sources)
            for ev in ticket:
                if isinstance(ev, Completion):
                    yield self._answer(question, ev, sources, embed_ns, search_ns, prompt_ns)
                else:
                    yield ev
        finally:
            ticket.cancel()  # a caller that stops reading frees its row at the next step

    def batch(self, name: str, questions: Sequence[str], *, k: int | None = None, params=None,
              progress: Callable[[int], None] | None = None) -> list[Answer]:
        """Answers for many questions: one embedding batch, one index batch search, and every
        prompt submitted to the scheduler, which decodes up to its row limit together."""
        params, hits, embed_ns, search_ns = self.retrieve(name, questions, k, params)
        n = len(questions)
        t0 = time.perf_counter_ns()
        prompts = [self.build_prompt(q, h, params.max_new_tokens) for q, h in zip(questions, hits)]
        prompt_ns = (time.perf_counter_ns() - t0) // n
        out: list[Answer | None] = [None] * n
        done = 0
        for i, (ids, sources) in enumerate(prompts):
            if not sources:
                out[i] = self._answer(questions[i], self._no_context(), sources, embed_ns // n,
                                      search_ns // n, prompt_ns)
                done += 1
        todo = [i for i in range(n) if out[i] is None]
        scheduler = self._scheduler()
        tickets: dict[int, object] = {}
        try:
            pending = list(todo)
            while pending or tickets:
                while pending:  # submit while the scheduler's queue has room
                    try:
                        tickets[pending[0]] = scheduler.submit(prompts[pending[0]][0], params)
                    except Overloaded:
                        break
                    pending.pop(0)
                i = next(iter(tickets))
                comp = tickets.pop(i).result()
                out[i] = self._answer(questions[i], comp, prompts[i][1], embed_ns // n, search_ns // n, prompt_ns)
                done += 1
                if progress:
                    progress(done)
        finally:
            for t in tickets.values():
                t.cancel()
        if progress:
            progress(done)
        return out

    @staticmethod
    def _no_context():
        from .generate import FINISH_NO_CONTEXT, Completion

        return Completion(text=NO_ANSWER, finish_reason=FINISH_NO_CONTEXT, prompt_tokens=0, completion_tokens=0,
                          token_ids=[])

    @staticmethod
    def _answer(question, comp, sources, embed_ns, search_ns, prompt_ns) -> Answer:
        cited = sorted({int(m) for m in CITATION.findall(comp.text) if 1 <= int(m) <= len(sources)})
        return Answer(question=question, text=comp.text, finish_reason=comp.finish_reason, sources=sources,
                      cited=cited, prompt_tokens=comp.prompt_tokens, completion_tokens=comp.completion_tokens,
                      cached_tokens=comp.cached_tokens,
                      timings_ns={"embed": embed_ns, "search": search_ns, "prompt": prompt_ns,
                                  "queue": comp.queue_ns, "prefill": comp.prefill_ns, "decode": comp.decode_ns})
