"""Numba kernels for the hot loops: chunk-boundary choice, the vector index's metric,
quantization and exact rescoring, hybrid-search fusion, and token sampling.

Each kernel is a pure module-level `@njit` function over arrays and scalars; the Python
wrappers in engine/chunk.py and engine/index.py cast their input once and call them.
Serial kernels use `cache=True` and `nogil=True` so server threads can run them in
parallel; none uses `parallel=True`, because Numba's default threading layer must not be
entered from several Python threads at once. Plain-Python references live in
tests/test_kernels.py and tests/test_chunk.py. `ip_distance_f32` is a `@cfunc`: usearch
calls it through a C function pointer from its own threads.
"""

from __future__ import annotations

import numpy as np
from numba import cfunc, njit, types

# Strength of the gap after a token, as the place to end a chunk.
GAP_NONE = 0       # inside a word: "play" | "##ing", or "word" | ","
GAP_WORD = 1       # whitespace between tokens
GAP_SENTENCE = 2   # whitespace after . ! ? (or a single line break)
GAP_PARAGRAPH = 3  # a blank line
GAP_END = 4        # after the last token of the text


@njit(cache=True, nogil=True, inline="always")
def _is_space(c):
    # Same set as tests' reference; Python's str.isspace also counts 0x1C-0x1F, which
    # tokenizers keep as tokens, so we do not.
    if c == 32 or (9 <= c <= 13):
        return True
    if c < 128:
        return False
    return (c == 0x85 or c == 0xA0 or c == 0x1680 or (0x2000 <= c <= 0x200A) or c == 0x2028
            or c == 0x2029 or c == 0x202F or c == 0x205F or c == 0x3000)


@njit(cache=True, nogil=True, inline="always")
def _ends_sentence(c):
    # . ! ? and their full-width / CJK forms
    return c == 46 or c == 33 or c == 63 or c == 0x3002 or c == 0xFF01 or c == 0xFF1F


@njit(cache=True, nogil=True)
def gap_classes(codepoints, starts, ends):
    """Class (GAP_*) of the gap after each token; `starts`/`ends` are char offsets."""
    n = starts.shape[0]
    out = np.zeros(n, dtype=np.int8)
    for i in range(n):
        if i == n - 1:
            out[i] = GAP_END
            break
        a = ends[i]
        b = starts[i + 1]
        newlines = 0
        space = False
        for j in range(a, b):
            c = codepoints[j]
            if c == 10:
                newlines += 1
            if _is_space(c):
                space = True
        if newlines >= 2:
            out[i] = GAP_PARAGRAPH
        elif space and (newlines == 1 or (a > 0 and _ends_sentence(codepoints[a - 1]))):
            out[i] = GAP_SENTENCE
        elif space:
            out[i] = GAP_WORD
        else:
            out[i] = GAP_NONE
    return out


@njit(cache=True, nogil=True, inline="always")
def _closes(c):
    # ) ] } " ' and the typographic quotes, which may follow a sentence's final mark
    return c == 41 or c == 93 or c == 125 or c == 34 or c == 39 or c == 0x2019 or c == 0x201D


