"""engine/kernels.py against plain-Python references: gap classes, chunk selection, rescoring,
int8 quantization and the f32 index metric."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunk_reference import gap_class, reference_select
from engine import kernels
from engine.chunk import codepoints


def classes_of(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    starts = np.array([a for a, _ in offsets], dtype=np.int64)
    ends = np.array([b for _, b in offsets], dtype=np.int64)
    return kernels.gap_classes(codepoints(text), starts, ends).tolist()


def word_offsets(text: str) -> list[tuple[int, int]]:
    """Whitespace-separated words, with trailing . , ! ? split off as their own tokens."""
    import re

    return [m.span() for m in re.finditer(r"[^\s.,!?]+|[.,!?]", text)]


@pytest.mark.parametrize("text, expected", [
    ("one two", [kernels.GAP_WORD, kernels.GAP_END]),
    ("end. Next", [kernels.GAP_NONE, kernels.GAP_SENTENCE, kernels.GAP_END]),
    ("para\n\nnext", [kernels.GAP_PARAGRAPH, kernels.GAP_END]),
    ("para\n  \n next", [kernels.GAP_PARAGRAPH, kernels.GAP_END]),
    ("line\nnext", [kernels.GAP_SENTENCE, kernels.GAP_END]),
    ("a,b", [kernels.GAP_NONE, kernels.GAP_NONE, kernels.GAP_END]),
    ("日本\u3000語", [kernels.GAP_WORD, kernels.GAP_END]),
])
def test_gap_classes_known_cases(text, expected):
    assert classes_of(text, word_offsets(text)) == expected


def test_gap_classes_empty():
    empty = np.empty(0, np.int64)
    assert kernels.gap_classes(codepoints(""), empty, empty).shape == (0,)


@given(st.text(alphabet=st.sampled_from(list("ab .!?,\n\t\u00a0\u3002é日")), max_size=300))
@settings(max_examples=300, deadline=None)
def test_gap_classes_match_reference(text):
    offs = word_offsets(text)
    ref = [gap_class(text, offs[i][1], offs[i + 1][0]) for i in range(len(offs) - 1)] + [4] * bool(offs)
    assert classes_of(text, offs) == ref


@given(classes=st.lists(st.integers(0, 3), max_size=400), target=st.integers(1, 40), data=st.data())
@settings(max_examples=400, deadline=None)
def test_select_chunks_matches_reference_and_covers(classes, target, data):
    overlap = data.draw(st.integers(0, target - 1))
    if classes:
        classes[-1] = 4
    arr = np.array(classes, dtype=np.int8)
    first, last = kernels.select_chunks(arr, target, overlap)
    got = list(zip(first.tolist(), last.tolist()))
    assert got == reference_select(classes, target, overlap)
    n = len(classes)
    if n == 0:
        assert got == []
        return
    assert got[0][0] == 0 and got[-1][1] == n - 1
    for (a, b), (c, d) in zip(got, got[1:]):
        assert b - a + 1 <= target
        assert a < c <= b + 1, "chunks must advance and leave no token uncovered"
        assert b - c + 1 <= overlap
    assert all(b - a + 1 <= target for a, b in got)


def test_select_chunks_prefers_paragraph_then_sentence():
    # 20 tokens, target 10: window for the first chunk is tokens 5..9.
    classes = np.ones(20, dtype=np.int8)
    classes[6] = kernels.GAP_PARAGRAPH
    classes[8] = kernels.GAP_SENTENCE
    classes[-1] = kernels.GAP_END
    first, last = kernels.select_chunks(classes, 10, 0)
    assert last[0] == 6, "a paragraph break beats a later sentence end"
    classes[6] = kernels.GAP_WORD
    first, last = kernels.select_chunks(classes, 10, 0)
    assert last[0] == 8, "then the sentence end"
    classes[8] = kernels.GAP_WORD
    first, last = kernels.select_chunks(classes, 10, 0)
    assert last[0] == 9, "then the latest word gap"


def reference_rescore(queries, candidates, counts, vectors, k):
    rows, scores = [], []
    for q, cand, cnt in zip(queries, candidates, counts):
        pairs = sorted(((float(q @ vectors[c]), int(c)) for c in cand[:cnt] if c >= 0), reverse=True)[:k]
        rows.append([c for _, c in pairs] + [-1] * (k - len(pairs)))
        scores.append([s for s, _ in pairs] + [-np.inf] * (k - len(pairs)))
    return np.array(rows, dtype=np.int64).reshape(len(queries), k), np.array(scores).reshape(len(queries), k)


@pytest.mark.parametrize("nq", [1, 7, 64])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_rescore_topk_matches_reference(rng, nq, k):
    d, n, c = 24, 500, 10
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    queries = rng.standard_normal((nq, d)).astype(np.float32)
    cand = np.stack([rng.choice(n, c, replace=False) for _ in range(nq)]).astype(np.int64)
    counts = np.full(nq, c, dtype=np.int64)
    cand[0, -3:] = -1  # fewer candidates than asked for, marked -1 ...
    counts[-1] = c - 4  # ... or cut by the count (the entries past it are garbage)
    cand[-1, c - 4:] = n + 12345
    rows, scores = kernels.rescore_topk(queries, cand, counts, vectors, k)
    ref_rows, ref_scores = reference_rescore(queries, cand, counts, vectors, k)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_rescore_topk_empty_candidates():
    v = np.eye(3, dtype=np.float32)
    rows, scores = kernels.rescore_topk(v[:1], np.full((1, 4), -1, np.int64), np.array([4]), v, 2)
    assert rows.tolist() == [[-1, -1]] and np.isneginf(scores).all()
    rows, scores = kernels.rescore_topk(v[:1], np.array([[0, 1]]), np.array([0]), v, 2)
    assert rows.tolist() == [[-1, -1]] and np.isneginf(scores).all()
    rows, _ = kernels.rescore_topk(np.empty((0, 3), np.float32), np.empty((0, 4), np.int64),
                                   np.empty(0, np.int64), v, 2)
    assert rows.shape == (0, 2)


def reference_quantize_i8(x):
    out = np.zeros(x.shape, dtype=np.int8)
    for i, row in enumerate(x.astype(np.float64)):
        m = np.abs(row).max() if row.size else 0.0
        if m > 0:
            out[i] = np.clip(np.rint(row * (127.0 / m)), -127, 127)
    return out


@pytest.mark.parametrize("n, d", [(1, 1), (7, 13), (1024, 384), (0, 8), (3, 0)])
def test_quantize_i8_matches_reference(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    if n > 1:
        x[1] = 0.0  # an all-zero row stays zero
    got = kernels.quantize_i8(x)
    assert got.dtype == np.int8 and got.shape == (n, d)
    np.testing.assert_array_equal(got, reference_quantize_i8(x))
    if n and d:
        # every nonzero row uses the full range, and the cosine survives quantization
        nz = np.abs(x).max(1) > 0
        assert (np.abs(got[nz].astype(int)).max(1) == 127).all()
        g = got[nz].astype(np.float64)
        xn = x[nz].astype(np.float64)
        cos = (g * xn).sum(1) / np.linalg.norm(g, axis=1) / np.linalg.norm(xn, axis=1)
        assert cos.min() > (0.99 if d > 1 else 1 - 1e-9)


@pytest.mark.parametrize("n, d", [(1, 1), (7, 13), (1024, 384), (0, 8)])
def test_scale_i8_matches_reference(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    scale = 40.0  # components beyond 127 / 40 = 3.2 clip
    got = kernels.scale_i8(x, scale)
    ref = np.clip(np.rint(x.astype(np.float64) * scale), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("d", [1, 7, 384, 1024])
def test_ip_distance_f32_matches_reference(rng, d):
    a, b = rng.standard_normal((2, d)).astype(np.float32)
    call = kernels.ip_distance_f32.ctypes  # the same C entry point usearch calls
    pa, pb = (v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) for v in (a, b))
    got = call(pa, pb, d)
    assert got == pytest.approx(1.0 - float(a.astype(np.float64) @ b.astype(np.float64)), rel=1e-5, abs=1e-5)
    assert call(pa, pb, 0) == 1.0


def reference_fuse(dense, lexical, lex_scores, queries, vectors, n_out, method, alpha, c):
    """Plain-Python fusion (kernels.fuse's docstring), in float64."""
    out = []
    for i in range(len(dense)):
        ranks: dict[int, list] = {}  # row -> [dense rank, lexical rank, bm25]
        for lst, (rows, scores) in enumerate(((dense[i], None), (lexical[i], lex_scores[i]))):
            for rank, r in enumerate(rows.tolist(), start=1):
                if r < 0:
                    continue
                entry = ranks.setdefault(r, [0, 0, 0.0])
                if entry[lst] == 0:
                    entry[lst] = rank
                    if lst == 1:
                        entry[2] = float(scores[rank - 1])
        cos = {r: float(queries[i].astype(np.float64) @ vectors[r].astype(np.float64)) for r in ranks}
        score = {}
        for r, (dr, lr, bm) in ranks.items():
            if method == kernels.FUSE_CONVEX:
                lo, hi = min(cos.values()), max(cos.values())
                top = max(e[2] for e in ranks.values())
                dn = (cos[r] - lo) / (hi - lo) if hi > lo else 1.0
                score[r] = alpha * dn + (1 - alpha) * (bm / top if top > 0 else 0.0)
            else:
                wd, wl = (alpha, 1 - alpha) if method == kernels.FUSE_WEIGHTED_RRF else (1.0, 1.0)
                score[r] = (wd / (c + dr) if dr else 0.0) + (wl / (c + lr) if lr else 0.0)
        first_seen = {r: n for n, r in enumerate(ranks)}
        order = sorted(score, key=lambda r: (-score[r], first_seen[r]))[:n_out]
        out.append([(r, score[r], cos[r]) for r in order])
    return out


METHODS = [kernels.FUSE_RRF, kernels.FUSE_WEIGHTED_RRF, kernels.FUSE_CONVEX]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("nq, a, b, n_out", [(1, 1, 1, 1), (7, 10, 3, 5), (5, 4, 9, 20), (64, 30, 30, 10)])
def test_fuse_matches_reference(rng, method, nq, a, b, n_out):
    vectors = rng.standard_normal((50, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[rng.integers(0, 50, nq)] + 0.1
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    dense = np.stack([rng.permutation(50)[:a] for _ in range(nq)]).astype(np.int64)
    lexical = np.stack([rng.permutation(50)[:b] for _ in range(nq)]).astype(np.int64)
    lex_scores = -np.sort(-rng.uniform(0.5, 12.0, (nq, b)), axis=1).astype(np.float32)
    dense[::2, a // 2:] = -1  # lists shorter than their width
    lexical[1::3, :] = -1
    rows, fused, cosine = kernels.fuse(dense, lexical, lex_scores, queries, vectors, n_out, method, 0.7, 60.0)
    ref = reference_fuse(dense, lexical, lex_scores, queries, vectors, n_out, method, 0.7, 60.0)
    for i, want in enumerate(ref):
        got_rows = [r for r in rows[i].tolist() if r >= 0]
        # near-ties may order differently in float32 vs float64: compare scores, then rows
        np.testing.assert_allclose(fused[i, :len(want)], [s for _, s, _ in want], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(cosine[i, :len(want)], [x for _, _, x in want], rtol=1e-5, atol=1e-6)
        assert len(got_rows) == len(want)
        assert (rows[i, len(want):] == -1).all() and np.isneginf(cosine[i, len(want):]).all()
        assert sorted(got_rows) == sorted(r for r, _, _ in want) or len(want) == n_out


def test_fuse_empty_lists_and_one_candidate():
    v = np.eye(3, dtype=np.float32)
    none = np.full((1, 2), -1, np.int64)
    for method in METHODS:
        rows, fused, cosine = kernels.fuse(none, none, np.zeros((1, 2), np.float32), v[:1], v, 3, method, 0.5, 60.0)
        assert (rows == -1).all() and np.isneginf(cosine).all()
    rows, fused, _ = kernels.fuse(np.array([[2, -1]]), none, np.zeros((1, 2), np.float32), v[:1], v, 2,
                                  kernels.FUSE_CONVEX, 0.6, 60.0)
    assert rows[0].tolist() == [2, -1] and fused[0, 0] == pytest.approx(0.6)  # one cosine: spread 0 counts as 1


def test_rrf_rewards_agreement():
    v = np.eye(4, dtype=np.float32)
    dense = np.array([[0, 1, 2]], dtype=np.int64)
    lexical = np.array([[2, 3, -1]], dtype=np.int64)
    rows, _, _ = kernels.fuse(dense, lexical, np.array([[3.0, 2.0, 0.0]], np.float32), v[:1], v, 4,
                              kernels.FUSE_RRF, 0.5, 60.0)
    # 2 is in both lists; 1 and 3 tie (rank 2 in one list each) and keep the dense order.
    assert rows[0].tolist() == [2, 0, 1, 3]


def test_convex_keeps_a_clear_dense_winner():
    """RRF gives rank 1 in BM25 the weight of rank 1 in dense, whatever the margins; the
    convex combination keeps a semantic winner far ahead of the rest first."""
    v = np.array([[1, 0], [0.9, 0.436], [0.2, 0.98], [0.1, 0.995]], dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    query = v[:1]
    dense = np.array([[0, 1, 2, 3]])   # cosines 1.0, 0.9, 0.2, 0.1
    lexical = np.array([[2, 1, 3, 0]])  # a shared word ranks 2 first by a hair, 0 last
    bm25 = np.array([[1.05, 1.0, 1.0, 0.95]], np.float32)
    rrf, _, _ = kernels.fuse(dense, lexical, bm25, query, v, 4, kernels.FUSE_RRF, 0.5, 60.0)
    convex, _, _ = kernels.fuse(dense, lexical, bm25, query, v, 4, kernels.FUSE_CONVEX, 0.6, 60.0)
    assert rrf[0, 0] != 0  # rank 3 + rank 1 (row 2) beats rank 1 + rank 4
    assert convex[0, 0] == 0
