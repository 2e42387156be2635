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

import numpy as np

from .config import NO_ANSWER, Config
from .errors import FailedPrecondition, InvalidInput, Overloaded
from .search import Hit, Searcher, check_k, check_min_cosine, check_queries, filter_args
from .support import Supporter, copied_header, degenerate, may_become_degenerate, source_label, without_header

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
    accepted_prediction_tokens: int = 0  # drafted answer tokens the model agreed with (speculative decoding)
    rejected_prediction_tokens: int = 0
    support: list = dataclasses.field(default_factory=list)  # SentenceSupport per answer sentence
    degenerate: str = ""  # why the first generation was not returned ("" when it was)
    retries: int = 0  # generations after the first (with the stricter instruction)
    extracted: bool = False  # the text is a source sentence, not generated

    @property
    def unsupported(self) -> list:
        return [s for s in self.support if not s.supported]

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.text, "finish_reason": self.finish_reason,
                "extracted": self.extracted, "degenerate": self.degenerate, "retries": self.retries,
                "support": [s.to_json() for s in self.support],
                "sources": [{"number": s.number, "label": source_label(s.hit), "source": s.hit.source,
                             "doc_id": s.hit.doc_id,
                             "span": [s.hit.start, s.hit.end], "score": s.hit.score, "cosine": s.hit.cosine,
                             "cited": s.number in self.cited} for s in self.sources],
                "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                          "cached_tokens": self.cached_tokens,
                          "accepted_prediction_tokens": self.accepted_prediction_tokens,
                          "rejected_prediction_tokens": self.rejected_prediction_tokens},
                "timings_ns": self.timings_ns}