@njit(cache=True, nogil=True)
def sentence_spans(codepoints):
    """(starts, ends) char spans of the sentences of a text, by the chunker's rule: a
    sentence ends at whitespace after . ! ? (closing brackets, quotes and citation markers
    like [2] may follow the mark) or at a line break. Spans exclude surrounding whitespace."""
    n = codepoints.shape[0]
    starts = np.empty(n // 2 + 1, dtype=np.int64)
    ends = np.empty(n // 2 + 1, dtype=np.int64)
    count = 0
    start = -1  # first char of the open sentence
    last = -1   # last non-space char seen
    i = 0
    while i < n:
        c = codepoints[i]
        if not _is_space(c):
            if start < 0:
                start = i
            last = i
            i += 1
            continue
        newline = False
        j = i
        while j < n and _is_space(codepoints[j]):
            if codepoints[j] == 10 or codepoints[j] == 13:
                newline = True
            j += 1
        if start >= 0:
            k = last
            while k > start:  # step back over closing marks and citation markers like [2]
                if codepoints[k] == 93:
                    m = k - 1
                    while m > start and 48 <= codepoints[m] <= 57:
                        m -= 1
                    if m < k - 1 and codepoints[m] == 91:
                        k = m - 1
                        continue
                if not _closes(codepoints[k]):
                    break
                k -= 1
            if newline or _ends_sentence(codepoints[k]):
                starts[count] = start
                ends[count] = last + 1
                count += 1
                start = -1
        i = j
    if start >= 0:
        starts[count] = start
        ends[count] = last + 1
        count += 1
    return starts[:count].copy(), ends[:count].copy()


@njit(cache=True, nogil=True)
def select_chunks(classes, target, overlap):
    """Token ranges [first, last] of chunks of at most `target` tokens.

    A chunk that cannot take the rest of the text ends in the second half of its window at
    the strongest gap, the latest one among equals; the next chunk starts `overlap` tokens
    before the end, moved forward to the first token that begins a word.
    """
    n = classes.shape[0]
    first = np.empty(n, dtype=np.int64)
    last = np.empty(n, dtype=np.int64)
    m = 0
    s = 0
    while s < n:
        if n - s <= target:
            e = n - 1
        else:
            hi = s + target - 1
            lo = s + target // 2
            best = hi
            best_class = classes[hi]
            for j in range(hi - 1, lo - 1, -1):
                if classes[j] > best_class:
                    best = j
                    best_class = classes[j]
            e = best
        first[m] = s
        last[m] = e
        m += 1
        if e >= n - 1:
            break
        nxt = e + 1 - overlap
        if nxt <= s:
            nxt = s + 1
        while nxt <= e and classes[nxt - 1] < GAP_WORD:
            nxt += 1
        s = nxt
    return first[:m], last[:m]


@njit(cache=True, nogil=True, fastmath=True)
def rescore_topk(queries, candidates, counts, vectors, k):
    """Exact inner products of each query with its candidate rows of `vectors`; top k.

    `candidates` is (q, c) int64 row numbers; only the first counts[i] of row i are read
    (the index returned fewer), and -1 entries are skipped too. Vectors are unit length,
    so the inner product is the cosine similarity. Returns (rows, scores), both (q, k),
    best first (ties keep candidate order), with -1 / -inf padding.
    """
    q, c = candidates.shape
    d = queries.shape[1]
    out_rows = np.full((q, k), -1, dtype=np.int64)
    out_scores = np.full((q, k), -np.inf, dtype=np.float32)
    for i in range(q):
        filled = 0
        for j in range(min(c, counts[i])):
            r = candidates[i, j]
            if r < 0:
                continue
            s = np.float32(0.0)
            for t in range(d):
                s += queries[i, t] * vectors[r, t]
            # Insertion into the sorted top k: k and c are tens, cheaper than a sort.
            if filled == k and not s > out_scores[i, k - 1]:
                continue
            p = filled if filled < k else k - 1
            while p > 0 and s > out_scores[i, p - 1]:
                out_scores[i, p] = out_scores[i, p - 1]
                out_rows[i, p] = out_rows[i, p - 1]
                p -= 1
            out_scores[i, p] = s
            out_rows[i, p] = r
            if filled < k:
                filled += 1
    return out_rows, out_scores


@njit(cache=True, nogil=True)
def quantize_i8(x):
    """Rows of `x` as int8, each scaled so its largest |component| becomes 127, rounded.

    usearch's own f32 -> i8 cast normalises to unit length and multiplies by 127, which
    leaves MiniLM components (|x| ~0.05, max ~0.16) only ~6-20 levels; this scaling uses
    all 255 levels for every row. The cosine metric is scale invariant, so the per-row
    factor needs no bookkeeping. All-zero rows stay zero.
    """
    n, d = x.shape
    out = np.empty((n, d), dtype=np.int8)
    for i in range(n):
        m = 0.0
        for t in range(d):
            a = abs(np.float64(x[i, t]))
            if a > m:
                m = a
        s = 127.0 / m if m > 0.0 else 0.0
        for t in range(d):
            v = np.rint(np.float64(x[i, t]) * s)
            out[i, t] = np.int8(min(127.0, max(-127.0, v)))
    return out


@njit(cache=True, nogil=True)
def scale_i8(x, scale):
    """`x * scale` rounded to int8, clipped to [-127, 127]: one scale for every row."""
    n, d = x.shape
    out = np.empty((n, d), dtype=np.int8)
    for i in range(n):
        for t in range(d):
            v = np.rint(np.float64(x[i, t]) * scale)
            out[i, t] = np.int8(min(127.0, max(-127.0, v)))
    return out


@cfunc(types.float32(types.CPointer(types.float32), types.CPointer(types.float32), types.uint64),
       cache=True, fastmath=True)
def ip_distance_f32(a, b, n):
    """1 - <a, b> over n float32s: usearch's metric for f32 indexes (a C callback).

    On unit vectors this is the cosine distance. usearch's built-in f32 cosine accumulates
    in float64 and recomputes both norms per call; this was 1.5-1.7x faster per search
    on SQuAD MiniLM vectors (benchmarks/ann.py).
    """
    s = np.float32(0.0)
    for i in range(n):
        s += a[i] * b[i]
    return np.float32(1.0) - s


# ---------------------------------------------------------------------- sampling
# Tokens whose logit is this many temperature-scaled units below the best have relative
# probability < e^-30 (~1e-13): dropping them before sorting makes sampling O(V) + a small
# sort instead of sorting the whole vocabulary (150k for Qwen) every token.
SAMPLE_LOGIT_WINDOW = 30.0


@njit(cache=True, nogil=True)
def apply_repetition_penalty(logits, seen, penalty):
    """In place, as transformers does: logits of seen tokens divided by penalty if positive,
    multiplied if negative. `seen` is a uint8 mask over the vocabulary."""
    for i in range(logits.shape[0]):
        if seen[i]:
            x = logits[i]
            logits[i] = x * penalty if x < 0 else x / penalty


@njit(cache=True, nogil=True)
def argmax(logits):
    best = 0
    v = logits[0]
    for i in range(1, logits.shape[0]):
        if logits[i] > v:
            v = logits[i]
            best = i
    return best


@njit(cache=True, nogil=True)
def sample_token(logits, temperature, top_k, top_p, u):
    """One token id from `logits` with temperature, top-k (0 = off), top-p (1 = off).

    `u` is a uniform [0, 1) draw from the caller's seeded generator, so the same seed gives
    the same tokens. temperature <= 0 means greedy.
    """
    if temperature <= 0.0:
        return argmax(logits)
    n = logits.shape[0]
    top = logits[argmax(logits)]
    cand = np.empty(n, dtype=np.int64)
    m = 0
    for i in range(n):
        if (logits[i] - top) / temperature > -SAMPLE_LOGIT_WINDOW:
            cand[m] = i
            m += 1
    cand = cand[:m]
    probs = np.empty(m, dtype=np.float64)
    for j in range(m):
        probs[j] = np.exp((logits[cand[j]] - top) / temperature)
    order = np.argsort(-probs, kind="mergesort")  # stable: ties keep vocabulary order
    keep = m if top_k <= 0 or top_k > m else top_k
    total = 0.0
    for j in range(keep):
        total += probs[order[j]]
    if top_p < 1.0:
        cum = 0.0
        cut = keep
        for j in range(keep):
            cum += probs[order[j]] / total
            if cum >= top_p:
                cut = j + 1
                break
        keep = cut
        total = 0.0
        for j in range(keep):
            total += probs[order[j]]
    target = u * total
    acc = 0.0
    for j in range(keep):
        acc += probs[order[j]]
        if acc > target:
            return cand[order[j]]
    return cand[order[keep - 1]]


FUSE_RRF = 0
FUSE_WEIGHTED_RRF = 1
FUSE_CONVEX = 2


@njit(cache=True, nogil=True)
def fuse(dense, lexical, lex_scores, queries, vectors, n_out, method, alpha, c):
    """Fusion of a dense and a lexical ranked candidate list per query, with exact cosines.

    `dense` (q, a) and `lexical` (q, b) are int64 row numbers, best first, -1 padded;
    `lex_scores` (q, b) the lexical (BM25) scores beside `lexical`. Every candidate's cosine
    is the inner product of its row in `vectors` with the unit query. A candidate scores:
      FUSE_RRF           sum over the lists it is in of 1 / (c + rank), rank from 1
      FUSE_WEIGHTED_RRF  alpha / (c + dense rank) + (1 - alpha) / (c + lexical rank)
      FUSE_CONVEX        alpha * (cos - min cos) / (max cos - min cos) + (1 - alpha) * bm25 / max bm25,
                         min and max over the query's candidates; bm25 is 0 outside the
                         lexical list (a constant spread counts as 1 for everyone)
    Returns (rows, fused, cosine), each (q, n_out), best fused first (ties keep the dense
    order, then the lexical), -1 / 0 / -inf padded.
    """
    q, a = dense.shape
    b = lexical.shape[1]
    d = queries.shape[1]
    rows = np.full((q, n_out), -1, dtype=np.int64)
    fused = np.zeros((q, n_out), dtype=np.float32)
    cosine = np.full((q, n_out), -np.inf, dtype=np.float32)
    cand = np.empty(a + b, dtype=np.int64)
    dense_rank = np.empty(a + b, dtype=np.int64)
    lex_rank = np.empty(a + b, dtype=np.int64)
    lex = np.empty(a + b, dtype=np.float64)
    cos = np.empty(a + b, dtype=np.float64)
    score = np.empty(a + b, dtype=np.float64)
    for i in range(q):
        m = 0
        for lst in range(2):
            width = a if lst == 0 else b
            for j in range(width):
                r = dense[i, j] if lst == 0 else lexical[i, j]
                if r < 0:
                    continue
                at = -1
                for t in range(m):
                    if cand[t] == r:
                        at = t
                        break
                if at < 0:
                    at = m
                    cand[m] = r
                    dense_rank[m] = 0
                    lex_rank[m] = 0
                    lex[m] = 0.0
                    m += 1
                if lst == 0:
                    if dense_rank[at] == 0:
                        dense_rank[at] = j + 1
                elif lex_rank[at] == 0:
                    lex_rank[at] = j + 1
                    lex[at] = lex_scores[i, j]
        if m == 0:
            continue
        lo = np.inf
        hi = -np.inf
        lex_hi = 0.0
        for t in range(m):
            s = np.float32(0.0)
            r = cand[t]
            for u in range(d):
                s += queries[i, u] * vectors[r, u]
            cos[t] = s
            lo = min(lo, cos[t])
            hi = max(hi, cos[t])
            lex_hi = max(lex_hi, lex[t])
        for t in range(m):
            if method == FUSE_CONVEX:
                dn = (cos[t] - lo) / (hi - lo) if hi > lo else 1.0
                ln = lex[t] / lex_hi if lex_hi > 0 else 0.0
                score[t] = alpha * dn + (1.0 - alpha) * ln
            else:
                wd = alpha if method == FUSE_WEIGHTED_RRF else 1.0
                wl = 1.0 - alpha if method == FUSE_WEIGHTED_RRF else 1.0
                score[t] = 0.0
                if dense_rank[t] > 0:
                    score[t] += wd / (c + dense_rank[t])
                if lex_rank[t] > 0:
                    score[t] += wl / (c + lex_rank[t])
        order = np.argsort(-score[:m], kind="mergesort")
        for j in range(min(n_out, m)):
            t = order[j]
            rows[i, j] = cand[t]
            fused[i, j] = score[t]
            cosine[i, j] = cos[t]
    return rows, fused, cosine


def warmup() -> None:
    """Compile (or load from cache) every kernel once, so no request pays for it."""
    cps = np.frombuffer("a b.\n\nc".encode("utf-32-le"), dtype=np.uint32)
    starts = np.array([0, 2, 3, 6], dtype=np.int64)
    ends = np.array([1, 3, 4, 7], dtype=np.int64)
    select_chunks(gap_classes(cps, starts, ends), 2, 1)
    v = np.eye(2, dtype=np.float32)
    rescore_topk(v, np.array([[0, 1], [1, -1]], dtype=np.int64), np.array([2, 1], dtype=np.int64), v, 1)
    quantize_i8(v)
    scale_i8(v, 127.0)
    for method in (FUSE_RRF, FUSE_WEIGHTED_RRF, FUSE_CONVEX):
        fuse(np.array([[0, 1]], dtype=np.int64), np.array([[1, -1]], dtype=np.int64),
             np.array([[2.0, 0.0]], dtype=np.float32), v[:1], v, 2, method, 0.5, 60.0)
    logits = np.array([0.5, 2.0, -1.0], dtype=np.float32)
    apply_repetition_penalty(logits, np.array([1, 0, 1], dtype=np.uint8), 1.2)
    sample_token(logits, 0.7, 2, 0.9, 0.5)
