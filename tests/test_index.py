"""engine/index.py: usearch HNSW per dtype, recall vs exact search, rescoring, atomic save/load."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import InvalidInput
from engine.index import INDEX_FILE, VectorIndex


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng, n, d, centers=50):
    """Vectors in clusters, like real embeddings (uniform random vectors have no neighbours)."""
    c = unit(rng, centers, d)
    x = c[rng.integers(0, centers, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make(dtype, d=32, **kw):
    args = dict(ndim=d, dtype=dtype, connectivity=16, expansion_add=128, expansion_search=128)
    args.update(kw)
    return VectorIndex(**args)


def exact_topk(data, queries, k):
    return np.argsort(-(queries @ data.T), axis=1)[:, :k]


def recall(found, truth):
    return np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth)])


@pytest.mark.parametrize("dtype", ["f32", "f16", "i8"])
def test_recall_against_exact_search(rng, dtype):
    data = clustered(rng, 3000, 32)
    queries = clustered(np.random.default_rng(7), 100, 32)
    ix = make(dtype)
    ix.add(np.arange(len(data)), data)
    truth = exact_topk(data, queries, 10)
    keys, scores = ix.search(queries, 10, exact_vectors=None if dtype == "f32" else data, oversample=4)
    assert recall(keys, truth) >= 0.95
    # scores are cosine similarities, best first
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    if dtype != "f32":
        # rescored scores are the exact f32 inner products
        exact = np.einsum("qd,qkd->qk", queries, data[keys])
        np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-5)


def test_rescoring_restores_f32_ranking(rng):
    data = clustered(rng, 3000, 32)
    queries = clustered(np.random.default_rng(8), 100, 32)
    truth = exact_topk(data, queries, 10)
    ix = make("i8")
    ix.add(np.arange(len(data)), data)
    plain, _ = ix.search(queries, 10)
    rescored, _ = ix.search(queries, 10, exact_vectors=data, oversample=4)
    assert recall(rescored, truth) >= recall(plain, truth)
    # top-1 order agrees with exact search far more often after rescoring
    assert np.mean(rescored[:, 0] == truth[:, 0]) >= 0.95


def test_fewer_vectors_than_k(rng):
    data = unit(rng, 3, 8)
    ix = make("f32", d=8)
    ix.add(np.array([10, 11, 12]), data)
    keys, scores = ix.search(data[:1], 5)
    assert sorted(keys[0, :3].tolist()) == [10, 11, 12]
    assert keys[0, 3:].tolist() == [-1, -1] and np.isneginf(scores[0, 3:]).all()
    assert keys[0, 0] == 10 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    empty = make("f32", d=8)
    keys, _ = empty.search(data, 2)
    assert (keys == -1).all()


def test_remove_and_sync(rng):
    data = unit(rng, 50, 8)
    ix = make("f32", d=8)
    ix.add(np.arange(50), data)
    ix.remove(np.array([3, 4]))
    assert len(ix) == 48 and 3 not in ix.search(data[3:4], 50)[0]
    changed = ix.sync(np.arange(10, 60), np.vstack([data, unit(rng, 10, 8)]), generation=7)
    assert set(ix.keys().tolist()) == set(range(10, 60))
    assert changed == 8 + 10  # keys 0-9 except 3 and 4 removed, 50-59 added
    assert ix.generation == 7


def test_unsupported_dtype():
    with pytest.raises(InvalidInput, match="f64"):
        make("f64")


def test_save_load_roundtrip_and_atomicity(tmp_path, rng):
    data = unit(rng, 200, 16)
    ix = make("i8", d=16)
    ix.add(np.arange(200), data)
    ix.generation = 3
    ix.save(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    loaded = VectorIndex.load(tmp_path, ndim=16, dtype="i8", connectivity=16, expansion_add=128,
                              expansion_search=128)
    assert len(loaded) == 200 and loaded.generation == 3
    np.testing.assert_array_equal(loaded.search(data[:5], 3)[0], ix.search(data[:5], 3)[0])
    # A torn index file (crash while an older tool wrote in place) loads as empty, never crashes:
    # the engine then rebuilds it from the store.
    (tmp_path / INDEX_FILE).write_bytes((tmp_path / INDEX_FILE).read_bytes()[:100])
    broken = VectorIndex.load(tmp_path, ndim=16, dtype="i8", connectivity=16, expansion_add=128,
                              expansion_search=128)
    assert len(broken) == 0 and broken.generation == 0


@pytest.mark.parametrize("dtype, spiky", [("f32", False), ("i8", False), ("i8", True)])
def test_metric_ranks_as_exact_cosine_and_survives_save_load(tmp_path, rng, dtype, spiky):
    # f32 searches with our compiled inner product, i8 with our quantization (one scale and
    # inner product, or per-row scales and cosine when one row is far spikier than the
    # rest); with ef as large as the index, HNSW is exhaustive: exact search's ranking.
    data = clustered(rng, 1000, 48)
    if spiky:
        data[0] = np.eye(48, dtype=np.float32)[0]
    queries = clustered(np.random.default_rng(9), 50, 48)
    ix = make(dtype, d=48, expansion_search=1000)
    ix.add(np.arange(len(data)), data)
    if dtype == "i8":
        assert ix._i8_ip is not spiky
    truth = exact_topk(data, queries, 10)
    exact_scores = np.take_along_axis(queries @ data.T, truth, 1)
    keys, scores = ix.search(queries, 10, exact_vectors=data if dtype == "i8" else None, oversample=4)
    np.testing.assert_array_equal(keys, truth)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-5)
    ix.save(tmp_path)
    loaded = VectorIndex.load(tmp_path, ndim=48, dtype=dtype, connectivity=16, expansion_add=128,
                              expansion_search=1000)
    if dtype == "f32":
        # Only an inner product (ours) scales with the query's length; usearch's cosine,
        # which load() would otherwise leave in place, does not.
        _, doubled = loaded.search(2 * queries[:1], 1)
        assert doubled[0, 0] == pytest.approx(2 * exact_scores[0, 0], rel=1e-4)
    keys2, scores2 = loaded.search(queries, 10, exact_vectors=data if dtype == "i8" else None, oversample=4)
    np.testing.assert_array_equal(keys2, truth)
    np.testing.assert_allclose(scores2, scores, rtol=1e-6, atol=1e-6)
    if dtype == "i8":
        # unrescored i8 scores are cosines too (integer dot products divided by both scales)
        assert loaded.i8_scale == ix.i8_scale and loaded._i8_ip == ix._i8_ip
        raw_keys, raw_scores = loaded.search(queries, 10)
        exact_raw = np.einsum("qd,qkd->qk", queries, data[raw_keys])
        np.testing.assert_allclose(raw_scores, exact_raw, atol=0.02)
    # adds after a load go through the same metric / quantization
    loaded.add(np.array([5000]), queries[:1])
    assert loaded.search(queries[:1], 1)[0][0, 0] == 5000


@pytest.mark.parametrize("dtype", ["f32", "i8"])
def test_loads_index_files_written_by_plain_usearch(tmp_path, rng, dtype):
    # Files saved before the compiled metric and our i8 quantization (usearch "cos", its own
    # f32 -> i8 cast) still load, search, and take new rows.
    from usearch.index import Index

    data = clustered(rng, 800, 32)
    old = Index(ndim=32, metric="cos", dtype=dtype, connectivity=16, expansion_add=128, expansion_search=800)
    old.add(np.arange(800, dtype=np.uint64), data[:800], threads=1)
    old.save(str(tmp_path / INDEX_FILE))
    (tmp_path / "index.json").write_text('{"generation": 5, "size": 800, "removed": 0}')
    ix = VectorIndex.load(tmp_path, ndim=32, dtype=dtype, connectivity=16, expansion_add=128,
                          expansion_search=800)
    assert len(ix) == 800 and ix.generation == 5
    queries = data[:20]
    keys, _ = ix.search(queries, 10, exact_vectors=data if dtype == "i8" else None, oversample=4)
    np.testing.assert_array_equal(keys, exact_topk(data, queries, 10))