class Answerer:
    """Prompt packing and generation over `searcher`, with the generator `generator()` loads."""

    def __init__(self, config: Config, searcher: Searcher, generator: Callable[[], object],
                 scheduler: Callable[[], object], embedder: Callable[[], object]) -> None:
        self.config = config
        self.searcher = searcher
        self._generator = generator
        self._scheduler = scheduler
        self._embedder = embedder
        self._supporter: Supporter | None = None

    @property
    def supporter(self) -> Supporter:
        if self._supporter is None:
            self._supporter = Supporter(self._embedder(), min_score=self.config.support_min_score,
                                        min_overlap=self.config.support_min_overlap)
        return self._supporter

    def render(self, question: str, context: str, *, strict: bool = False) -> str:
        gen = self._generator()
        user = self.config.prompt_template.format(context=context, question=question)
        if strict:  # the retry of a degenerate answer
            user += "\n" + self.config.retry_instruction
        if gen.chat_template:
            return gen.render_chat([{"role": "system", "content": self.config.system_prompt},
                                    {"role": "user", "content": user}])
        return f"{self.config.system_prompt}\n\n{user}\nAnswer:"

    def relevant(self, hits: Sequence[Hit], min_cosine: float | None = None) -> list[Hit]:
        """Hits good enough to show the generator, by cosine similarity: at least `min_cosine`
        (a request's), else config.answer_min_score (DEFAULT_ANSWER_MIN_SCORE)."""
        if not hits:
            return []
        floor = self.config.answer_min_score if min_cosine is None else min_cosine
        if self.config.answer_min_relative > 0:  # hybrid order need not put the best cosine first
            floor = max(floor, max(h.cosine for h in hits) * self.config.answer_min_relative)
        return [h for h in hits if h.cosine >= floor]

    def build_prompt(self, question: str, hits: Sequence[Hit], max_new_tokens: int, *,
                     strict: bool = False, vector: np.ndarray | None = None,
                     min_cosine: float | None = None) -> tuple[list[int], list[Source]]:
        """Prompt token ids with as many top hits as fit in window - max_new_tokens, numbered [1]..
        With Config.context_budget_tokens, the hits are first narrowed to their sentences
        closest to the question (Supporter.pack), each block a source of its own.
        `strict`: with the retry instruction, over the same (already packed) passages.
        `vector`: the question's embedding if the caller has it (the search's), else it is
        embedded again to pack the context. `min_cosine`: the relevance floor (relevant)."""
        gen = self._generator()
        budget = gen.window - max_new_tokens
        base = len(gen.encode(self.render(question, "", strict=strict)))
        if base > budget:
            raise InvalidInput(f"the question takes {base} tokens with the prompt template; with max_new_tokens="
                               f"{max_new_tokens} that exceeds the {gen.window}-token context window. "
                               "Shorten the question or lower max_new_tokens")
        blocks: list[str] = []
        sources: list[Source] = []
        used = base
        hits = self.relevant(hits, min_cosine)
        if self.config.context_budget_tokens and hits and not strict:
            hits = self.supporter.pack(question, hits, self.config.context_budget_tokens, gen.count_tokens,
                                       self.config.context_neighbours, vector=vector)
        for hit in hits:
            label = source_label(hit)
            block = f"[{len(sources) + 1}] ({label})\n{hit.text.strip()}\n\n"
            cost = len(gen.encode(block))
            if used + cost > budget:
                break
            blocks.append(block)
            sources.append(Source(len(sources) + 1, hit))
            used += cost
        while True:  # token counts of pieces need not add up exactly: check the whole
            ids = gen.encode(self.render(question, "".join(blocks) or "(no passages)\n", strict=strict))
            if len(ids) <= budget or not blocks:
                return ids, sources
            blocks.pop()
            sources.pop()

    def retrieve(self, name: str, questions: Sequence[str], k: int | None, params, filter: dict | None = None,
                 filters: Sequence | None = None):
        """(params, hits per question, embed_ns, search_ns, the questions' embeddings), after
        every check an answer needs; `filter`: only chunks whose metadata matches (as search),
        with each question's own from `filters` if given."""
        from .generate import SamplingParams

        params = params or SamplingParams(max_new_tokens=self.config.max_new_tokens)
        k = check_k(self.config.answer_k if k is None else k)
        questions = check_queries(questions, "questions")
        checked = filter_args(filter, filters, len(questions))
        col = self.searcher.open(name)
        params.check(self._generator().window)
        if col.store.counts()[1] == 0:
            raise FailedPrecondition(f"collection {name!r} is empty; ingest documents before asking questions")
        found = self.searcher.search_open(col, questions, k, mode=self.searcher.check_mode(None), **checked)
        return params, found.hits, found.embed_ns, found.search_ns, found.vectors

    def stream(self, name: str, question: str, *, k: int | None = None, params=None, filter: dict | None = None,
               cancelled: Callable[[], bool] | None = None, deadline: float | None = None,
               min_cosine: float | None = None):
        """Yields AnswerStart (sources), then text deltas (str), then the final Answer.
        Generation runs in the scheduler, batched with every other answer in flight.
        `min_cosine`: passages less similar to the question are not shown to the generator
        (default config.answer_min_score)."""
        from .generate import FINISH_CANCELLED, Completion

        floor = check_min_cosine(min_cosine)
        params, (hits,), embed_ns, search_ns, (vector,) = self.retrieve(name, [question], k, params, filter)
        t0 = time.perf_counter_ns()
        ids, sources = self.build_prompt(question, hits, params.max_new_tokens, vector=vector, min_cosine=floor)
        prompt_ns = time.perf_counter_ns() - t0
        if not sources:
            yield AnswerStart(sources)
            yield NO_ANSWER
            yield self._finish(question, [self._no_context()], sources, embed_ns, search_ns, prompt_ns, vector=vector)
            return
        yield AnswerStart(sources)
        labels = [source_label(s.hit) for s in sources]
        comps, why, sent = [], "", ""
        for attempt in range(2):
            if attempt:  # the first answer was degenerate: once more, with the stricter instruction
                ids, again = self.build_prompt(question, [s.hit for s in sources], params.max_new_tokens, strict=True,
                                               min_cosine=floor)
                if len(again) != len(sources):  # the longer prompt no longer holds every passage
                    break
            ticket = self._scheduler().submit(ids, self._retry_params(params) if attempt else params,
                                              cancelled=cancelled, deadline=deadline)
            held, shown = "", False
            try:
                for ev in ticket:
                    if isinstance(ev, Completion):
                        comps.append(ev)
                    elif shown:
                        sent += ev
                        yield ev
                    else:  # held back while the answer could still be degenerate (or overruled)
                        held += ev
                        if not may_become_degenerate(held, labels) and not (why and _may_decline(held)):
                            shown = True
                            head = copied_header(held, labels)  # shown without it (support.without_header)
                            sent = held[head[0]:] if head else held
                            yield sent
            finally:
                ticket.cancel()  # a caller that stops reading frees its row at the next step
            if shown or comps[-1].finish_reason == FINISH_CANCELLED:
                break
            reason = degenerate(comps[-1].text, labels)
            if reason is None:
                break
            why = why or reason
        answer = self._finish(question, comps, sources, embed_ns, search_ns, prompt_ns, why, vector=vector)
        # what was held back, extracted, or cited at the end: the deltas add up to answer.text
        rest = answer.text[len(sent):] if answer.text.startswith(sent) else answer.text
        if rest:
            yield rest
        yield answer

    def batch(self, name: str, questions: Sequence[str], *, k: int | None = None, params=None,
              filter: dict | None = None, progress: Callable[[int], None] | None = None,
              filters: Sequence | None = None, min_cosine: float | None = None) -> list[Answer]:
        """Answers for many questions: one embedding batch, one index batch search, and every
        prompt submitted to the scheduler, which decodes up to its row limit together.
        `min_cosine`: as stream's."""
        from .generate import FINISH_CANCELLED

        floor = check_min_cosine(min_cosine)
        params, hits, embed_ns, search_ns, vectors = self.retrieve(name, questions, k, params, filter, filters)
        n = len(questions)
        t0 = time.perf_counter_ns()
        prompts = [self.build_prompt(q, h, params.max_new_tokens, vector=v, min_cosine=floor)
                   for q, h, v in zip(questions, hits, vectors)]
        prompt_ns = (time.perf_counter_ns() - t0) // n
        out: list[Answer | None] = [None] * n
        done = 0
        for i, (ids, sources) in enumerate(prompts):
            if not sources:
                out[i] = self._finish(questions[i], [self._no_context()], sources, embed_ns // n, search_ns // n,
                                      prompt_ns, vector=vectors[i])
                done += 1
        todo = [i for i in range(n) if out[i] is None]
        comps: dict[int, list] = {i: [] for i in todo}
        why: dict[int, str] = {}
        this_round = {i: prompts[i][0] for i in todo}
        for attempt in range(2):  # the second round: degenerate answers, with the stricter instruction
            retry = {}
            for i, comp in self._generate_all(this_round, self._retry_params(params) if attempt else params):
                comps[i].append(comp)
                sources = prompts[i][1]
                labels = [source_label(s.hit) for s in sources]
                reason = degenerate(comp.text, labels) if comp.finish_reason != FINISH_CANCELLED else None
                if reason and not attempt:
                    why[i] = reason
                    ids, again = self.build_prompt(questions[i], [s.hit for s in sources], params.max_new_tokens,
                                                   strict=True, min_cosine=floor)
                    if len(again) == len(sources):
                        retry[i] = ids
                        continue
                out[i] = self._finish(questions[i], comps[i], sources, embed_ns // n, search_ns // n, prompt_ns,
                                      why.get(i, ""), vector=vectors[i])
                done += 1
                if progress:
                    progress(done)
            this_round = retry
        if progress:
            progress(done)
        return out

    def _retry_params(self, params):
        """The retry may not start with a citation marker or end at once (EOS first)."""
        gen = self._generator()
        return dataclasses.replace(params, suppress_first=tuple(sorted(gen.citation_token_ids | gen.eos_ids)))

    def _generate_all(self, prompts: dict, params):
        """Yields (i, Completion) for prompts {i: ids}, submitted to the scheduler as fast as its
        queue takes them; whatever is still running when the caller stops is cancelled."""
        scheduler = self._scheduler()
        tickets: dict[int, object] = {}
        pending = list(prompts)
        try:
            while pending or tickets:
                while pending:  # submit while the scheduler's queue has room
                    try:
                        tickets[pending[0]] = scheduler.submit(prompts[pending[0]], params, streamed=False)
                    except Overloaded:
                        if not tickets:  # the queue is full of other requests: nothing to wait for
                            raise
                        break
                    pending.pop(0)
                i = next(iter(tickets))
                yield i, tickets.pop(i).result()
        finally:
            for t in tickets.values():
                t.cancel()

    def _finish(self, question, comps, sources, embed_ns, search_ns, prompt_ns, why: str = "", *,
                vector: np.ndarray | None = None) -> Answer:
        """The Answer from its generations (usually one; two after a degenerate first answer),
        extracted from the sources if the last is still degenerate, with per-sentence support.
        `vector`: the question's embedding (the search's)."""
        from .generate import FINISH_CANCELLED

        last = comps[-1]
        text, extracted = last.text, False
        labels = [source_label(s.hit) for s in sources]
        text = without_header(text, labels)
        if last.finish_reason != FINISH_CANCELLED and _overruled(why, text, labels):
            best = self.supporter.best_sentence(question, sources, vector=vector)
            text, extracted = (f"{best[3]} [{best[0]}]", True) if best else (NO_ANSWER, False)
        support = self.supporter.support(text, sources) if sources and not text.startswith(NO_ANSWER) else []
        cited = sorted({int(m) for m in CITATION.findall(text) if 1 <= int(m) <= len(sources)})
        return Answer(question=question, text=text, finish_reason=last.finish_reason, sources=sources, cited=cited,
                      prompt_tokens=sum(c.prompt_tokens for c in comps),
                      completion_tokens=sum(c.completion_tokens for c in comps),
                      cached_tokens=sum(c.cached_tokens for c in comps), support=support, degenerate=why,
                      accepted_prediction_tokens=sum(c.accepted_prediction_tokens for c in comps),
                      rejected_prediction_tokens=sum(c.rejected_prediction_tokens for c in comps),
                      retries=len(comps) - 1, extracted=extracted,
                      timings_ns={"embed": embed_ns, "search": search_ns, "prompt": prompt_ns,
                                  "queue": sum(c.queue_ns for c in comps), "prefill": sum(c.prefill_ns for c in comps),
                                  "decode": sum(c.decode_ns for c in comps)})

    @staticmethod
    def _no_context():
        from .generate import FINISH_NO_CONTEXT, Completion

        return Completion(text=NO_ANSWER, finish_reason=FINISH_NO_CONTEXT, prompt_tokens=0, completion_tokens=0,
                          token_ids=[])


def _may_decline(text: str) -> bool:
    """Could `text` (a prefix of the answer) still be, or is it, the refusal NO_ANSWER?"""
    t = text.strip()
    return NO_ANSWER.startswith(t) or t.startswith(NO_ANSWER)


def _overruled(why: str, text: str, labels: list[str]) -> bool:
    """Is the retry of a degenerate first answer (`why`) unusable, so that the answer is
    extracted from the sources? When it is degenerate too, or when it declines although
    the first answer cited a passage: the model pointed at the passage holding the answer
    and then failed to word it (the refund example, int8 weights, 0.5B model)."""
    if not why:
        return False
    return degenerate(text, labels) is not None or (why == "citation_only" and text.strip().startswith(NO_ANSWER))
