"""The generation scheduler (engine/scheduler.py) over the real default decoder: continuous
batching gives every request the tokens it gets alone, whatever joins or leaves the batch;
the prefix cache skips prefill without changing a token; limits and faults are clean."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine.errors import InvalidInput, Overloaded
from engine.generate import FINISH_CANCELLED, Completion, SamplingParams
from engine.scheduler import Scheduler

TEXTS = [
    "Green tea is best brewed with water between 70 and 80 degrees Celsius.",
    "Mercury is the smallest planet and the closest to the Sun; a year there lasts 88 Earth days. "
    "Venus has a thick carbon dioxide atmosphere that traps heat.",
    "A sourdough starter is a culture of wild yeast and lactic acid bacteria kept alive with regular "
    "feedings of flour and water. Feed it equal weights of flour and water once a day when it lives at "
    "room temperature, or once a week when it lives in the fridge.",
    "The Fresnel lens bends light with rings of prisms.",
    "Hierarchical Navigable Small World graphs answer nearest-neighbour queries without comparing the "
    "query to every stored vector.",
]


@pytest.fixture()
def prompts(generator):
    return [generator.encode(generator.render_chat([{"role": "user", "content": f"Summarise: {t}"}]))
            for t in TEXTS]


@pytest.fixture()
def make(generator):
    made = []

    def factory(**kw):
        kw.setdefault("prefill_chunk", 64)
        kw.setdefault("block_tokens", 16)
        s = Scheduler(generator, **kw)
        made.append(s)
        return s

    yield factory
    for s in made:
        s.close()


def result_within(ticket, seconds: float = 120.0) -> Completion:
    """The ticket's Completion (or what failed it), failing the test if the loop has not
    answered in `seconds`: a stopped loop would leave the caller waiting for ever."""
    done, box = threading.Event(), {}

    def wait():
        try:
            box["result"] = ticket.result()
        except BaseException as e:  # noqa: BLE001 - handed to the test below
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=wait, daemon=True).start()
    assert done.wait(seconds), "the scheduler loop stopped answering"
    if "error" in box:
        raise box["error"]
    return box["result"]


def first_token_within(ticket, seconds: float = 300.0) -> None:
    """Wait until `ticket` has streamed its first token (or finished): staggered arrivals by
    progress, not by the clock, so that a fast CPU does not finish one request before the
    next arrives."""
    deadline = time.monotonic() + seconds
    while not ticket.t_first and ticket.completion is None:
        assert time.monotonic() < deadline, "no first token"
        time.sleep(0.002)


def alone(scheduler, prompts, params):
    return [scheduler.submit(p, params).result() for p in prompts]


def test_alone_equals_the_generator(generator, prompts, make):
    params = SamplingParams(max_new_tokens=12)
    s = make(prefix_cache_mb=0)
    for p in prompts[:2]:
        want = next(ev for ev in generator.stream_ids(p, params) if isinstance(ev, Completion))
        got = s.submit(p, params).result()
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.finish_reason == want.finish_reason and got.cached_tokens == 0


def test_busy_batch_gives_every_request_its_alone_tokens(prompts, make):
    """Staggered arrivals, different prompt and answer lengths, a cancellation and a
    deadline mid-batch: every finished request has exactly the tokens it had alone."""
    lengths = [14, 6, 20, 10, 16]
    ref_sched = make(prefix_cache_mb=0, max_rows=1)
    ref = [ref_sched.submit(p, SamplingParams(max_new_tokens=n)).result() for p, n in zip(prompts, lengths)]
    s = make(prefix_cache_mb=0, max_rows=4)
    results: dict[int, Completion] = {}
    deltas: dict[int, str] = {}

    def consume(i, ticket, cancel_after=None):
        text = ""
        for ev in ticket:
            if isinstance(ev, Completion):
                results[i] = ev
            else:
                text += ev
                if cancel_after is not None and len(text) >= cancel_after:
                    ticket.cancel()
        deltas[i] = text

    threads = []

    def start(i, **kw):
        ticket = s.submit(prompts[i], SamplingParams(max_new_tokens=lengths[i]))
        t = threading.Thread(target=consume, args=(i, ticket), kwargs=kw)
        t.start()
        threads.append(t)
        return ticket

    first_token_within(start(0))  # 0 is decoding when the others arrive
    start(1)
    start(2)
    cancelled = s.submit(prompts[3], SamplingParams(max_new_tokens=200))
    threads.append(threading.Thread(target=consume, args=(3, cancelled), kwargs={"cancel_after": 1}))
    threads[-1].start()
    start(4)  # waits for a row (max_rows 4), joins when one leaves
    expired = s.submit(prompts[1], SamplingParams(max_new_tokens=50), deadline=time.monotonic() - 1)
    for t in threads:
        t.join(timeout=300)
    for i in (0, 1, 2, 4):
        assert results[i].token_ids == ref[i].token_ids, f"request {i} changed in the busy batch"
        assert deltas[i] == results[i].text == ref[i].text
    assert results[3].finish_reason == FINISH_CANCELLED and len(results[3].token_ids) < 200
    assert expired.result().finish_reason == FINISH_CANCELLED and not expired.result().token_ids
    assert s.steps < sum(lengths), "rows shared decode steps"
    deadline = time.monotonic() + 30
    while s.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (s.running, s.waiting) == (0, 0)
    assert s._batch.bufs == [] and len(s._batch) == 0, "the batch's KV cache is freed when it empties"


def test_speculating_rows_get_their_alone_tokens_beside_batched_rows(generator, make):
    """Speculative decoding (draft_tokens 3): greedy requests, streams and batch requests,
    copy drafts from their prompt and check them in shared verify runs, requests that turn
    drafts off share one-token steps beside them; with staggered arrivals, different lengths
    and a cancellation, every finished request has exactly the tokens it had alone, and
    drafts were really accepted."""
    prompts = [generator.encode(generator.render_chat([{"role": "user", "content": f"Repeat exactly: {t}"}]))
               for t in TEXTS]
    lengths = [64, 8, 30, 12, 20]  # the first runs on past its answer: every other one joins it
    streamed = [True, False, True, False, True]
    drafts = [None, 1, 7, 0, 0]  # the scheduler's (3), a request's own (rows of different lengths), off
    params = [SamplingParams(max_new_tokens=n, speculative_tokens=d, ignore_eos=i == 0)
              for i, (n, d) in enumerate(zip(lengths, drafts))]
    ref_sched = make(prefix_cache_mb=0, max_rows=1, draft_tokens=3)
    ref = [ref_sched.submit(p, sp, streamed=st).result() for p, sp, st in zip(prompts, params, streamed)]
    spec_tokens = sum(len(r.token_ids) for r, d in zip(ref, drafts) if d != 0)
    assert ref_sched.accepted > 0 and ref_sched.verify_runs < spec_tokens, "drafts from the prompt were accepted"
    for r, d in zip(ref, drafts):
        assert r.accepted_prediction_tokens <= len(r.token_ids)
        assert (r.accepted_prediction_tokens + r.rejected_prediction_tokens > 0) == (d != 0)
    # one token left after the first: nothing may be drafted, the run carries a filler token
    two = ref_sched.submit(prompts[0], SamplingParams(max_new_tokens=2)).result()
    assert len(two.token_ids) == 2 and two.token_ids[0] == ref[0].token_ids[0]
    assert two.accepted_prediction_tokens == two.rejected_prediction_tokens == 0
    # runs of 2+ rows carry 1 to 3 drafts a row: a row's drafts depend on the load, its tokens not
    s = make(prefix_cache_mb=0, max_rows=4, draft_tokens=3, run_tokens=8)
    results: dict[int, Completion] = {}

    def consume(i, ticket, cancel_after=None):
        for n, ev in enumerate(ticket):
            if isinstance(ev, Completion):
                results[i] = ev
            elif cancel_after is not None and n >= cancel_after:
                ticket.cancel()

    threads = []
    for i in range(5):
        ticket = s.submit(prompts[i], params[i], streamed=streamed[i])
        threads.append(threading.Thread(target=consume, args=(i, ticket)))
        threads[-1].start()
        if i == 1:
            cancelled = s.submit(prompts[3], SamplingParams(max_new_tokens=200))
            threads.append(threading.Thread(target=consume, args=(5, cancelled), kwargs={"cancel_after": 1}))
            threads[-1].start()
        first_token_within(ticket)
    for t in threads:
        t.join(timeout=300)
    for i in range(5):
        assert results[i].token_ids == ref[i].token_ids, f"request {i} changed beside the others"
        assert results[i].text == ref[i].text
    assert results[5].finish_reason == FINISH_CANCELLED and len(results[5].token_ids) < 200
    assert s.rows_verified > s.verify_runs, "speculating rows shared verify runs"
    assert s.prefill_rides > 0, "newcomers' prompt chunks rode in verify runs"
    deadline = time.monotonic() + 30
    while s.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (s.running, s.waiting) == (0, 0)
    assert s._solo.bufs == [] and s._batch.bufs == [], "both caches are freed when their rows leave"


def test_the_machines_plan_keeps_every_speculating_rows_alone_tokens(config):
    """The same on the weights this machine's plan chose (engine/plan.py: e.g. w8a8 prefill,
    int4 one-token steps and int4 verify runs on the AVX-512 VNNI EPYC), whose kernels round
    per CPU: lone rows' runs on the plain graph, shared runs through the row-slots graph,
    prompts chunked beside them (riding or not, as the plan allows), every finished request
    has exactly its alone tokens."""
    from engine.generate import Generator
    from engine.plan import for_config

    plan = for_config(config)
    gen = Generator(config.gen_model_dir, variant=plan.decode, prefill_variant=plan.prefill,
                    verify_variant=plan.verify, threads=2, context_window=config.context_window)
    prompts = [gen.encode(gen.render_chat([{"role": "user", "content": f"Repeat exactly: {t}"}])) for t in TEXTS]
    lengths = [64, 8, 30, 12, 20]  # the first runs on past its answer: every other one joins it
    params = [SamplingParams(max_new_tokens=n, speculative_tokens=d, ignore_eos=i == 0)
              for i, (n, d) in enumerate(zip(lengths, (None, 1, 7, 3, 0)))]
    made = []

    def make(**kw):
        made.append(Scheduler(gen, prefill_chunk=64, block_tokens=16, prefix_cache_mb=0, draft_tokens=3,
                              draft_worth=plan.draft_worth(), **kw))
        return made[-1]

    try:
        ref_sched = make(max_rows=1)
        ref = [ref_sched.submit(p, sp).result() for p, sp in zip(prompts, params)]
        assert ref_sched.accepted > 0, "drafts from the prompt were accepted"
        s = make(max_rows=4, run_tokens=8)
        tickets = []
        for p, sp in zip(prompts, params):
            tickets.append(s.submit(p, sp))
            first_token_within(tickets[-1])
        for i, t in enumerate(tickets):
            assert result_within(t).token_ids == ref[i].token_ids, f"request {i} changed beside the others"
        assert s.rows_verified > s.verify_runs, "speculating rows shared verify runs"
    finally:
        for sched in made:
            sched.close()


def test_a_lone_answer_skips_the_calibration_two_at_once_run_it(prompts, make):
    """Calibration (timing prefill sizes, loading the row-slots graph) only serves stalls
    and rides beside other answers: a one-shot `rag ask` should not wait for it."""
    s = make(prefix_cache_mb=0)
    params = SamplingParams(max_new_tokens=4)
    alone = s.submit(prompts[0], params).result()
    assert s.chunk_cost is None and "not measured yet" in s.describe()
    a, b = s.submit(prompts[0], params), s.submit(prompts[1], params)
    assert a.result().token_ids == alone.token_ids and b.result().finish_reason
    assert s.chunk_cost is not None and "ms/token here" in s.describe()
    asked = make(prefix_cache_mb=0)
    assert asked.wait_started(timeout=300) and asked.chunk_cost is not None, "a server asks for it up front"


def test_a_lone_speculating_answer_loads_no_row_slots_graph(config, prompts):
    """A lone row verifies on the plain graph: a one-shot `rag ask` should not load the
    row-slots copy of the weights (~2 s and ~1 GB for the default model)."""
    from engine.generate import Generator

    gen = Generator(config.gen_model_dir, variant="int8", threads=2, context_window=config.context_window)
    s = Scheduler(gen, prefix_cache_mb=0, prefill_chunk=64, block_tokens=16, draft_tokens=3)
    try:
        done = s.submit(prompts[2], SamplingParams(max_new_tokens=24)).result()
        assert done.accepted_prediction_tokens + done.rejected_prediction_tokens > 0, "it speculated"
        assert "rows_session" not in gen.__dict__
    finally:
        s.close()


def test_a_leaving_row_gives_its_columns_back(prompts, make):
    s = make(prefix_cache_mb=0, max_rows=2)
    long, short = prompts[2], prompts[0]
    wide = s.submit(long, SamplingParams(max_new_tokens=400))  # reserves room for 400 new keys
    narrow = s.submit(short, SamplingParams(max_new_tokens=30))
    columns = []
    for i, ev in enumerate(narrow):
        columns.append(s._batch.columns)
        if i == 2:
            wide.cancel()
    assert wide.result().finish_reason == FINISH_CANCELLED
    assert max(columns) >= len(long) + 400, "a row's reservation covers its prompt and new tokens"
    assert columns[-2] < len(short) + 30 + 64, "once the wide row left, the batch gave its columns back"


def test_prefix_cache_skips_prefill_and_keeps_every_token(generator, prompts, make):
    s = make(prefix_cache_mb=64)
    params = SamplingParams(max_new_tokens=10)
    cold = s.submit(prompts[2], params).result()
    warm = s.submit(prompts[2], params).result()
    assert cold.cached_tokens == 0
    assert warm.cached_tokens == (len(prompts[2]) - s.last_chunk) // 16 * 16 > 0, "a last chunk of 9+ tokens runs"
    assert warm.token_ids == cold.token_ids
    # another prompt with the same chat-template head reuses its full blocks
    other = s.submit(prompts[4], params).result()
    head = next(i for i, (x, y) in enumerate(zip(prompts[2], prompts[4])) if x != y)
    assert other.cached_tokens == head // 16 * 16
    again = s.submit(prompts[4], params).result()
    assert other.token_ids == again.token_ids
    # usage counts each prompt token once, by how its keys came (one answer at a time: no rides)
    u = s.usage()["prompt_tokens"]
    assert u["cached"] == warm.cached_tokens + other.cached_tokens + again.cached_tokens and u["riding"] == 0
    assert u["prefilled"] + u["cached"] == 2 * len(prompts[2]) + 2 * len(prompts[4])
    off = make(prefix_cache_mb=0)
    assert off.submit(prompts[4], params).result().token_ids == other.token_ids


def test_no_short_last_prefill_chunk_after_a_chunk_or_a_cache_hit(generator, prompts, make, monkeypatch):
    """A short run rounds otherwise than the same tokens in a longer one (onnxruntime's
    one-row kernels for one token; logits at every position for up to verify_max_tokens),
    so a prompt whose block-aligned chunks or cache hit would leave a short last chunk runs
    more of it there: its first token's logits are the bits of an unchunked prefill."""
    assert generator.verify_max_tokens == 8
    for extra in (1, 5):  # prompts of 16k + 1 and 16k + 5 tokens
        p = prompts[2][:(len(prompts[2]) - 10) // 16 * 16 + extra]
        want = generator.prefill(p)[0]
        real, runs = generator.prefill, []

        def spy(tokens, past=None):
            out = real(tokens, past)
            runs.append((len(tokens), out[0].copy()))
            return out

        s = make(prefix_cache_mb=64, prefill_chunk=len(p) - extra)  # chunks of 16k tokens
        assert s.wait_started(timeout=300) and s.chunk_cost is not None  # its calibration runs prefill too
        monkeypatch.setattr(generator, "prefill", spy)
        params = SamplingParams(max_new_tokens=2)
        cold = s.submit(p, params).result()
        assert [n for n, _ in runs] == [len(p)], "the last tokens ran in the first chunk"
        warm = s.submit(p, params).result()
        assert warm.cached_tokens == len(p) - 16 - extra and runs[-1][0] == 16 + extra, "a hit one block short"
        assert np.array_equal(runs[0][1], want) and np.array_equal(runs[-1][1], want)
        assert warm.token_ids == cold.token_ids
        monkeypatch.undo()


def test_a_prompts_chunks_are_of_even_size(generator, prompts, make, monkeypatch):
    """A prompt longer than a chunk runs in as many chunks as prefill_chunk needs, of even
    size in whole blocks (no short tail, which runs as slowly a token as any small chunk),
    and its first token is an unchunked prefill's."""
    long = (prompts[2] * 4)[:300]
    assert len(long) == 300
    s = make(prefix_cache_mb=0, prefill_chunk=128)
    assert s.wait_started(timeout=300)
    real, runs = generator.prefill, []

    def spy(tokens, past=None):
        runs.append(len(tokens))
        return real(tokens, past)

    monkeypatch.setattr(generator, "prefill", spy)
    got = s.submit(long, SamplingParams(max_new_tokens=1)).result()
    monkeypatch.undo()
    # 3 chunks of 128 or fewer, each the rest over the chunks left (not 128 + 128 + 44)
    assert runs == [112, 96, 92]
    assert got.token_ids == [int(generator.prefill(long)[0].argmax())]


def test_prefix_cache_evicts_least_recently_used_within_budget(generator, prompts, make):
    block_bytes = 2 * generator.num_layers * generator.num_kv_heads * 16 * generator.head_dim * 4
    s = make(prefix_cache_mb=6 * block_bytes / 2**20)  # room for six blocks
    for p in prompts:
        s.submit(p, SamplingParams(max_new_tokens=1)).result()
    assert len(s.cache) <= 6 and s.cache.bytes <= s.cache.budget


def test_limits_are_checked_before_queueing(generator, prompts, make):
    s = make(max_rows=1, max_queue=1)
    with pytest.raises(InvalidInput, match="context window"):
        s.submit(list(range(100, 100 + generator.window)), SamplingParams(max_new_tokens=8))
    with pytest.raises(InvalidInput, match="KV budget of 64 tokens"):
        make(kv_budget_tokens=64).submit(prompts[2], SamplingParams(max_new_tokens=8))
    first = s.submit(prompts[0], SamplingParams(max_new_tokens=40))
    second = s.submit(prompts[1], SamplingParams(max_new_tokens=4))
    with pytest.raises(Overloaded, match="retry later"):
        s.submit(prompts[3], SamplingParams(max_new_tokens=4))
    first.cancel()
    assert second.result().token_ids
    assert s.submit(prompts[3], SamplingParams(max_new_tokens=2)).result().token_ids  # room again


class FailOnce:
    """The real session, except that one run raises (a fault inside a step)."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.calls, self.fail_at = inner, 0, fail_at

    def _call(self, method, *a, **kw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected onnxruntime failure")
        return method(*a, **kw)

    def run(self, *a, **kw):  # prefill
        return self._call(self.inner.run, *a, **kw)

    def run_with_iobinding(self, *a, **kw):  # a decode step (generate.KVBatch)
        return self._call(self.inner.run_with_iobinding, *a, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_failed_step_fails_its_requests_and_the_loop_serves_on(generator, prompts, make):
    """A decode step that fails, or a newcomer's joining the batch after its last prompt
    chunk (no room for its row): that request fails with the error, the loop serves on."""
    s = make(prefix_cache_mb=0)
    params = SamplingParams(max_new_tokens=6)
    want = s.submit(prompts[0], params).result()

    def join_fails(t):
        raise MemoryError("injected: no room for the row")

    faults = [(generator, "session", FailOnce(generator.session, fail_at=3), RuntimeError, prompts[0]),  # a decode step
              (s, "_join", join_fails, MemoryError, prompts[1])]
    for owner, name, fault, error, prompt in faults:
        real = getattr(owner, name)
        setattr(owner, name, fault)
        try:
            with pytest.raises(error, match="injected"):
                result_within(s.submit(prompt, params))
        finally:
            setattr(owner, name, real)
        assert result_within(s.submit(prompts[0], params)).token_ids == want.token_ids
        assert (s.running, s.waiting) == (0, 0)


def test_many_rows_decode_in_one_step(prompts, make):
    s = make(prefix_cache_mb=0, max_rows=8, prefill_stall_ms=60_000)  # newcomers join fast
    tickets = [s.submit(p, SamplingParams(max_new_tokens=24, ignore_eos=True)) for p in prompts]
    comps = [t.result() for t in tickets]
    assert all(c.completion_tokens == 24 for c in comps), "ignore_eos runs to max_new_tokens"
    assert s.rows_stepped / max(s.steps, 1) > 2, "decode steps carried several rows"
    assert np.isfinite([c.decode_ns for c in comps]).all()


def test_long_rag_prompts_keep_their_alone_tokens_in_a_busy_batch(generator, make):
    """RAG-sized prompts (about 250 to 650 tokens, numbered passages like engine/rag.py's)
    arriving while others decode: each row attends to its own keys only (GroupQueryAttention
    over a right-padded cache), so every request gets exactly the tokens it gets alone. The
    left-padded cache this replaced changed a 554-token prompt's greedy answer."""
    def rag_prompt(order, question):
        passages = "\n\n".join(f"[{i + 1}] {TEXTS[j]} {TEXTS[(j + 2) % len(TEXTS)]}" for i, j in enumerate(order))
        return generator.encode(generator.render_chat([{"role": "user", "content":
                                f"Passages:\n{passages}\n\nQuestion: {question} Cite passages as [n]."}]))
    prompts = [rag_prompt([0, 1, 2], "How hot should the water be for green tea?"),
               rag_prompt([2, 3, 4, 1, 0, 2, 1], "How often is a starter fed in the fridge?"),
               rag_prompt([4, 2, 1, 0, 3, 2, 1, 2, 4, 1], "What do HNSW graphs avoid?"),
               rag_prompt([1, 2, 0, 2], "How long is a year on Mercury?")]
    lengths = sorted(len(p) for p in prompts)
    assert lengths[0] > 200 and lengths[-1] > 550, lengths
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    ref = alone(make(prefix_cache_mb=0, max_rows=1), prompts, params)
    s = make(prefix_cache_mb=0, max_rows=4, prefill_chunk=128, prefill_stall_ms=60_000)  # 128-token chunks
    tickets = []
    for p in prompts:  # each arrives while the earlier ones decode
        tickets.append(s.submit(p, params))
        deadline = time.monotonic() + 120
        while s.running and not s._active and time.monotonic() < deadline:
            time.sleep(0.01)
    got = [t.result() for t in tickets]
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.token_ids == r.token_ids, f"prompt {i} ({len(prompts[i])} tokens) changed in the busy batch"
    assert s.rows_stepped > s.steps, "the rows shared decode steps"


@pytest.mark.parametrize("streamed", [True, False])
def test_only_streams_make_a_newcomer_prefill_in_small_chunks(prompts, make, streamed):
    """A newcomer's prefill is cut into chunks that stall the decoding rows ~prefill_stall_ms
    only when one of them is a stream; batch requests (AnswerBatch, `rag ask --batch`) want
    throughput, so it runs in prefill_chunk pieces. The tokens are the same either way."""
    long = prompts[2] * 3
    s = make(prefix_cache_mb=0, max_rows=2, prefill_chunk=128, prefill_stall_ms=1)  # a stall of one block
    first = s.submit(prompts[0], SamplingParams(max_new_tokens=400, ignore_eos=True), streamed=streamed)
    deadline = time.monotonic() + 60
    while not s._active and time.monotonic() < deadline:
        time.sleep(0.01)
    runs = s.prefill_runs
    second = s.submit(long, SamplingParams(max_new_tokens=4), streamed=False).result()
    first.cancel()
    chunks = s.prefill_runs - runs
    full = -(-len(long) // 128)
    if streamed:
        assert chunks > full, "the stream's next tokens waited one small chunk at a time"
    else:
        assert chunks == full, "next to batch rows the newcomer ran in prefill_chunk pieces"
    assert second.token_ids == s.submit(long, SamplingParams(max_new_tokens=4)).result().token_ids


@pytest.mark.parametrize("stall_ms", [1, 10_000])
def test_a_riding_chunk_keeps_its_run_within_the_prefill_stall(prompts, make, stall_ms):
    """A newcomer's chunk riding in a stream's verify run grows with the backlog of
    newcomers, but the run stays within prefill_stall_ms (the stream's inter-token latency),
    sized by what riding tokens have cost so far: at 1 ms every chunk is one block. The
    newcomers' tokens are their alone tokens."""
    long = prompts[2] * 3
    s = make(prefix_cache_mb=0, max_rows=2, prefill_chunk=128, prefill_stall_ms=stall_ms, draft_tokens=3)
    assert s.wait_started(timeout=300)
    rides, real = [], s._solo.verify_rows

    def spy(rows, tokens, prefill=None):
        if prefill is not None:
            rides.append(len(prefill[1]))
        return real(rows, tokens, prefill=prefill)

    s._solo.verify_rows = spy
    first = s.submit(prompts[0], SamplingParams(max_new_tokens=400, ignore_eos=True))
    deadline = time.monotonic() + 60
    while not s._speculating and time.monotonic() < deadline:
        time.sleep(0.01)
    results = [t.result() for t in [s.submit(long, SamplingParams(max_new_tokens=4)) for _ in range(6)]]
    first.cancel()
    assert rides, "the newcomers' chunks rode in the stream's verify runs"
    assert s._ride_s is not None, "the rides' cost was measured"
    if stall_ms == 1:
        assert set(rides) == {16}, rides
    else:
        assert max(rides) > 16, "a backlog of newcomers rode in bigger chunks"
    first.result()
    alone = s.submit(long, SamplingParams(max_new_tokens=4)).result()
    assert all(r.token_ids == alone.token_ids for r in results)
    u = s.usage()  # every prompt token counted once, the riding ones as riding
    assert u["prompt_tokens"]["riding"] == sum(rides) and u["prompt_tokens"]["cached"] == 0
    assert sum(u["prompt_tokens"].values()) == len(prompts[0]) + 7 * len(long)
    assert u["runs"] == {"prefill": s.prefill_runs, "step": s.steps, "verify": s.verify_runs}
    assert u["seconds"]["prefill"] > 0 and u["seconds"]["verify"] > 0


def test_drafts_follow_a_rows_agreement_and_never_change_its_tokens(generator, make):
    """A speculating row drafts as many tokens as its own agreement rates make worth their
    place in the run (DRAFT_WORTH): an answer that quotes its prompt keeps drafting, one
    that does not drafts less, and either way its tokens are those of fixed drafts."""
    adaptive = make(prefix_cache_mb=0, draft_tokens=7)
    fixed = make(prefix_cache_mb=0, draft_tokens=7, adaptive_drafts=False)
    params = SamplingParams(max_new_tokens=48)
    offered = {}
    for how in ("Repeat exactly", "Ask three questions about this"):
        prompt = generator.encode(generator.render_chat([{"role": "user", "content": f"{how}: {TEXTS[2]}"}]))
        a, f = adaptive.submit(prompt, params).result(), fixed.submit(prompt, params).result()
        assert a.token_ids == f.token_ids and a.text == f.text
        offered[how] = [(r.accepted_prediction_tokens, r.rejected_prediction_tokens) for r in (a, f)]
    (acc_a, rej_a), (acc_f, rej_f) = offered["Ask three questions about this"]
    assert rej_a < 0.5 * rej_f, f"fewer drafts wasted where they are seldom right: {offered}"
    (acc_a, rej_a), (acc_f, rej_f) = offered["Repeat exactly"]
    assert acc_a >= 0.8 * acc_f > 0, f"a quoting answer keeps drafting: {offered}"
    # with the plan's worth of a place in a run (Plan.draft_worth): nothing, every draft is
    # offered; more than any draft's chance, one draft a run (what its filler would cost)
    free = make(prefix_cache_mb=0, draft_tokens=7, draft_worth={"alone": 0.0, "shared": 0.0})
    dear = make(prefix_cache_mb=0, draft_tokens=7, draft_worth={"alone": 1.0, "shared": 1.0})
    f = fixed.submit(prompt, params).result()
    got = {"free": free.submit(prompt, params).result(), "dear": dear.submit(prompt, params).result()}
    assert all(r.token_ids == f.token_ids for r in got.values())
    assert (got["free"].accepted_prediction_tokens, got["free"].rejected_prediction_tokens) == offered[how][1]
    drafted = got["dear"].accepted_prediction_tokens + got["dear"].rejected_prediction_tokens
    assert drafted <= len(f.token_ids) < sum(offered[how][1]), "one draft a run"
    # with a lone run's time known (Plan.draft_worth), the count that keeps most tokens a
    # second: other drafts, the same tokens
    timed = make(prefix_cache_mb=0, draft_tokens=7, draft_worth={"alone": 1.0, "shared": 1.0,
                                                                 "alone_run_s": 0.0059, "alone_token_s": 0.0033})
    assert timed.submit(prompt, params).result().token_ids == f.token_ids


def test_a_lone_rows_drafts_are_the_count_that_keeps_most_tokens_a_second(prompts, make):
    """Ticket.drafts_for_speed: k drafts keep 1 + p1 (1 + p + ... + p^(k-1)) tokens in a run
    of k + 1 tokens in whole pairs (p1: the row's rate for a run's first draft, p for one after
    a kept one); where a pair costs what one token does and each further token a quarter of it
    (int4, AVX-512 VNNI EPYC: 5.9 ms + 3.3 ms a token), one draft until the row's agreement
    passes ~0.7; where a run's fixed cost is higher (w8a8 there: 16.9 ms + 2.0), drafts pay
    sooner; where drafts come in stretches (p above p1), longer runs pay sooner too."""
    t = make(prefix_cache_mb=0, draft_tokens=7).submit(prompts[0], SamplingParams(max_new_tokens=2))
    t.result()
    for p, want in ((0.5, 1), (2 / 3, 1), (0.8, 3), (0.9, 5)):
        t.first, t.further = [p, 1 - p], [p, 1 - p]
        assert t.agreement() == pytest.approx((p, p))
        assert t.drafts_for_speed(0.0059, 0.0033, 7) == want, p
    assert t.drafts_for_speed(0.0059, 0.0033, 2) == 1 and t.drafts_for_speed(0.0059, 0.0033, 0) == 1
    t.first, t.further = [2, 1], [2, 1]
    assert t.drafts_for_speed(0.0169, 0.0020, 7) == 3
    # the Zen 5 EPYC's int4 runs (7.2 ms + 1.48 a token): a first draft kept half the time,
    # one after it as often: one draft; kept 0.8 of the time after a kept one: three
    t.first, t.further = [0.5, 0.5], [0.5, 0.5]
    assert t.drafts_for_speed(0.0072, 0.00148, 3) == 1
    t.further = [0.8, 0.2]
    assert t.drafts_for_speed(0.0072, 0.00148, 3) == 3
    # after a one-token match the row's other pair, from an even chance (WEAK_DRAFT_PRIOR):
    # one draft at those int4 runs, three where a run of 4 costs about what one of 2 does
    t.weak_first, t.weak_further = [1.0, 1.0], [1.0, 1.0]
    assert t.agreement(weak=True) == pytest.approx((0.5, 0.5)) and t.agreement() == pytest.approx((0.5, 0.8))
    assert t.drafts_for_speed(0.0072, 0.00148, 3, weak=True) == 1
    assert t.drafts_for_speed(0.0169, 0.0005, 3, weak=True) == 3
    # shared runs (drafts_worth) keep one rate for every draft: p^j
    t.agreed, t.stopped = 0.8, 0.2
    assert t.drafts_worth(0.6) == 2 and t.drafts_worth(0.5) == 3  # kept with 0.8, 0.64, 0.512, 0.41


def test_a_rows_agreement_counts_first_drafts_and_the_ones_after_a_kept_one(prompts, make):
    """Ticket.drafts_checked: a run stops at its first draft not kept, so its first draft
    counts toward p1 (kept or not) and the ones after a kept first toward p (a lone row's
    rates, a pair for drafts after a match of 2+ tokens and one after a one-token match);
    kept drafts against runs stopped make the one rate of shared runs; counts decay by
    DRAFT_MEMORY a run."""
    from engine.scheduler import DRAFT_MEMORY as m, DRAFT_PRIOR, WEAK_DRAFT_PRIOR

    t = make(prefix_cache_mb=0, draft_tokens=3).submit(prompts[0], SamplingParams(max_new_tokens=2))
    t.result()
    assert t.first == list(DRAFT_PRIOR) and t.further == list(DRAFT_PRIOR)
    assert t.weak_first == list(WEAK_DRAFT_PRIOR) and t.weak_further == list(WEAK_DRAFT_PRIOR)
    # drafts copied after a one-token match count in the weak pair only
    t.weak_first, t.weak_further = [0.0, 0.0], [0.0, 0.0]
    t.drafts_checked(3, 1, weak=True)  # first kept, second missed
    assert t.weak_first == [1.0, 0.0] and t.weak_further == [0.0, 1.0]
    assert t.first == list(DRAFT_PRIOR) and t.further == list(DRAFT_PRIOR)
    t.first, t.further = [0.0, 0.0], [0.0, 0.0]
    t.drafts_checked(3, 0)  # the first draft missed: nothing after it was checked
    assert t.first == [0.0, 1.0] and t.further == [0.0, 0.0]
    t.drafts_checked(3, 2)  # first kept, second kept, third missed
    assert t.first == pytest.approx([1.0, m]) and t.further == pytest.approx([1.0, 1.0])
    t.drafts_checked(3, 3)  # all kept
    assert t.first == pytest.approx([m + 1, m * m]) and t.further == pytest.approx([m + 2, m])
    t.drafts_checked(1, 1)  # one draft, kept: nothing after it offered
    assert t.further == pytest.approx([m + 2, m])
    # the one rate of shared runs: kept drafts against runs stopped
    t.agreed, t.stopped = 0.0, 0.0
    t.drafts_checked(3, 0)
    t.drafts_checked(3, 2)
    assert (t.agreed, t.stopped) == pytest.approx((2.0, m + 1))
