"""The generation scheduler: one loop owns the decoder and serves every caller from a queue.

Every answer (a gRPC `Answer` stream, `AnswerBatch`, `rag ask`, the Python API) is a request
submitted here; callers read its events (text deltas, then one Completion) from a ticket.
One thread runs the model, so concurrent answers never fight over the cores; each step it:
  1. retires finished, cancelled and past-deadline rows (their KV leaves the batch);
  2. admits waiting requests while the row limit (`max_rows`) and the KV budget
     (`kv_budget_tokens`: rows x the longest row's prompt + max_new_tokens) allow;
  3. runs one prefill chunk of the oldest newcomer, so streams already decoding keep a
     steady pace while a long prompt joins (chunked prefill): while streamed rows decode, a
     chunk is the smaller of what takes about `prefill_stall_ms` (steered by how long the
     last ones took) and the size that reaches PREFILL_EFFICIENCY of the long-chunk rate on
     this machine (measured once, see _calibrate and wait_started), at least one block (and
     a prompt's chunks of even size, no short tail), so
     streams wait no longer than prefill needs to stay efficient (efficient enough that
     the prompts waiting behind it do not wait on one weight pass after another: a
     backlog of newcomers gets bigger chunks, _efficient_chunk); with no stream decoding
     (nobody, or only batch requests, which want throughput and not a steady pace),
     `prefill_chunk` tokens. While rows speculate, a chunk rides in their verify run
     instead (step 5, _ride_chunk: a slot of the row-slots graph of its own, one pass over
     the weights for both, so a small chunk costs only its tokens), about as long as the
     run itself per request waiting for its prefill while streams wait on it, the run no
     longer than `prefill_stall_ms` (the streams' inter-token latency then; sized by what
     riding tokens have cost of late); a prompt's
     last chunk runs on its own, never shorter than `last_chunk` tokens. A newcomer whose
     prompt is done joins the running batch with its first token;
  4. runs one batched decode step over every active row and hands each row's text delta
     to its caller;
  5. runs one verify run over the speculating rows (below).

Rows join and leave a running batch: the batch KV cache (generate.KVBatch) is right-padded
(row b's keys are columns [0, len_b), its next key goes to column len_b, in place), a
newcomer's cache (prefilled alone) is copied into the next free row with room for its new
tokens, and leaving rows are cut out by moving later rows down. Each row attends to its own
keys only (GroupQueryAttention, engine/export_lm.gqa_attention), and a step pads its row
count where the CPU's kernels depend on a row's place in the run (Generator.row_padding),
so a greedy row gets the same tokens alone or in any batch.

Speculative decoding (prompt lookup): a greedy answer, streamed or a batch request, drafts
up to `draft_tokens` tokens per run (a request's own SamplingParams.speculative_tokens, if
set, 0 = off), as many as its own rate of agreed drafts makes worth their place in the run
(DRAFT_WORTH; `adaptive_drafts`; a lone row's rates apart for drafts after a one-token
match, WEAK_DRAFT_PRIOR), by copying what followed the latest earlier occurrence of its last
tokens in its prompt or answer (generate.draft_match: a RAG answer quotes its passages), and
runs its last token and the drafts through the model at once (KVBatch.verify_rows): a run
reads the weights once, as a one-token step does, so every draft the model agrees with is
a token for free, and the tokens are exactly what the model picks at each position. All
speculating rows share one run (up to Generator.row_slots of them: the row-slots graph,
engine/export_lm.row_slots, attends per row, since GroupQueryAttention takes several new
tokens after a cache only in a one-row run; without that graph each row runs alone), each
row with its own token count (fillers round it up to whole pairs, generate.VERIFY_ALIGN: a
one-token run, or an odd run's last token, rounds differently). A row's results in such a
run are the same bits whatever the buffer, its place, its run's length or the other rows,
so its tokens are the same alone or beside others, as the batched rows' are: whether a
request speculates depends on itself only, never on the load, and the more rows a run
carries, the fewer drafts each (VERIFY_RUN_TOKENS) without changing a token.
Verify runs take the weights the machine's plan chose for them (Generator.verify_variant,
engine/plan.py: of those fastest at them, the closest to fp32; under the latency objective
the fastest at a lone row's run, e.g. int4 on the AVX-512 VNNI EPYC, whose 2-token run
costs what its one-token step does, w8a8 on the AMX Xeon, whose integer GEMM takes 4 tokens
for about the cost of one; under throughput also at a full run), which need not be the
one-token steps' weights. Sampled rows, and requests that turn drafts off, share one-token
steps instead. (Batch requests used to: while speculating rows took turns, one-token steps
shared by all rows gave a batch more tokens/s; sharing verify runs, 24 gold-paragraph batch
requests at 8 rows finished 1.3-1.4x sooner with drafts, an ad-hoc run on the AMX Xeon.)

Prefix cache: prompts are prefilled in blocks of `block_tokens` aligned from position 0,
and each full block's KV is kept in an LRU cache keyed by a hash of all tokens up to its
end, under a memory budget. A prompt whose leading blocks are cached skips their prefill
(the static head of every RAG prompt, a repeated question). Prefill always runs the same
block-aligned chunks whether blocks come from the cache or not, never a short last chunk
(Scheduler.last_chunk: short runs take other kernels), so a cache hit gives exactly the KV and
the first token a cold prefill computes. `Completion.cached_tokens` says how many prompt
tokens came from the cache.

A full queue raises Overloaded (RESOURCE_EXHAUSTED); a request that cannot fit the context
window is refused before it is queued (InvalidInput naming the numbers); a failure inside a
step fails the requests in that step and the loop keeps serving.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .config import (DEFAULT_KV_BUDGET_TOKENS, DEFAULT_MAX_CONCURRENT_GENERATIONS, DEFAULT_MAX_QUEUED_GENERATIONS,
                     DEFAULT_PREFILL_CHUNK, DEFAULT_PREFILL_STALL_MS, DEFAULT_PREFIX_BLOCK_TOKENS,
                     DEFAULT_PREFIX_CACHE_MB)
from .errors import InvalidInput, Overloaded, Unavailable
from .generate import (FINISH_CANCELLED, FINISH_EOS, FINISH_LENGTH, VERIFY_ALIGN, Completion, Generator, KVBatch,
                       SamplingParams, _Row, draft_match)

log = logging.getLogger("rag.scheduler")

_DONE = object()


# While streams decode, a prefill chunk is no larger than the size that reaches this share of
# the prefill rate of a long chunk here (a chunk's time is about a + b * tokens: `a` is one
# pass over the weights, which a small chunk pays in full).
PREFILL_EFFICIENCY = 0.8

# A verify run carries about this many tokens: a row drafts at most VERIFY_RUN_TOKENS // rows - 1
# (7 for up to 4 rows, 3 at 8). Drafts are nearly free in a run of one row but not in a run
# of eight (an 8-row run of 8 tokens each costs ~1.6x one of 4 each), and a longer run is a
# longer wait for every stream in it. 32 vs no cap, 8 streams of 128 tokens in process (AMX
# Xeon, ad-hoc, interleaved): 206.6 / 197.3 tok/s against 199.0 / 193.4, inter-token p50 56-60
# ms against 86-89, p99 153-156 against 182-263. Tokens do not change: a row's logits do not
# depend on how many tokens its run carries (tests/test_scheduler.py).
VERIFY_RUN_TOKENS = 32

# Drafts a row offers follow how often its drafts have been right: a row's j-th draft is kept
# only if the j - 1 before it were. A row in a shared run drafts while p^j (p: one agreement
# rate for all its drafts) is at least what the draft's place is worth (at
# least one draft: runs are padded to pairs, so a first draft costs what its filler would).
# A place is worth the tokens the decode weights would make without drafts in the time it
# takes: (seconds one more token costs the run, from the plan's measured verify runs) x
# (one-token steps' tokens/s: one row's for a lone row's run, which reads the weights anyway,
# so a place is cheap; a full batch's for a shared run, which arithmetic bounds):
# Plan.draft_worth, e.g. 1.59 ms x 62.7 tok/s = 0.10 alone and 1.81 ms x 160.5 = 0.29
# shared on the AMD EPYC with AVX-512 VNNI (w8a8 verify, int4 decode). DRAFT_WORTH where the
# plan has no such rates. From measured rates, not this run's timing, so a row's drafts (and
# its usage counts) depend on its own history and its run's rows only. A lone row's run,
# whose time the plan's two run lengths give, takes the count that keeps most tokens a second
# instead (Ticket.drafts_for_speed), with two rates: p1 for a run's first draft and p for a
# draft after a kept one, so the j-th is kept with p1 p^(j-1) (a RAG answer quotes its
# passages in stretches: 0.80 after a kept draft against 0.56 for a first one on the AVX-512
# VNNI EPYC; one rate for both undervalued runs of 3). The rates are the row's own, kept
# drafts against drafts not kept (or runs stopped, for the one rate), counted with a decay of
# DRAFT_MEMORY per run from a prior of 2 in 3. Tokens never depend on them: a row's logits
# do not depend on how many tokens its run carries. benchmarks/draft_count.py compares the
# rule with fixed counts and with one rate everywhere, alone and in shared runs.
DRAFT_WORTH = {"alone": 0.1, "shared": 0.25}
DRAFT_MEMORY = 0.8
DRAFT_PRIOR = (2.0, 1.0)  # (kept, not kept) before a row's first run, for every rate
# A lone row keeps its two rates twice: for drafts copied after a match of two tokens or more,
# and after a one-token match (generate.draft_match), a common word whose continuation is a
# guess. Over 120 SQuAD RAG answers (the default model, greedy, Zen 5 EPYC) a run's first
# draft was kept 0.51 of the time after a one-token match and a draft after a kept one 0.59,
# against 0.77-0.83 and 0.75-0.88 after longer ones; a row's own counts, from the prior of 2
# in 3, do not learn that within a short answer. So the one-token rates start at an even
# chance: where a 4-token run costs ~1.3x a 2-token one (int4 here), such a run then offers
# one draft (a free one: runs are padded to pairs), where runs of 4 cost what runs of 2 do
# (w8a8 on the AMX Xeon), three.
WEAK_DRAFT_PRIOR = (1.0, 1.0)
# What Scheduler.usage counts: runs of each kind, and prompt tokens by how their keys came.
RUN_KINDS = ("prefill", "step", "verify")
PROMPT_SOURCES = ("prefilled", "riding", "cached")


def empty_usage() -> dict:
    """Scheduler.usage before anything ran."""
    return {"seconds": dict.fromkeys(RUN_KINDS, 0.0), "runs": dict.fromkeys(RUN_KINDS, 0),
            "prompt_tokens": dict.fromkeys(PROMPT_SOURCES, 0)}


class PrefixCache:
    """KV blocks of prompt prefixes: key = hash of every token up to the block's end."""

    def __init__(self, budget_bytes: int, block_tokens: int) -> None:
        self.budget = budget_bytes
        self.block = block_tokens
        self._blocks: collections.OrderedDict[bytes, tuple[list[np.ndarray], bool]] = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.lookups = 0
        self._lock = threading.Lock()

    def keys(self, ids: Sequence[int]) -> list[bytes]:
        """Chain hashes of the prompt's full blocks."""
        out, h = [], b""
        arr = np.asarray(ids, dtype=np.int64)
        for j in range(len(ids) // self.block):
            h = hashlib.blake2b(h + arr[j * self.block:(j + 1) * self.block].tobytes(), digest_size=16).digest()
            out.append(h)
        return out

    def lookup(self, keys: list[bytes]) -> list[list[np.ndarray]]:
        """The cached blocks of the longest cached run of leading `keys`."""
        found = []
        with self._lock:
            self.lookups += 1
            for k in keys:
                entry = self._blocks.get(k)
                if entry is None:
                    break
                self._blocks.move_to_end(k)
                found.append(entry[0])
            if found:
                self.hits += 1
        return found

    def put(self, key: bytes, kv: list[np.ndarray], *, pinned: bool = False) -> None:
        size = sum(a.nbytes for a in kv)
        if size > self.budget:
            return
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                if pinned:
                    self._blocks[key] = (self._blocks[key][0], True)
                return
            self._blocks[key] = (kv, pinned)
            self.bytes += size
            for k in list(self._blocks):
                if self.bytes <= self.budget:
                    break
                blocks, pin = self._blocks[k]
                if pin or k == key:
                    continue
                del self._blocks[k]
                self.bytes -= sum(a.nbytes for a in blocks)

    def __len__(self) -> int:
        return len(self._blocks)


class Ticket:
    """A submitted request: iterate for its events (text deltas, then one Completion)."""

    def __init__(self, scheduler: "Scheduler", prompt: list[int], params: SamplingParams,
                 cancelled: Callable[[], bool] | None, deadline: float | None, streamed: bool = True) -> None:
        self.scheduler = scheduler
        self.prompt = prompt
        self.params = params
        self._cancelled = cancelled
        self.deadline = deadline
        self.streamed = streamed  # a caller reading tokens as they come (not a batch request)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.row = _Row(scheduler.generator, len(prompt), params)
        self.gone = False
        self.kv: list[np.ndarray] | None = None  # own cache while prefilling
        self.done_tokens = 0  # prompt tokens whose KV exists
        self.cached_tokens = 0
        self.block_keys: list[bytes] = []
        self.speculating = False  # decoded by verify runs of its own (set when it joins)
        self.draft_tokens = 0  # drafts per run, when speculating
        self.history: np.ndarray | None = None  # prompt + answer tokens, for drafting
        self.drafted = 0
        self.accepted = 0
        # decayed counts (kept, not kept) behind drafts_for_speed: of a run's first draft, and
        # of a draft after a kept one (answers quote in stretches: the second is the higher);
        # the weak_ pair for drafts copied after a one-token match (WEAK_DRAFT_PRIOR)
        self.first, self.further = list(DRAFT_PRIOR), list(DRAFT_PRIOR)
        self.weak_first, self.weak_further = list(WEAK_DRAFT_PRIOR), list(WEAK_DRAFT_PRIOR)
        self.agreed, self.stopped = DRAFT_PRIOR  # one rate for all drafts, behind drafts_worth
        self.t_submit = time.perf_counter_ns()
        self.t_admit = 0
        self.t_first = 0
        self.completion: Completion | None = None
        self._result: Completion | None = None

    def _counts(self, weak: bool) -> tuple[list[float], list[float]]:
        """The (first, further) counts for drafts copied after a match of two tokens or more,
        or (`weak`) after a one-token match."""
        return (self.weak_first, self.weak_further) if weak else (self.first, self.further)

    def agreement(self, weak: bool = False) -> tuple[float, float]:
        """(p1, p): the chances that a run's first draft is kept, and that a draft after a
        kept one is (the row's own decayed counts, DRAFT_MEMORY), for drafts copied after a
        match of two tokens or more, or (`weak`) after a one-token match (WEAK_DRAFT_PRIOR)."""
        first, further = self._counts(weak)
        return first[0] / sum(first), further[0] / sum(further)

    def drafts_worth(self, worth: float) -> int:
        """Drafts whose chance of being kept, p^j with one rate p for all (kept drafts against
        runs stopped), is at least `worth` (DRAFT_WORTH); >= 1. Shared runs keep the one rate:
        their worth was set against it, and with the two rates (p1 p^(j-1)) rows drafted less
        and 8 decode-bound rows made 0.935x the tokens/s (benchmarks/draft_count.py --rows 8,
        Zen 5 EPYC)."""
        p = self.agreed / (self.agreed + self.stopped)
        n, kept = 0, 1.0
        while n < 64 and (kept := kept * p) >= worth:
            n += 1
        return max(1, n)

    def drafts_for_speed(self, fixed_s: float, token_s: float, most: int, weak: bool = False) -> int:
        """Of 1 to `most` drafts, the count whose lone run keeps most tokens a second: with
        the row's agreement (p1, p; `weak`: after a one-token match) it keeps 1 + p1 (1 + p +
        ... + p^(k-1)) tokens in a run of k + 1 tokens rounded up to whole pairs
        (VERIFY_ALIGN), which takes fixed_s + token_s x its tokens (Plan.draft_worth)."""
        p1, p = self.agreement(weak)
        best, best_rate, kept, expected = 1, 0.0, p1, 1.0
        for k in range(1, max(most, 1) + 1):
            expected += kept
            kept *= p
            n = k + 1 + (-(k + 1) % VERIFY_ALIGN)
            rate = expected / max(fixed_s + token_s * n, 1e-9)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def drafts_checked(self, offered: int, kept: int, weak: bool = False) -> None:
        """Count a run: `kept` of `offered` drafts agreed (a run stops at the first that does
        not); `weak`: drafts copied after a one-token match, counted in the weak_ pair."""
        m = DRAFT_MEMORY
        first, further = self._counts(weak)
        first[:] = [m * first[0] + (kept > 0), m * first[1] + (kept == 0)]
        if kept and offered > 1:  # drafts after a kept one were offered
            further[:] = [m * further[0] + kept - 1, m * further[1] + (kept < offered)]
        self.agreed = m * self.agreed + kept
        self.stopped = m * self.stopped + (kept < offered)

    def cancel(self) -> None:
        """Leave at the next step (the caller stopped reading)."""
        self.gone = True

    def should_stop(self) -> bool:
        if self.gone:
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return True
        if self._cancelled is not None:
            try:
                return bool(self._cancelled())
            except Exception:  # noqa: BLE001 - a broken callback means nobody listens
                return True
        return False

    def __iter__(self) -> Iterator[str | Completion]:
        while True:
            ev = self.events.get()
            if ev is _DONE:
                return
            if isinstance(ev, BaseException):
                raise ev
            yield ev

    def result(self) -> Completion:
        """Wait for the Completion (raises what failed the request); the deltas are dropped."""
        if self._result is None:
            for ev in self:
                if isinstance(ev, Completion):
                    self._result = ev
        return self._result


class Scheduler:
    """Continuous batching over one Generator (see the module docstring)."""

    ticket_class = Ticket  # what submit makes (benchmarks/draft_count.py compares another drafts rule)

    def __init__(self, generator: Generator, *, max_rows: int = DEFAULT_MAX_CONCURRENT_GENERATIONS,
                 max_queue: int = DEFAULT_MAX_QUEUED_GENERATIONS, kv_budget_tokens: int = DEFAULT_KV_BUDGET_TOKENS,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, block_tokens: int = DEFAULT_PREFIX_BLOCK_TOKENS,
                 prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
                 prefill_stall_ms: float = DEFAULT_PREFILL_STALL_MS,
                 draft_tokens: int = 0, run_tokens: int = VERIFY_RUN_TOKENS, adaptive_drafts: bool = True,
                 draft_worth: dict[str, float] | None = None) -> None:
        if prefill_chunk % block_tokens:
            raise InvalidInput(f"prefill_chunk ({prefill_chunk}) must be a multiple of block_tokens ({block_tokens})")
        self.generator = generator
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.kv_budget = kv_budget_tokens
        self.chunk = prefill_chunk
        self.stall_s = prefill_stall_ms / 1000.0
        self.prefill_rate = 0.0  # tokens/s of the last prefill chunk
        self._stall_chunk = float(max(block_tokens, prefill_chunk // 4))  # tokens that take ~stall_s
        self.efficient_chunk = prefill_chunk  # set by _calibrate
        self.chunk_cost: tuple[float, float] | None = None  # (a s, b s/token), measured
        self.cache = PrefixCache(int(prefix_cache_mb * 2**20), block_tokens) if prefix_cache_mb > 0 else None
        self.block = block_tokens
        g = generator
        # A prompt's last chunk has at least this many tokens (or is the whole prompt): a run of
        # one token takes other kernels (one-row GEMMs, GroupQueryAttention's one-token path),
        # and one of up to verify_max_tokens computes logits at every position (for verify runs),
        # so its last logits come from another GEMM shape than a long chunk's (last position
        # only): either would make a prompt's keys or first token depend on how it was chunked
        # or found in the prefix cache.
        self.last_chunk = max(2, g.verify_max_tokens + 1)
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._prefilling: list[Ticket] = []
        self._active: list[Ticket] = []
        self._batch = KVBatch(generator)  # the active rows' right-padded cache, updated in place
        # speculating rows: their caches, verified together in runs of their own (module docstring)
        self.max_draft = max(generator.verify_max_tokens - 1, 0)  # 0: the graph cannot verify drafts
        self.draft_tokens = min(draft_tokens, self.max_draft)  # for streams that do not ask
        self.run_tokens = run_tokens  # a verify run's tokens, about (VERIFY_RUN_TOKENS)
        self.adaptive_drafts = adaptive_drafts  # drafts per row follow its agreement rates (DRAFT_WORTH)
        # {"alone", "shared"[, "alone_run_s", "alone_token_s"]}: Plan.draft_worth
        self.draft_worth = {**DRAFT_WORTH, **(draft_worth or {})}
        if draft_tokens and not self.draft_tokens:
            log.warning("speculative decoding is off: the generation model's graph lacks short_run_logits "
                        "(run `make models` to add it)")
        self._speculating: list[Ticket] = []
        self._solo = KVBatch(generator, verify=True)
        self._cv = threading.Condition()
        self._stop = False
        self.steps = 0
        self.rows_stepped = 0
        self.prefill_runs = 0
        self.prefill_rides = 0  # prefill chunks that rode in verify runs (_ride_chunk)
        self._verify_s = 0.05  # how long a verify run took of late
        self._verify_rows_s: dict[int, float] = {}  # the same, by the run's rows
        self._ride_s: float | None = None  # what a riding chunk's token added to its run of late
        self.verify_runs = 0
        self.rows_verified = 0  # speculating rows summed over verify runs
        # where the loop's time goes (usage): seconds in runs of each kind, and prompt tokens
        # by how their keys came (a prefill run of their own, riding in a verify run, the cache)
        self.run_seconds = dict.fromkeys(RUN_KINDS, 0.0)
        self.prompt_tokens = dict.fromkeys(PROMPT_SOURCES, 0)
        self.drafted = 0  # tokens drafted and checked
        self.accepted = 0  # of them, the ones the model agreed with
        self._started = threading.Event()  # set once _calibrate is over (done or failed)
        self._calibration_asked = False  # by wait_started; else it runs when two answers first meet
        self._thread = threading.Thread(target=self._loop, name="rag-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers
    def wait_started(self, timeout: float | None = None) -> bool:
        """Calibrate now (_calibrate: seconds, as it loads and times graphs) and wait until
        that is over; False if `timeout` ran out. A server calls this before it listens;
        otherwise the loop calibrates when two answers first run at once (which then wait for
        it), and a lone answer, such as a one-shot `rag ask`, never does."""
        with self._cv:
            self._calibration_asked = True
            self._cv.notify()
        return self._started.wait(timeout)

    def submit(self, prompt: list[int], params: SamplingParams, *, cancelled: Callable[[], bool] | None = None,
               deadline: float | None = None, streamed: bool = True) -> Ticket:
        """Queue one prompt; raises InvalidInput if it cannot fit, Overloaded if the queue is full.
        `streamed` False: a batch request, whose rows a newcomer's prefill may stall."""
        self.generator._check_prompts([prompt], params)
        if len(prompt) + params.max_new_tokens > self.kv_budget:
            raise InvalidInput(f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) "
                               f"exceeds the scheduler's KV budget of {self.kv_budget} tokens")
        t = self.ticket_class(self, list(prompt), params, cancelled, deadline, streamed)
        with self._cv:
            if self._stop:
                raise Unavailable("the generation scheduler is shut down")
            if self.running + len(self._waiting) >= self.max_rows + self.max_queue:
                raise Overloaded(f"{self.running} answers are being generated and "
                                 f"{len(self._waiting)} are queued (limits {self.max_rows} and {self.max_queue}); "
                                 "retry later")
            self._waiting.append(t)
            self._cv.notify()
        return t

    def describe(self) -> str:
        """e.g. "prefill chunks beside streams: up to 48 tokens (27.6 ms + 2.31 ms/token here);
        decode steps padded to a multiple of 2 rows" ("measuring" until the loop has)."""
        if self.chunk_cost is None:
            return ("prefill chunk cost not measured (failed, see the log)" if self._started.is_set()
                    else "measuring the prefill chunk cost" if self._calibration_asked
                    else "prefill chunk cost not measured yet (when two answers first run at once)")
        a, b = self.chunk_cost
        g = self.generator
        spec = (f"greedy answers draft up to {self.draft_tokens} tokens a run from their prompt"
                f"{' (as many as their own agreement rates make worth it)' if self.adaptive_drafts else ''}, "
                f"verified on {g.verify_variant}, {g.row_slots} rows a run" if self.draft_tokens
                else "no speculative decoding")
        if self.draft_tokens:
            spec += f" of about {self.run_tokens} tokens (fewer drafts a row as rows join)"
        if self.draft_tokens and self._solo.can_ride_prefill:
            spec += ", newcomers' prompt chunks riding along"
        return (f"prefill chunks beside streams: up to {self.efficient_chunk} tokens ({a * 1000:.1f} ms + "
                f"{b * 1000:.2f} ms/token here); {self.generator.describe_padding()}; {spec}")

    def usage(self) -> dict:
        """Where the loop's time went since it started: seconds and runs of each kind
        (prefill: a newcomer's chunk in a run of its own; step: a one-token step of the batched
        rows; verify: a run of the speculating rows, riding chunks included), and prompt tokens
        by how their keys came (prefilled in runs of their own, riding in verify runs, found in
        the prefix cache). Calibration runs are not counted. Read from any thread: a snapshot
        at most one run behind. serve_answers.py prints it per measurement; the server exports
        it as Prometheus counters."""
        return {"seconds": dict(self.run_seconds),
                "runs": {"prefill": self.prefill_runs, "step": self.steps, "verify": self.verify_runs},
                "prompt_tokens": dict(self.prompt_tokens)}

    @property
    def running(self) -> int:
        return len(self._active) + len(self._speculating) + len(self._prefilling)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ loop
    def _calibrate(self) -> None:
        """Time two prefill sizes on random tokens (the best of two runs each) and fit
        t(n) = a + b n; chunks that stall streams stop at n = a e / (b (1 - e)) tokens, which
        run at PREFILL_EFFICIENCY e of the long-chunk rate 1/b (for one newcomer; more with
        a backlog, _efficient_chunk)."""
        small, large = self.block, max(4 * self.block, min(self.chunk, 8 * self.block))
        rng = np.random.default_rng(0)
        tokens = [int(x) for x in rng.integers(1000, 20000, small + large)]
        times = {}
        for n in (small, large):
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                self.generator.prefill(tokens[:n])
                best = min(best, time.perf_counter() - t0)
            times[n] = best
        b = max((times[large] - times[small]) / (large - small), 1e-6)
        a = max(times[small] - b * small, 0.0)
        _ = self.generator.row_padding  # measured once, here rather than in the first request's step
        _ = self.generator.row_slots  # loads the row-slots graph, here rather than in a shared verify run
        self.efficient_chunk = self._efficient_chunk(1, (a, b))
        self.chunk_cost = (a, b)  # last: describe() reads a finished calibration
        log.info("prefill chunk cost %.1f ms + %.2f ms/token: chunks beside decoding streams up to %d tokens",
                 a * 1000, b * 1000, self.efficient_chunk)

    def _efficient_chunk(self, waiting: int, cost: tuple[float, float] | None = None) -> int:
        """The tokens of a prefill chunk beside decoding streams, with `waiting` requests
        waiting for their prefill: the size at which a chunk's pass over the weights (the
        calibrated `a`) is a share (1 - PREFILL_EFFICIENCY) / waiting of its time, since that
        pass delays every one of them (a * e / (b * (1 - e)) tokens at efficiency e: 4 a / b
        for one newcomer, 9 a / b for two), in whole blocks, at most `prefill_chunk`.
        In process, 8 RAG clients (32 new tokens) whose chunks cannot ride (verified on int4,
        AVX-512 VNNI EPYC), two interleaved rounds of 30 s (ad-hoc): 513-537 uncached prompt
        tok/s against 465-477 with one newcomer's size, TTFT p50 1.9-2.3 s against 4.3, at
        inter-token p50 291 ms against 151 (p99 538-544 against 206-221): streams wait
        longer while a backlog of prompts gets in sooner."""
        a, b = cost or self.chunk_cost
        e = 1 - (1 - PREFILL_EFFICIENCY) / max(waiting, 1)
        n = a * e / (b * (1 - e))
        return int(min(self.chunk, max(self.block, -(-n // self.block) * self.block)))

    def _calibrate_once(self) -> None:
        try:
            self._calibrate()
        except Exception:  # noqa: BLE001 - serve with the stall steering alone
            log.exception("prefill calibration failed")
        finally:
            self._started.set()

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            self._started.set()  # nobody waits for a calibration that will not come

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._prefilling or self._active or self._speculating or self._stop
                           or (self._calibration_asked and not self._started.is_set())):
                    self._cv.wait()
                if self._stop:
                    pending = [*self._waiting, *self._prefilling, *self._active, *self._speculating]
                    self._waiting.clear()
                    self._prefilling.clear()
                    self._active.clear()
                    self._speculating.clear()
                    break
                # a lone answer needs no calibration (no stall to size, nothing to ride along)
                calibrate = not self._started.is_set() and (self._calibration_asked
                                                            or self.running + len(self._waiting) > 1)
            if calibrate:
                self._calibrate_once()
            with self._cv:
                self._admit()
            self._retire_stopped()
            ride = self._ride_chunk(self._prefilling[0]) if self._prefilling else None
            if self._prefilling and ride is None:
                t = self._prefilling[0]
                try:
                    self._prefill_chunk(t)
                except Exception as e:  # noqa: BLE001 - fail this request, keep serving
                    log.exception("prefill failed")
                    self._drop_prefilling(t, e)
            if self._active:
                try:
                    self._decode_step()
                except Exception as e:  # noqa: BLE001 - fail the rows of this step, keep serving
                    log.exception("decode step failed")
                    rows, self._active = self._active, []
                    self._reset_batch()
                    for t in rows:
                        self._fail(t, e)
            if self._speculating:
                self._verify_runs(ride)
        for t in pending:
            self._fail(t, Unavailable("the generation scheduler was shut down"))

    def _need(self, t: Ticket) -> int:
        return len(t.prompt) + t.params.max_new_tokens

    def _admit(self) -> None:
        """Waiting -> prefilling while the row limit and the KV budget allow (caller holds _cv)."""
        while self._waiting:
            t = self._waiting[0]
            if t.should_stop():
                self._waiting.popleft()
                self._finish(t, FINISH_CANCELLED)
                continue
            rows = [*self._active, *self._speculating, *self._prefilling]
            if len(rows) >= self.max_rows:
                return
            widest = max([self._need(t), *(self._need(r) for r in rows)])
            if (len(rows) + 1) * widest > self.kv_budget and rows:
                return
            self._waiting.popleft()
            t.t_admit = time.perf_counter_ns()
            self._start_prefill(t)
            self._prefilling.append(t)

    def _retire_stopped(self) -> None:
        for t in [t for t in self._prefilling if t.should_stop()]:
            self._prefilling.remove(t)
            self._finish(t, FINISH_CANCELLED)
        gone = [i for i, t in enumerate(self._active) if t.should_stop()]
        if gone:
            for i in gone:
                self._finish(self._active[i], FINISH_CANCELLED)
            self._keep([i for i in range(len(self._active)) if i not in set(gone)])
        gone = [i for i, t in enumerate(self._speculating) if t.should_stop()]
        if gone:
            for i in gone:
                self._finish(self._speculating[i], FINISH_CANCELLED)
            self._keep_solo([i for i in range(len(self._speculating)) if i not in set(gone)])

    # ------------------------------------------------------------------ prefill
    def _start_prefill(self, t: Ticket) -> None:
        t.kv = None  # generator.prefill starts an empty cache
        if self.cache is None:
            return
        t.block_keys = self.cache.keys(t.prompt)
        found = self.cache.lookup(t.block_keys)
        # the last prompt token must run (its logits pick the first answer token), in a run of
        # last_chunk tokens or more, as in a cold prefill (_prefill_chunk)
        while found and len(found) * self.block > len(t.prompt) - self.last_chunk:
            found.pop()
        if found:
            t.kv = [np.concatenate([b[i] for b in found], axis=2) for i in range(len(found[0]))]
            t.done_tokens = t.cached_tokens = len(found) * self.block
            self.prompt_tokens["cached"] += t.cached_tokens

    def _ride_chunk(self, t: Ticket) -> tuple[Ticket, int, int] | None:
        """The next chunk of `t`'s prompt, (t, start, end), if it can ride in this step's
        verify run instead of a prefill run of its own (module docstring, 3); else None.

        A chunk's own run reads every weight once, which is most of a small chunk's cost;
        riding, it costs only its tokens' share. So it rides whenever rows speculate, the
        row-slots graph is on the prefill weights and has a slot free, and the chunk is not
        the prompt's last (whose logits pick the first token: that one runs on its own, at
        least last_chunk tokens, so a prompt's keys and first token are the bits of an
        unchunked prefill). While streams wait on the run, a chunk takes about as long as the run
        itself times the requests waiting for their prefill (this one included), and the run
        with it no longer than `prefill_stall_ms`, as a chunk of its own would (one block at
        least: where a run alone takes the stall, prompts get in a block a run). The run's own
        time is what runs of as many rows took without a chunk of late (_verify_rows_s), and a
        riding token's what one added to its run (_ride_s, within half and twice the
        calibrated prefill cost, which alone is too low: in process, 8 decode-bound streams at
        a 200 ms setting on the AVX-512 EPYC, riding runs p90 281 ms with it, 205-207 ms
        sized by their own cost; the last run's time whatever its rows had let a ride beside
        six rows take what one row's run left). A backlog of newcomers (RAG traffic, which is
        mostly prompt) gets bigger chunks, steady decoding (one newcomer now and then) small
        ones. In process, 8 clients (AMX Xeon, ad-hoc,
        interleaved): 32 RAG-sized prompts (406 tokens, 32 new) 693-709 prompt tok/s and TTFT
        p50 1.1 s against 625-653 and 2.3-2.6 s with one run's worth, 32 decode-bound ones
        (128 new) 208-210 against 203-205 tok/s, inter-token p99 175-180 ms against 159-161.
        Beside batch requests only, `prefill_chunk`."""
        g = self.generator
        if (not self._speculating or self.chunk_cost is None or len(self._speculating) >= g.row_slots
                or not self._solo.can_ride_prefill):
            return None
        size = self.chunk
        if any(r.streamed for r in [*self._active, *self._speculating]):
            queued = len(self._prefilling) + len(self._waiting)
            run = self._verify_rows_s.get(len(self._speculating), self._verify_s)  # this run without the chunk
            extra = min(queued * run, self.stall_s - run)  # a run within prefill_stall_ms
            tokens = int(extra / (self._ride_s or self.chunk_cost[1]))
            size = min(size, max(self.block, tokens // self.block * self.block))
        a = t.done_tokens
        b = min(a + size, (len(t.prompt) - self.last_chunk) // self.block * self.block)
        return (t, a, b) if b > a else None

    def _chunk_done(self, t: Ticket, a: int, b: int, kv: list[np.ndarray]) -> None:
        """`t`'s prompt is prefilled up to b (from a), its cache `kv`: its full blocks go to
        the prefix cache."""
        t.kv, t.done_tokens = kv, b
        if self.cache is not None:
            for j in range(a // self.block, b // self.block):
                self.cache.put(t.block_keys[j], [np.ascontiguousarray(v[:, :, j * self.block:(j + 1) * self.block])
                                                 for v in kv])

    def _prefill_chunk(self, t: Ticket) -> None:
        """One chunk of `t`'s prompt; on the last, its first token and a place in the batch."""
        a = t.done_tokens
        # streams, batched or speculating, wait for their next token meanwhile
        stalling = any(r.streamed for r in [*self._active, *self._speculating])
        size = self.chunk
        if stalling:
            efficient = self.efficient_chunk if self.chunk_cost is None else \
                self._efficient_chunk(len(self._prefilling) + len(self._waiting))
            size = min(self.chunk, efficient, max(self.block, int(self._stall_chunk) // self.block * self.block))
        rest = len(t.prompt) - a
        if rest - size < self.last_chunk:
            b = len(t.prompt)  # never a short last chunk (last_chunk)
        else:
            # as many chunks as `size` needs, of even size in whole blocks: a short tail runs as
            # slowly a token as any small chunk (each run reads every weight once). In process,
            # 8 RAG clients (~400-token prompts: 256-token chunks and ~100-token tails before;
            # Zen 5 EPYC, ad-hoc, two pairs): prefill runs 1,451 / 1,428 tok/s against 1,280 /
            # 1,382, prompt tok/s 1,237 / 1,220 against 1,114 / 1,180, inter-token p99 202 /
            # 197 ms against 238 / 239; 8 decode-bound ones level (253 / 277 generated tok/s
            # against 274 / 257)
            even = -(-rest // -(-rest // size))  # rest over the chunks it needs, rounded up
            size = min(size, -(-even // self.block) * self.block)
            b = a + size
        t0 = time.perf_counter()
        try:
            logits, kv = self.generator.prefill(t.prompt[a:b], t.kv)
        finally:
            took = max(time.perf_counter() - t0, 1e-6)
            self.run_seconds["prefill"] += took
        self.prefill_runs += 1
        self.prompt_tokens["prefilled"] += b - a
        self.prefill_rate = (b - a) / took
        if stalling and b - a == size:
            # A chunk's time is not proportional to its size (each run reads every weight once,
            # which is most of a small chunk's cost), so steer by what the last one took.
            self._stall_chunk = 0.5 * self._stall_chunk + 0.5 * size * self.stall_s / took
        self._chunk_done(t, a, b, kv)
        if b < len(t.prompt):
            return
        self._prefilling.remove(t)
        t.row.push(t.row.pick(logits))
        t.t_first = time.perf_counter_ns()
        self._emit(t)
        if t.row.finish is not None:
            self._finish(t, t.row.finish)
            return
        self._join(t)

    # ------------------------------------------------------------------ batch
    def _reset_batch(self) -> None:
        self._batch.clear()

    def _join(self, t: Ticket) -> None:
        """Copy the newcomer's cache into the batch (or, for a speculating row, the solo
        rows' buffers), with room for its new tokens."""
        kv, t.kv = t.kv, None
        asked = t.params.speculative_tokens
        t.draft_tokens = min(asked, self.max_draft) if asked is not None else self.draft_tokens
        if t.draft_tokens and t.params.temperature <= 0:
            t.speculating = True
            t.history = np.empty(len(t.prompt) + t.params.max_new_tokens + 1, np.int64)
            t.history[:len(t.prompt)] = t.prompt
            t.history[len(t.prompt)] = t.row.ids[-1]
            self._solo.add(kv, min(self._need(t), self.generator.window))
            self._speculating.append(t)
            return
        self._batch.add(kv, min(self._need(t), self.generator.window))
        self._active.append(t)

    def _keep_solo(self, keep: list[int]) -> None:
        """Cut the speculating rows not in `keep` out of the solo buffers."""
        self._speculating = [self._speculating[i] for i in keep]
        self._solo.keep(keep)

    def _keep(self, keep: list[int]) -> None:
        """Cut the rows not in `keep` out of the batch."""
        self._active = [self._active[i] for i in keep]
        self._batch.keep(keep)

    def _decode_step(self) -> None:
        rows = self._active
        t0 = time.perf_counter()
        try:
            logits = self._batch.step(np.array([[t.row.ids[-1]] for t in rows], np.int64))
        finally:
            self.run_seconds["step"] += time.perf_counter() - t0
        lengths = self._batch.lengths
        self.steps += 1
        self.rows_stepped += len(rows)
        keep = []
        for i, t in enumerate(rows):
            t.row.push(t.row.pick(logits[i]))
            if t.row.finish is None and lengths[i] + 1 > self.generator.window:
                t.row.finish = FINISH_LENGTH
            self._emit(t)
            if t.row.finish is not None:
                self._finish(t, t.row.finish)
            else:
                keep.append(i)
        if len(keep) < len(rows):
            self._keep(keep)

    def _verify_runs(self, ride: tuple[Ticket, int, int] | None = None) -> None:
        """One verify run over the speculating rows (generator.row_slots rows a run; more rows,
        more runs), the first carrying the prefill chunk `ride` (_ride_chunk), if any. Row b
        runs its last token and up to draft_tokens drafted ones (never past max_new_tokens,
        fewer as the run fills: run_tokens; KVBatch.verify_rows adds fillers to whole pairs,
        whose keys are never kept); it keeps the tokens the model picks while they match its drafts, and the
        model's own pick at the first mismatch. A failed run fails its rows only."""
        gone: set[int] = set()
        slots = self.generator.row_slots if len(self._speculating) > 1 else 1  # a lone row: the plain graph
        for first in range(0, len(self._speculating), slots):
            rows = list(range(first, min(first + slots, len(self._speculating))))
            t0 = time.perf_counter()
            try:
                self._verify_run(rows, gone, ride)
                took = time.perf_counter() - t0
                self.run_seconds["verify"] += took
            except Exception as e:  # noqa: BLE001 - fail this run's rows (and its chunk's request), keep serving
                self.run_seconds["verify"] += time.perf_counter() - t0
                log.exception("verify run failed")
                for b in rows:
                    if b not in gone:
                        gone.add(b)
                        self._fail(self._speculating[b], e)
                if ride is not None:
                    self._drop_prefilling(ride[0], e)
            else:
                n = len(rows)
                if ride is None:  # how long streams wait on a run: riding chunks take about as long
                    self._verify_s = 0.5 * self._verify_s + 0.5 * took
                    self._verify_rows_s[n] = 0.5 * self._verify_rows_s.get(n, took) + 0.5 * took
                elif self.chunk_cost is not None:  # what a riding token costs here, steering the next rides
                    calibrated = self.chunk_cost[1]
                    cost = (took - self._verify_rows_s.get(n, self._verify_s)) / (ride[2] - ride[1])
                    # one noisy run neither doubles the next chunk nor starves it
                    cost = min(max(cost, calibrated / 2), 2 * calibrated)
                    self._ride_s = cost if self._ride_s is None else 0.5 * self._ride_s + 0.5 * cost
            ride = None
        if gone:
            self._keep_solo([i for i in range(len(self._speculating)) if i not in gone])

    def _verify_run(self, rows: list[int], gone: set[int], ride: tuple[Ticket, int, int] | None) -> None:
        """One run of the speculating rows `rows` (and the chunk `ride`); those that finish
        join `gone`."""
        drafts = []
        cap = max(1, self.run_tokens // len(rows) - 1)  # drafts per row: fewer as the run fills
        alone = len(rows) == 1 and ride is None
        worth = self.draft_worth["alone" if alone else "shared"]
        run = self.draft_worth.get("alone_run_s"), self.draft_worth.get("alone_token_s")
        weak = []  # per row: its drafts copied after a one-token match (WEAK_DRAFT_PRIOR)
        for b in rows:
            t = self._speculating[b]
            n_hist = len(t.prompt) + len(t.row.ids)
            matched, start = draft_match(t.history[:n_hist])
            weak.append(matched == 1)
            left = t.params.max_new_tokens - len(t.row.ids)  # >= 1: a row at its limit has finished
            most = min(t.draft_tokens, cap)
            if not self.adaptive_drafts:
                want = most
            elif alone and None not in run:  # a lone run's time is known: the fastest count
                want = t.drafts_for_speed(*run, most, weak=weak[-1])
            else:
                want = t.drafts_worth(worth)
            k = min(most, left - 1, want) if matched else 0
            drafts.append([int(x) for x in t.history[start:min(start + k, n_hist)]])
        tokens = [[self._speculating[b].row.ids[-1], *d] for b, d in zip(rows, drafts)]
        if ride is None:
            logits = self._solo.verify_rows(rows, tokens)
        else:
            t, a, b = ride
            *logits, kv = self._solo.verify_rows(rows, tokens, prefill=(t.kv, t.prompt[a:b]))
            self._chunk_done(t, a, b, kv)
            self.prefill_rides += 1
            self.prompt_tokens["riding"] += b - a
        self.verify_runs += 1
        self.rows_verified += len(rows)
        for i, b in enumerate(rows):
            t, row, d = self._speculating[b], self._speculating[b].row, drafts[i]
            n_hist = len(t.prompt) + len(row.ids)
            kept = 0
            for j in range(len(d) + 1):
                token = row.pick(logits[i][j])
                row.push(token)
                if row.finish is not None:
                    break
                t.history[n_hist] = token
                n_hist += 1
                if j == len(d) or token != d[j]:
                    break
                kept += 1
            self._solo.accept(b, kept + 1)  # the last token's keys and the agreed drafts'
            if d:
                t.drafts_checked(len(d), kept, weak=weak[i])
            t.drafted += len(d)
            t.accepted += kept
            self.drafted += len(d)
            self.accepted += kept
            if row.finish is None and self._solo.lengths[b] + 1 > self.generator.window:
                row.finish = FINISH_LENGTH
            self._emit(t)
            if row.finish is not None:
                self._finish(t, row.finish)
                gone.add(b)

    # ------------------------------------------------------------------ events
    def _emit(self, t: Ticket) -> None:
        d = t.row.delta()
        if d:
            t.events.put(d)

    def _finish(self, t: Ticket, reason: str) -> None:
        row = t.row
        row.finish = row.finish or reason
        d = row.delta()
        if d:
            t.events.put(d)
        now = time.perf_counter_ns()
        first = t.t_first or now
        admit = t.t_admit or now
        t.completion = Completion(text=row.text, finish_reason=row.finish, prompt_tokens=len(t.prompt),
                                  completion_tokens=len(row.ids) + (row.finish == FINISH_EOS),
                                  token_ids=list(row.ids), prefill_ns=first - admit, decode_ns=now - first,
                                  first_token_ns=first - t.t_submit, queue_ns=admit - t.t_submit,
                                  cached_tokens=t.cached_tokens, accepted_prediction_tokens=t.accepted,
                                  rejected_prediction_tokens=t.drafted - t.accepted)
        t.events.put(t.completion)
        t.events.put(_DONE)

    def _drop_prefilling(self, t: Ticket, e: BaseException) -> None:
        """Fail a newcomer whose prefill failed, or its joining the batch after its last chunk
        (it has left _prefilling then: a second remove would raise and stop the loop)."""
        if t in self._prefilling:
            self._prefilling.remove(t)
        self._fail(t, e)

    @staticmethod
    def _fail(t: Ticket, e: BaseException) -> None:
        t.events.put(e)
        t.events.put(_DONE)
