"""Token generation with an exported ONNX decoder (KV cache) in onnxruntime; no torch.

The prompt is run once (prefill) and every later step feeds only the newest token plus
the cached keys/values, so no token of the prompt is recomputed. Sampling and the
repetition penalty run in Numba kernels over the logits (engine/kernels.py). Streamed text
deltas are always whole UTF-8 characters: a byte-level BPE piece that ends inside a
character is held back until the character completes, and the deltas concatenate exactly
to the final text. Several prompts can be generated together: each prompt is prefilled
alone, and decoding runs them as one batch whose KV cache is right-padded, each row reading
only its own keys (the decoder's GroupQueryAttention, engine/export_lm.gqa_attention), so a
row's tokens do not depend on the batch it is in; each row finishes on its own and leaves.
The batch's cache is updated in place (KVBatch): a step writes each row's new keys into
the same buffers it reads, instead of copying the whole cache into a wider output.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from . import kernels
from .embed import make_session
from .config import check_speculative_tokens
from .errors import InvalidInput, Unavailable
from .export_lm import VERIFY_MAX_TOKENS, rows_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model_int8.onnx", "int4": "model_int4.onnx", "w8a8": "model_w8a8.onnx"}
FINISH_LENGTH = "length"
FINISH_EOS = "eos"
FINISH_STOP = "stop_sequence"
FINISH_CANCELLED = "cancelled"
# Set by the RAG pipeline, not the generator: no retrieved chunk was relevant enough.
FINISH_NO_CONTEXT = "no_context"
MAX_STOP_SEQUENCES = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 switch those off."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks of fixed-length answers)
    suppress_first: tuple[int, ...] = ()  # token ids the first token may not be (engine/rag.py's retry)
    # Speculative decoding (engine/scheduler.py, greedy rows): drafts per run; None = the
    # scheduler's default (Config.speculative_tokens).
    speculative_tokens: int | None = None

    def check(self, window: int) -> None:
        """Raise InvalidInput naming the first bad field."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or not 1 <= self.max_new_tokens < window:
            raise InvalidInput(f"max_new_tokens must be an integer in [1, {window - 1}] (the context window "
                               f"is {window}), got {self.max_new_tokens!r}")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidInput(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidInput(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidInput(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not np.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidInput(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidInput(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        check_speculative_tokens(self.speculative_tokens)
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise InvalidInput(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.suppress_first, tuple) or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.suppress_first):
            raise InvalidInput("suppress_first must be a tuple of token ids")
        if isinstance(self.stop, str) or len(self.stop) > MAX_STOP_SEQUENCES or \
                any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidInput(f"stop must be a list of at most {MAX_STOP_SEQUENCES} non-empty strings")


@dataclasses.dataclass(slots=True)
class Completion:
    """The result of one generation."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    prefill_ns: int = 0
    decode_ns: int = 0
    first_token_ns: int = 0
    queue_ns: int = 0  # waiting for a place in the scheduler's batch (engine/scheduler.py)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    accepted_prediction_tokens: int = 0  # drafted tokens the model agreed with (engine/scheduler.py)
    rejected_prediction_tokens: int = 0  # drafted tokens it did not


class _Row:
    """Per-sequence state: tokens, incremental detokenization, stop sequences, finish."""

    def __init__(self, gen: "Generator", prompt_len: int, params: SamplingParams) -> None:
        self.gen = gen
        self.params = params
        self.prompt_len = prompt_len
        self.ids: list[int] = []
        self.text = ""         # decoded so far (complete characters only)
        self.emitted = 0       # chars of self.text already handed out as deltas
        self.finish: str | None = None
        self.rng = np.random.default_rng(params.seed)
        self.seen = np.zeros(gen.vocab_size, dtype=np.uint8) if params.repetition_penalty != 1.0 else None
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    def pick(self, logits: np.ndarray) -> int:
        p = self.params
        if p.suppress_first and not self.ids and self.finish is None:
            logits = logits.copy()
            logits[[t for t in p.suppress_first if t < logits.shape[0]]] = -np.inf
        if self.seen is not None:
            logits = logits.copy()
            kernels.apply_repetition_penalty(logits, self.seen, np.float32(p.repetition_penalty))
        if p.temperature <= 0:
            # numpy's vectorised argmax: ~10 us over a 152k vocabulary, against ~400 us for
            # the scalar loop it replaced (once per row per step); both pick the first maximum
            return int(np.argmax(logits))
        return int(kernels.sample_token(logits, p.temperature, p.top_k, p.top_p, self.rng.random()))

    def push(self, token: int) -> None:
        """Record a generated token and decide whether the row is finished."""
        p = self.params
        if token in self.gen.eos_ids and not p.ignore_eos:
            self.finish = FINISH_EOS
            self._refresh(final=True)
            return
        self.ids.append(token)
        if self.seen is not None:
            self.seen[token] = 1
        self._refresh(final=False)
        for s in p.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at >= 0:
                self.text = self.text[:at]
                self.finish = FINISH_STOP
                return
        if len(self.ids) >= p.max_new_tokens:
            self.finish = FINISH_LENGTH
            self._refresh(final=True)

    def _refresh(self, final: bool) -> None:
        full = self.gen.decode(self.ids)
        if not final:
            # An incomplete UTF-8 sequence decodes to U+FFFD at the end: hold it back.
            while full.endswith("\ufffd"):
                full = full[:-1]
        if len(full) >= len(self.text) or final:
            self.text = full

    def delta(self) -> str:
        """Text not handed out yet, minus what could still become a stop sequence."""
        end = len(self.text) if self.finish else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out


def padded(rule: tuple[int, int], n: int) -> int:
    """The rows a step over n rows runs under the padding rule (k, m): max(m, ceil(n / k) * k)."""
    return max(rule[1], -(-n // rule[0]) * rule[0])


def padding_rule(exact: dict[int, bool]) -> tuple[int, int] | None:
    """Of the rules (k, m) (see `padded`), the one that pads fewest rows over n = 1..8 while
    every run it makes is one of the `exact` row counts (count -> whether all its rows equal
    the reference); None if no rule keeps every run exact."""
    rules = [(k, m) for k in (1, 2, 4, 8) for m in range(1, 9) if all(exact[padded((k, m), n)] for n in range(1, 9))]
    return min(rules, key=lambda r: (sum(padded(r, n) - n for n in range(1, 9)), r), default=None)


def draft_match(history: np.ndarray, max_ngram: int = 3) -> tuple[int, int]:
    """(n, start): the longest suffix of the history (up to `max_ngram` tokens) that occurred
    before, n its length, and where what followed its latest earlier occurrence starts;
    (0, 0) if no suffix did. What a draft copied from there is worth depends on n: after a
    one-token match (a common word) it was kept about half as often (Ticket.agreement)."""
    n_hist = len(history)
    for n in range(min(max_ngram, n_hist - 1), 0, -1):
        tail = history[n_hist - n:]
        starts = np.flatnonzero(history[:n_hist - n] == tail[0])  # occurrences before the tail itself
        for j in range(1, n):
            starts = starts[history[starts + j] == tail[j]]
        if starts.size:
            return n, int(starts[-1]) + n
    return 0, 0


def lookup_draft(history: np.ndarray, k: int, max_ngram: int = 3) -> list[int]:
    """Up to `k` tokens that may come next, copied from the history (prompt lookup): the
    tokens that followed the latest earlier occurrence of the history's last `max_ngram`
    tokens (fewer if that finds nothing: draft_match). A RAG answer copies much of its
    passages, so the drafts are often right. [] if no suffix of the history occurred before."""
    n, start = draft_match(history, max_ngram)
    return [int(t) for t in history[start:start + k]] if n else []


# Verify runs carry a multiple of this many tokens per row (filler tokens after the drafts,
# never kept). Runs of two tokens or more give a token the same bits whatever the run's other
# rows, except that the integer kernels work on pairs of rows: an odd run's last token,
# alone in its pair, rounds otherwise than beside the next row's first (the 8-bit
# MatMulNBits on the AMX Xeon). Whole pairs keep every token's partner in its own row.
VERIFY_ALIGN = 2


class KVBatch:
    """The keys and values of a decode batch, updated in place.

    One buffer per past tensor, shaped (row capacity, kv heads, column capacity, head dim).
    Rows [0, len) are active and row b's keys are columns [0, lengths[b]). A decode step binds
    the active rows' buffers as both the past input and the present output, so the decoder's
    GroupQueryAttention writes each row's new keys at column lengths[b] where they lie and
    reads only each row's own keys: no step copies the cache. (Plain `session.run` returns a
    new present one column wider, which copied every row's keys each step: an int8 batch-8 step
    at 800 keys took 126 ms against 84 in place on an AMX Xeon, benchmarks/decode_step.py.) Column capacity is
    reserved per row for its prompt plus its new tokens, so buffers rarely grow; they shrink
    when the widest row that needed them leaves, and are freed when the batch empties.
    """

    COLUMN_ROUNDING = 64

    def __init__(self, gen: "Generator", *, verify: bool = False) -> None:
        """`verify`: its runs take the generator's verify session (speculative decoding's
        rows, engine/plan.py) instead of the decode session."""
        self.gen = gen
        self.for_verify = verify
        self.bufs: list[np.ndarray] = []
        self.lengths = np.zeros(0, np.int64)  # keys per active row
        self.reserved = np.zeros(0, np.int64)  # columns each row may reach (prompt + new tokens)
        self._logits: np.ndarray | None = None
        # The binding of the buffers (past in, present and logits out), made again only when
        # they or the step's row count change: binding 2 x 24 caches cost ~1 ms a step.
        self._io = None
        self._io_key: tuple | None = None
        self._slots_io = None  # the row-slots graph's (verify_rows)
        self._slots_io_key: tuple | None = None
        self._lone_io: dict[tuple[int, int], object] = {}  # a lone row's runs' (_lone_binding)
        self._lone_io_version = -1
        self._lone_logits: dict[int, np.ndarray] = {}  # their logits, by the run's tokens
        self._spare: list[np.ndarray] | None = None  # the cache of a slot past a run's rows
        self._version = 0  # bumped whenever the buffers are replaced

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def session(self):
        return self.gen.verify_session if self.for_verify else self.gen.session

    @property
    def columns(self) -> int:
        bufs = self.bufs  # one read: another thread may look while the loop replaces it
        return bufs[0].shape[2] if bufs else 0

    def _resize(self, rows: int, cols: int) -> None:
        """New buffers of rows x cols (rounded up), holding the active rows' keys."""
        r = -(-cols // self.COLUMN_ROUNDING) * self.COLUMN_ROUNDING
        g, n = self.gen, len(self)
        shape = (rows, g.num_kv_heads, r, g.head_dim)
        new = [np.zeros(shape, np.float32) for _ in g.past_names]
        if n:
            w = int(self.lengths.max())
            for a, b in zip(new, self.bufs):
                a[:n, :, :w] = b[:n, :, :w]
        self.bufs = new
        self._version += 1

    def add(self, kv: list[np.ndarray], reserve: int) -> None:
        """Append one row: `kv` its cache (1, heads, n, dim) per past tensor, `reserve` the
        columns it may reach."""
        n = kv[0].shape[2]
        reserve = max(reserve, n + 1)
        b = len(self)
        have = self.bufs[0].shape[0] if self.bufs else 0
        if b + 1 > have or reserve > self.columns:
            # room for a step's padding rows too
            self._resize(self.gen.padded_rows(max(b + 1, 2 * have)), max(reserve, self.columns))
        for buf, v in zip(self.bufs, kv):
            buf[b, :, :n] = v[0]
        self.lengths = np.append(self.lengths, n)
        self.reserved = np.append(self.reserved, reserve)

    def keep(self, keep: Sequence[int]) -> None:
        """Keep the rows `keep` (ascending), moved down to rows [0, len(keep))."""
        for dst, src in enumerate(keep):
            if dst != src:
                w = int(self.lengths[src])
                for buf in self.bufs:
                    buf[dst, :, :w] = buf[src, :, :w]
        idx = np.asarray(keep, np.int64)
        self.lengths, self.reserved = self.lengths[idx], self.reserved[idx]
        if not len(idx):
            self.clear()
        else:
            need = max(int(self.reserved.max()), int(self.lengths.max()) + 1)
            if need <= self.columns // 2:  # the widest row left: give its memory back
                self._resize(self.bufs[0].shape[0], need)

    def clear(self) -> None:
        self.bufs = []
        self.lengths = np.zeros(0, np.int64)
        self.reserved = np.zeros(0, np.int64)
        self._logits = None
        self._io = self._io_key = self._slots_io = self._slots_io_key = None
        self._lone_io, self._lone_logits = {}, {}
        self._version += 1

    def step(self, ids: np.ndarray) -> np.ndarray:
        """One decode step: row b gets ids[b, 0] at position lengths[b]; returns logits (rows, vocab)."""
        g, n = self.gen, len(self)
        rows = g.padded_rows(n)  # padding rows: see Generator.row_padding
        if rows > self.bufs[0].shape[0] or int(self.lengths.max()) + 1 > self.columns:
            self._resize(max(rows, self.bufs[0].shape[0]), max(self.columns, int(self.lengths.max()) + 1))
        cols = self.columns
        if self._logits is None or self._logits.shape[0] < self.bufs[0].shape[0]:
            self._logits = np.empty((self.bufs[0].shape[0], 1, g.vocab_size), np.float32)
            self._version += 1
        logits = self._logits[:rows]
        lengths = np.zeros(rows, np.int64)  # a padding row has no keys: it writes column 0 of a free row
        lengths[:n] = self.lengths
        step_ids = np.full((rows, 1), g.pad_id, np.int64)
        step_ids[:n] = ids
        if self._io_key != (self._version, rows):
            self._io, self._io_key = self._binding(0, rows, logits), (self._version, rows)
        self._run(self._io, step_ids, np.arange(cols)[None, :] <= lengths[:, None], lengths[:, None].copy())
        self.lengths = self.lengths + 1
        return logits[:n, -1, :]

    def verify(self, b: int, tokens: Sequence[int]) -> np.ndarray:
        """One run of row b alone over `tokens` (its last token, then drafted ones) at positions
        lengths[b]...; returns the logits after each (len(tokens), vocab). verify_rows of one row."""
        return self.verify_rows([b], [tokens])[0]

    def verify_rows(self, rows: Sequence[int], tokens: Sequence[Sequence[int]], *,
                    prefill: tuple[list[np.ndarray] | None, Sequence[int]] | None = None) -> list[np.ndarray]:
        """Verify runs of rows `rows` (ascending), row rows[i] over tokens[i] (its last token,
        then the drafts it has, 1 to verify_max_tokens tokens) at positions lengths[b]...;
        returns, per row, the logits after each of its tokens (len(tokens[i]), vocab; a lone
        row's, like step's, only until the batch's next run: _lone_binding). Their keys are
        written in place; `accept` says how many of them each row keeps.

        Speculative decoding (engine/scheduler.py): such a run costs little more than a
        one-token step (the weights are read once for all its tokens; each extra position
        adds a row to every product, the output head's most), so each accepted draft is a
        token almost for free. onnxruntime's GroupQueryAttention takes several new tokens
        after a cache only in a run of one row; the row-slots graph (Generator.rows_session,
        engine/export_lm.row_slots) runs one such attention per row and everything else over
        all rows' tokens together, each row with as many tokens as it has and logits for
        those only, up to Generator.row_slots rows a run (a lone row, or every row without
        that graph, runs the plain graph). Fillers after a row's tokens make its count a
        multiple of VERIFY_ALIGN (their keys are never kept): such runs give the same bits
        whatever the buffer's width, the row's place in it or the other rows in the run, so a
        row's tokens do not depend on the other rows (a one-token step rounds differently).

        `prefill` (past, chunk): a newcomer's prompt chunk rides along in a slot of its own
        after the rows (chunked prefill beside decoding streams: the run reads the weights
        once for both), attending to `past` (its one-row cache so far, None: empty); its cache
        extended by the chunk is appended to the result (Generator.prefill's, bit for bit: its
        tokens keep their pairs, the chunk lying after the rows' whole pairs). Needs the
        row-slots graph, on the prefill weights (can_ride_prefill), and a free slot; no logits
        come for the chunk, so a prompt's last chunk runs alone (Generator.prefill).
        """
        g = self.gen
        if not rows or any(not 1 <= len(t) <= g.verify_max_tokens for t in tokens):
            raise ValueError(f"a verify run takes 1 to {g.verify_max_tokens} tokens per row, "
                             f"got {[len(t) for t in tokens]}")
        if prefill is not None and not (self.can_ride_prefill and len(rows) < g.row_slots and len(prefill[1]) >= 2):
            raise ValueError(f"a prefill chunk rides along only in a run of fewer than {g.row_slots} rows "
                             "of the row-slots graph on the prefill weights, with two tokens or more")
        runs = [list(t) + [t[-1]] * (-len(t) % VERIFY_ALIGN) for t in tokens]
        starts = self.lengths[list(rows)]
        ends = starts + np.array([len(r) for r in runs])
        if int(ends.max()) > self.columns:
            self._resize(self.bufs[0].shape[0], int(ends.max()))
        cols = self.columns
        out: list[np.ndarray] = []
        lone = len(rows) == 1 and prefill is None  # the plain graph: no need to load the row-slots one
        step = g.row_slots if not lone and g.rows_session is not None and self.for_verify else 1
        for i in range(0, len(rows), step):
            part = range(i, min(i + step, len(rows)))
            if len(part) == 1 and prefill is None:  # a lone row: the plain graph (Generator.rows_session)
                n = len(runs[i])
                if lone:
                    io, logits = self._lone_binding(rows[i], n)
                else:  # several rows' logits are returned together: each its own
                    logits = np.empty((1, n, g.vocab_size), np.float32)
                    io = self._binding(rows[i], 1, logits)
                self._run(io, np.array([runs[i]], np.int64),
                          np.arange(cols)[None, :] < ends[i], np.arange(starts[i], ends[i], dtype=np.int64)[None, :])
                out.append(logits[0, :len(tokens[i])])
                continue
            # tokens flat, row after row; slots past the rows take token 0 against a spare cache
            s = g.graph_slots
            bounds = np.zeros((2, s), np.int64)
            bounds[1] = 1
            seqlens, totals = np.zeros(s, np.int32), np.ones(s, np.int32)
            ids, positions, wanted = [], [], []
            for j, k in enumerate(part):
                at = len(ids)
                bounds[:, j] = at, at + len(runs[k])
                seqlens[j], totals[j] = ends[k] - 1, cols  # as the plain graph's mask gives them
                wanted.extend(range(at, at + len(runs[k])))  # fillers too: the head pairs rows as alone
                ids.extend(runs[k])
                positions.extend(range(starts[k], ends[k]))
            io = self._slots_binding(tuple(rows[k] for k in part))
            if prefill is not None:  # the chunk's slot, after the rows
                past, chunk = prefill
                past = past if past is not None else g._empty_past(1)
                done, j, at = past[0].shape[2], len(part), len(ids)
                bounds[:, j] = at, at + len(chunk)
                seqlens[j], totals[j] = done + len(chunk) - 1, done + len(chunk)  # as prefill's mask gives them
                ids.extend(chunk)
                positions.extend(range(done, done + len(chunk)))
                present = [np.empty((1, g.num_kv_heads, done + len(chunk), g.head_dim), np.float32) for _ in past]
                sfx = f".slot{j}" if j else ""
                for name, out_name, x, y in zip(g.past_names, g.present_names, past, present):
                    io.bind_cpu_input(name + sfx, np.ascontiguousarray(x))
                    io.bind_output(out_name + sfx, "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
                self._slots_io_key = None  # that slot is bound to the chunk's caches: bind afresh next run
            logits = np.empty((1, len(wanted), g.vocab_size), np.float32)
            io.bind_output(g.output_names[0], "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
            io.bind_cpu_input("input_ids", np.array([ids], np.int64))
            io.bind_cpu_input("position_ids", np.array([positions], np.int64))
            io.bind_cpu_input("slot_starts", bounds[0])
            io.bind_cpu_input("slot_ends", bounds[1])
            io.bind_cpu_input("slot_seqlens_k", seqlens)
            io.bind_cpu_input("slot_totals", totals)
            io.bind_cpu_input("logits_index", np.array(wanted, np.int64))
            g.rows_session.run_with_iobinding(io)
            at = 0
            for k in part:
                out.append(logits[0, at:at + len(tokens[k])])
                at += len(runs[k])
            if prefill is not None:
                out.append(present)
        return out

    @property
    def can_ride_prefill(self) -> bool:
        """Whether prefill chunks may ride in this batch's verify runs (verify_rows): the
        row-slots graph is there and the plan prefills on the weights that verify."""
        g = self.gen
        return self.for_verify and g.rows_session is not None and g.prefill_variant == g.verify_variant

    def _slots_binding(self, rows: tuple[int, ...]):
        """The row-slots graph's binding with slot r's cache bound to buffer row rows[r], in
        place (past in, present out), and a one-column cache of its own for each slot past
        them; kept while the buffers and the rows stay (binding 2 x 24 caches per slot costs
        ~1 ms)."""
        g = self.gen
        key = (self._version, rows)
        if self._slots_io_key == key:
            return self._slots_io
        io = g.rows_session.io_binding()
        if self._spare is None:
            self._spare = [np.zeros((1, g.num_kv_heads, 1, g.head_dim), np.float32) for _ in g.past_names]
        for r in range(g.graph_slots):
            sfx = f".slot{r}" if r else ""
            bufs = [buf[rows[r]:rows[r] + 1] for buf in self.bufs] if r < len(rows) else self._spare
            for past, present, view in zip(g.past_names, g.present_names, bufs):
                io.bind_input(past + sfx, "cpu", 0, np.float32, list(view.shape), view.ctypes.data)
                io.bind_output(present + sfx, "cpu", 0, np.float32, list(view.shape), view.ctypes.data)
        self._slots_io, self._slots_io_key = io, key
        return io

    def _lone_binding(self, b: int, n: int):
        """(binding, logits) of a run of row b alone over n tokens, kept while the buffers
        stay: a lone row's verify runs (speculative decoding of one stream) took ~0.9 ms of
        their ~14 ms binding 2 x 24 caches afresh each run (Zen 5 EPYC, int4). The logits
        array is one per n, so a run's logits hold until the batch's next run, as step's."""
        if self._lone_io_version != self._version:
            self._lone_io, self._lone_io_version = {}, self._version
        logits = self._lone_logits.get(n)
        if logits is None:
            logits = self._lone_logits[n] = np.empty((1, n, self.gen.vocab_size), np.float32)
        io = self._lone_io.get((b, n))
        if io is None:
            io = self._lone_io[(b, n)] = self._binding(b, 1, logits)
        return io, logits

    def _binding(self, first: int, rows: int, logits: np.ndarray):
        """An IO binding of the buffers' rows [first, first + rows) as both the past input and
        the present output (contiguous in C order), and of `logits` as the output."""
        g = self.gen
        io = self.session.io_binding()
        io.bind_output(g.output_names[0], "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        for past, present, buf in zip(g.past_names, g.present_names, self.bufs):
            view = buf[first:first + rows]
            io.bind_input(past, "cpu", 0, np.float32, list(view.shape), view.ctypes.data)
            io.bind_output(present, "cpu", 0, np.float32, list(view.shape), view.ctypes.data)
        return io

    def _run(self, io, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> None:
        """Bind a run's own inputs (a binding replaces the one before) and run it."""
        g = self.gen
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask.astype(np.int64))
        if "position_ids" in g.input_names:
            io.bind_cpu_input("position_ids", positions)
        self.session.run_with_iobinding(io)

    def accept(self, b: int, n: int) -> None:
        """Row b keeps the first n keys its last verify run wrote (the rest are overwritten later)."""
        self.lengths[b] += n


class Generator:
    """Runs an exported decoder-with-past ONNX model (engine/export_lm.py)."""

    def __init__(self, model_dir: str | Path, *, variant: str = "fp32", provider: str = "cpu", threads: int = 1,
                 context_window: int = 2048, prefill_variant: str | None = None,
                 verify_variant: str | None = None, stop_spinning: bool = True) -> None:
        """`variant`: the weights that decode; `prefill_variant` (default: the same): the
        weights that prefill prompts, and `verify_variant` (default: the same as decode) those
        of speculative decoding's verify runs, when another variant is faster at it on this
        machine (engine/plan.py). All are the same graph, so they share the KV cache layout.
        `stop_spinning`: its sessions' idle threads stop spinning when a run returns
        (engine/embed.make_session; Config.stop_spinning)."""
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        prefill_variant = prefill_variant or variant
        verify_variant = verify_variant or variant
        for v in (variant, prefill_variant, verify_variant):
            if v not in VARIANT_FILES:
                raise InvalidInput(f"generator variant must be one of {sorted(VARIANT_FILES)}, got {v!r}")
            path = model_dir / VARIANT_FILES[v]
            if not (model_dir / MANIFEST).exists() or not path.exists():
                raise Unavailable(f"generation model not found at {path}; build it with `make models` "
                                  "(python -m engine.export_lm --default)")
        path = model_dir / VARIANT_FILES[variant]
        self.model_dir = model_dir
        self.manifest = json.loads((model_dir / MANIFEST).read_text())
        self.name: str = self.manifest["name"]
        self.variant = variant
        if self.manifest.get("kv_layout") != "right":  # batched rows need their own keys only
            if "gqa_attention" in self.manifest.get("graph_passes", []):
                raise Unavailable(f"generation model at {model_dir}: its attention blocks did not match the "
                                  "gqa_attention graph pass (engine/export_lm.py), which batched decoding needs")
            raise Unavailable(f"generation model at {model_dir} was built before the gqa_attention graph pass; "
                              "run `make models` to upgrade it in place (about a minute)")
        self.num_layers = int(self.manifest["num_layers"])
        self.num_kv_heads = int(self.manifest["num_kv_heads"])
        self.head_dim = int(self.manifest["head_dim"])
        model_max = int(self.manifest.get("max_position_embeddings") or context_window)
        self.window = min(context_window, model_max)

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        tok_cfg = self._json("tokenizer_config.json")
        gen_cfg = self._json("generation_config.json")
        self.chat_template: str | None = tok_cfg.get("chat_template")
        if self.chat_template is None and (model_dir / "chat_template.jinja").exists():
            self.chat_template = (model_dir / "chat_template.jinja").read_text()
        self.bos_token = self._token_text(tok_cfg.get("bos_token"))
        self.eos_token = self._token_text(tok_cfg.get("eos_token"))
        eos = gen_cfg.get("eos_token_id", [])
        eos = [eos] if isinstance(eos, int) else list(eos)
        if self.eos_token and self.tokenizer.token_to_id(self.eos_token) is not None:
            eos.append(self.tokenizer.token_to_id(self.eos_token))
        self.eos_ids = frozenset(eos)
        pad = tok_cfg.get("pad_token")
        pad_id = self.tokenizer.token_to_id(self._token_text(pad)) if pad else None
        self.pad_id = pad_id if pad_id is not None else (min(self.eos_ids) if self.eos_ids else 0)

        self.stop_spinning = stop_spinning
        self.session = make_session(path, provider, threads, stop_spinning=stop_spinning)
        self.prefill_variant = prefill_variant
        self.verify_variant = verify_variant
        self._prefill_session = None if prefill_variant == variant else \
            make_session(model_dir / VARIANT_FILES[prefill_variant], provider, threads, stop_spinning=stop_spinning)
        self._verify_session = None if verify_variant in (variant, prefill_variant) else \
            make_session(model_dir / VARIANT_FILES[verify_variant], provider, threads, stop_spinning=stop_spinning)
        # Several speculating rows verify in one run of the row-slots copy of the verify
        # weights when `make models` wrote it (engine/export_lm.row_slots: up to row_slots rows
        # a run, each row's logits the same bits as in a run of its own), else one row a run.
        # A lone row runs the plain graph: the row-slots graph's empty slots cost ~10% of a
        # one-row run (one stream decoded 51.3 against 56.6 tok/s, AMX Xeon, ad-hoc), worth a
        # second copy of the verify weights in memory (~1 GB for the 0.5B model's w8a8), loaded
        # only where rows speculate together (rows_session: the scheduler loads it when it calibrates).
        rows = model_dir / rows_file(VARIANT_FILES[verify_variant])
        self._rows_path = rows if rows.exists() and self.verify_max_tokens else None
        self._threads = threads
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.input_names if n.startswith("past_key_values")]
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]
        logits_shape = self.session.get_outputs()[0].shape
        self.vocab_size = int(logits_shape[-1]) if isinstance(logits_shape[-1], int) else \
            self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.provider = provider

    @functools.cached_property
    def rows_session(self):
        """The row-slots graph's session (KVBatch.verify_rows), loaded on first use; None
        where `make models` has not written it (speculating rows then run one at a time)."""
        return make_session(self._rows_path, self.provider, self._threads,
                            stop_spinning=self.stop_spinning) if self._rows_path else None

    @functools.cached_property
    def graph_slots(self) -> int:
        """Rows the row-slots graph has slots for (1 without it)."""
        s = self.rows_session
        return 1 + sum(i.name.startswith(self.past_names[0] + ".slot") for i in s.get_inputs()) if s else 1

    @functools.cached_property
    def row_slots(self) -> int:
        """Rows a verify run carries: the graph's slots."""
        return self.graph_slots

    @property
    def prefill_session(self):
        """The session that prefills prompts: the decode session unless the plan says otherwise."""
        return self._prefill_session or self.session

    @property
    def verify_session(self):
        """The session of speculative decoding's verify runs (KVBatch.verify): the decode's
        unless the plan says otherwise; a variant already loaded for another phase is shared."""
        if self.verify_variant == self.variant:
            return self.session
        return self.prefill_session if self.verify_variant == self.prefill_variant else self._verify_session

    def _json(self, name: str) -> dict:
        p = self.model_dir / name
        return json.loads(p.read_text()) if p.exists() else {}

    @staticmethod
    def _token_text(tok) -> str | None:
        if isinstance(tok, dict):
            return tok.get("content")
        return tok

    # ------------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @functools.cached_property
    def citation_token_ids(self) -> frozenset[int]:
        """Tokens that open a citation marker ("[", " [", "[1", ...): what a retried answer may
        not start with, besides EOS."""
        out = set()
        for tok, i in self.tokenizer.get_vocab(with_added_tokens=False).items():
            text = self.tokenizer.decode([i])
            if text.lstrip().startswith("["):
                out.add(i)
        return frozenset(out)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    @functools.cached_property
    def _chat_template(self):
        """The chat template compiled once (jinja2 compiles a template into Python code: ~16 ms
        for Qwen2.5's, which every RAG prompt paid twice, three quarters of building it)."""
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise jinja2.TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template)

    def render_chat(self, messages: list[dict]) -> str:
        """The model's chat template applied to `messages`, ready for the assistant's turn."""
        if not self.chat_template:
            raise Unavailable(f"model {self.name} has no chat template")
        return self._chat_template.render(messages=messages, add_generation_prompt=True,
                                          bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def warmup(self) -> None:
        kernels.warmup()
        self.generate_ids([self.encode("Hello")], SamplingParams(max_new_tokens=2))

    # ------------------------------------------------------------------ core loop
    def _empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self.past_names]

    def _steps(self, prompts: list[list[int]], rows: list[_Row],
               cancelled: Callable[[], bool] | None) -> Iterator[tuple[int, list[int]]]:
        """Drive the decoder; yields (step, indices of rows that got a token) after each step."""
        batch = KVBatch(self)
        reserve = max(len(p) for p in prompts) + max(r.params.max_new_tokens for r in rows)
        logits = None
        for i, p in enumerate(prompts):  # each prompt alone: a row costs only its own tokens
            row_logits, kv = self.prefill(p)
            if logits is None:
                logits = np.empty((len(prompts), row_logits.shape[0]), dtype=row_logits.dtype)
            logits[i] = row_logits
            batch.add(kv, min(reserve, self.window))
        active = list(range(len(prompts)))
        step = 0
        while True:
            for j, r in enumerate(active):
                row = rows[r]
                row.push(row.pick(logits[j]))
            step += 1
            yield step, list(active)
            if cancelled is not None and cancelled():
                for r in active:
                    rows[r].finish = rows[r].finish or FINISH_CANCELLED
            keep = [j for j, r in enumerate(active) if rows[r].finish is None]
            if len(keep) < len(active):  # finished rows leave the batch and its KV cache
                active = [active[j] for j in keep]
                batch.keep(keep)
            if not active:
                break
            if int(batch.lengths.max()) + 1 > self.window:
                for r in active:
                    rows[r].finish = FINISH_LENGTH
                break
            logits = batch.step(np.array([[rows[r].ids[-1]] for r in active], dtype=np.int64))

    def prefill(self, tokens: Sequence[int], past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run `tokens` after the one-row cache `past` (None: from the start) on the prefill
        weights. Returns (the last position's logits (vocab,), the cache extended by them).

        The kernels that run a token may depend on its row within the run (see row_padding);
        callers that split a prompt into chunks start every chunk at a multiple of 16
        positions, so each token keeps its row parity, and never end with a short chunk
        (Scheduler.last_chunk: short runs take other kernels), so chunked equals one-shot
        prefill (engine/scheduler.py)."""
        past = past if past is not None else self._empty_past(1)
        start, n = past[0].shape[2], len(tokens)
        feeds = {"input_ids": np.array([tokens], dtype=np.int64),
                 "attention_mask": np.ones((1, start + n), dtype=np.int64), **dict(zip(self.past_names, past))}
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None, :]
        # the machine's plan may prefill on other weights than it decodes on (engine/plan.py)
        outs = self.prefill_session.run(None, feeds)
        return outs[0][0, -1, :], outs[1:1 + len(self.past_names)]

    @property
    def verify_max_tokens(self) -> int:
        """Tokens a verify run may carry (KVBatch.verify); 0 if the graph returns the last
        position's logits only (a model folder from before short_run_logits: make models)."""
        return VERIFY_MAX_TOKENS if "short_run_logits" in self.manifest.get("graph_passes", []) else 0

    @functools.cached_property
    def row_padding(self) -> tuple[int, int]:
        """(k, m): a decode step over n rows runs max(m, ceil(n / k) * k) of them ((1, 1), no
        padding, on most CPUs).

        On an AVX-512 VNNI / AMX Xeon, int8 MatMulNBits computes rows in pairs and a last,
        odd row with a single-row kernel whose logits differ (by up to 0.47 there): a row
        alone, or third of three, got other logits than the same row in a pair, so a request's
        greedy tokens depended on the batch it decoded in (k = 2). On the AVX2 EPYC, int4's
        one-row kernel alone differs (by up to 0.19) and any 2 to 8 rows agree (m = 2).
        Measured once per generator, on a small random cache: steps of 1 to 8 identical rows;
        of the rules under which every row of every padded run is identical, the one that
        pads fewest rows over 1 to 8. The padding rows have one key of their own, never read
        by the real rows, so every real row takes the same kernels in any batch.
        """
        rng = np.random.default_rng(0)
        past = [(rng.standard_normal((1, self.num_kv_heads, 8, self.head_dim)) * 0.5).astype(np.float32)
                for _ in self.past_names]

        def run(rows: int) -> np.ndarray:
            feeds = {"input_ids": np.full((rows, 1), 100, np.int64), "attention_mask": np.ones((rows, 9), np.int64),
                     **{n: np.repeat(v, rows, axis=0) for n, v in zip(self.past_names, past)}}
            if "position_ids" in self.input_names:
                feeds["position_ids"] = np.full((rows, 1), 8, np.int64)
            return self.session.run(None, feeds)[0][:, -1]

        outs = {rows: run(rows) for rows in range(1, 9)}
        ref = outs[8][0]
        rule = padding_rule({rows: all(np.array_equal(r, ref) for r in out) for rows, out in outs.items()})
        if rule is None:
            log.warning("the decoder's rows depend on their batch on this CPU even in runs of 8 rows; "
                        "batched greedy output may differ from a request decoded alone")
            return 1, 1
        return rule

    def padded_rows(self, n: int) -> int:
        """The rows a decode step over n rows runs (see row_padding)."""
        return padded(self.row_padding, n)

    def describe_padding(self) -> str:
        k, m = self.row_padding
        if (k, m) == (1, 1):
            return "decode steps not padded"
        if m <= k:
            return f"decode steps padded to a multiple of {k} rows"
        if k == 1:
            return f"decode steps of fewer than {m} rows padded to {m}"
        return f"decode steps padded to a multiple of {k} rows, at least {m}"

    def _check_prompts(self, prompts: list[list[int]], params: SamplingParams) -> None:
        params.check(self.window)
        if not prompts:
            raise InvalidInput("no prompts given")
        for i, p in enumerate(prompts):
            if not p:
                raise InvalidInput(f"prompt {i} is empty")
            if len(p) + params.max_new_tokens > self.window:
                raise InvalidInput(f"prompt {i} has {len(p)} tokens; with max_new_tokens={params.max_new_tokens} "
                                   f"it exceeds the {self.window}-token context window. Shorten the prompt "
                                   "or lower max_new_tokens")

    # ------------------------------------------------------------------ public
    def stream_ids(self, prompt: list[int], params: SamplingParams, *,
                   cancelled: Callable[[], bool] | None = None) -> Iterator[str | Completion]:
        """Yields text deltas (never empty, whole characters), then one Completion."""
        self._check_prompts([prompt], params)
        row = _Row(self, len(prompt), params)
        t0 = time.perf_counter_ns()
        t_first = 0
        for step, _ in self._steps([prompt], [row], cancelled):
            if step == 1:
                t_first = time.perf_counter_ns()
            d = row.delta()
            if d:
                yield d
        d = row.delta()
        if d:
            yield d
        t_end = time.perf_counter_ns()
        yield Completion(text=row.text, finish_reason=row.finish or FINISH_LENGTH, prompt_tokens=len(prompt),
                         completion_tokens=len(row.ids) + (row.finish == FINISH_EOS),
                         token_ids=list(row.ids), prefill_ns=t_first - t0, decode_ns=t_end - t_first,
                         first_token_ns=t_first - t0)

    def stream(self, prompt: str, params: SamplingParams, **kw) -> Iterator[str | Completion]:
        return self.stream_ids(self.encode(prompt), params, **kw)

    def generate_ids(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Generate for several prompts at once (one batch); results in input order."""
        self._check_prompts(prompts, params)
        rows = [_Row(self, len(p), params) for p in prompts]
        t0 = time.perf_counter_ns()
        t_first = 0
        for step, _ in self._steps(prompts, rows, None):
            if step == 1:
                t_first = time.perf_counter_ns()
        t_end = time.perf_counter_ns()
        for r in rows:
            r.delta()
        return [Completion(text=r.text, finish_reason=r.finish or FINISH_LENGTH, prompt_tokens=r.prompt_len,
                           completion_tokens=len(r.ids) + (r.finish == FINISH_EOS), token_ids=list(r.ids),
                           prefill_ns=t_first - t0, decode_ns=t_end - t_first, first_token_ns=t_first - t0)
                for r in rows]

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        return self.generate_ids([self.encode(p) for p in prompts], params)
