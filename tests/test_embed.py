"""engine/embed.py: the behaviour callers rely on, on the real default model.

Length sorting, worker threads, and (CUDA's) token-budget batching with padding are
internal; these tests check that none of them shows: vectors come back in input order and
do not depend on which other texts are embedded in the same call.
"""

from __future__ import annotations

import inspect
import textwrap

import numpy as np
import pytest

from engine.config import DEFAULT_MODELS_DIR
from engine.embed import Embedder
from engine.errors import InvalidInput, Unavailable

MODEL_DIR = DEFAULT_MODELS_DIR / "all-MiniLM-L6-v2"

# Real text of very different lengths: a few words up to several hundred tokens.
LONG = textwrap.dedent(inspect.getdoc(inspect.signature) or "") + " " + (inspect.getdoc(textwrap.TextWrapper) or "")
TEXTS = [
    "Vector search finds the nearest embeddings to a query.",
    "Hi",
    (inspect.getdoc(textwrap.dedent) or "") * 2,
    "A cat sat on the mat while the dog slept by the fire.",
    LONG * 3,
    "SELECT * FROM chunks WHERE doc_id = ?",
    (inspect.getdoc(inspect.getsource) or ""),
    "Numba compiles Python loops to machine code.",
]


@pytest.fixture(scope="module")
def fp32() -> Embedder:
    emb = Embedder(MODEL_DIR, variant="fp32", threads=2)
    emb.warmup()
    return emb


@pytest.fixture(scope="module", params=["fp32", "int8"])
def any_variant(request, fp32, embedder) -> Embedder:
    return fp32 if request.param == "fp32" else embedder


def test_shape_dtype_unit_norm(any_variant):
    v = any_variant.embed(TEXTS)
    assert v.shape == (len(TEXTS), any_variant.dim) == (len(TEXTS), 384)
    assert v.dtype == np.float32
    assert v.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(v).all()


def test_attributes(embedder):
    assert embedder.name == "all-MiniLM-L6-v2"
    assert embedder.max_length == 256
    assert embedder.special_tokens == 2  # [CLS] ... [SEP]
    assert embedder.raw_tokenizer.encode("hello world", add_special_tokens=False).ids
    assert embedder.count_tokens(["hello world", "Hi"]) == [4, 3]


def test_empty_list(embedder):
    assert embedder.embed([]).shape == (0, 384)
    assert list(embedder.embed_iter([])) == []


def test_order_preserved_and_batch_equals_one_by_one(fp32):
    batch = fp32.embed(TEXTS)
    single = np.stack([fp32.embed([t])[0] for t in TEXTS])
    np.testing.assert_allclose(batch, single, atol=1e-5)
    rev = fp32.embed(TEXTS[::-1])[::-1]
    np.testing.assert_allclose(batch, rev, atol=1e-5)


def padded_batches(budget: int, max_batch: int = 128, threads: int = 1) -> Embedder:
    """An fp32 CPU embedder that batches the way the CUDA provider does: sorted by length,
    padded per batch, masked. Lets a CPU-only machine test that path."""
    emb = Embedder(MODEL_DIR, variant="fp32", threads=threads, batch_max_tokens=budget, max_batch=max_batch)
    emb.provider = "cuda"  # only _batches reads it after construction
    return emb


def test_cpu_runs_each_text_alone(fp32):
    lengths = np.array([5, 200, 17, 17, 90])
    assert [b.tolist() for b in fp32._batches(lengths)] == [[1], [4], [2], [3], [0]]
    batched = padded_batches(4096)
    assert [b.tolist() for b in batched._batches(lengths)] == [[1, 4, 2, 3, 0]]
    assert [b.tolist() for b in padded_batches(256)._batches(lengths)] == [[1], [4, 2], [3, 0]]


def test_int8_vector_does_not_depend_on_its_neighbours(embedder):
    # Each text is its own call on CPU, so int8's per-call activation scale sees only it.
    batch = embedder.embed(TEXTS)
    single = np.stack([embedder.embed([t])[0] for t in TEXTS])
    np.testing.assert_array_equal(batch, single)


def test_padding_does_not_change_result():
    emb = padded_batches(8192)
    short = "Vector search finds the nearest embeddings to a query."
    alone = emb.embed([short])[0]
    padded = emb.embed([LONG * 3, short, LONG])[1]  # one batch, the short row padded to 256
    np.testing.assert_allclose(alone, padded, atol=1e-5)


@pytest.mark.parametrize("budget, max_batch, threads", [(1, 1, 1), (300, 2, 1), (100_000, 128, 1), (512, 128, 3)])
def test_padded_batching_gives_the_same_vectors(fp32, budget, max_batch, threads):
    emb = padded_batches(budget, max_batch, threads)
    np.testing.assert_allclose(emb.embed(TEXTS), fp32.embed(TEXTS), atol=1e-5)


@pytest.mark.parametrize("threads", [1, 3])
def test_worker_count_does_not_change_vectors(fp32, threads):
    emb = Embedder(MODEL_DIR, variant="fp32", threads=threads, batch_max_tokens=512)
    texts = TEXTS * 4
    np.testing.assert_allclose(emb.embed(texts), fp32.embed(texts), atol=1e-5)


def test_concurrent_callers_share_one_embedder(fp32):
    # Server threads call embed() at once; the workers and the session are shared.
    from concurrent.futures import ThreadPoolExecutor

    groups = [TEXTS[i:] + TEXTS[:i] for i in range(6)]
    expected = [fp32.embed(g) for g in groups]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(fp32.embed, groups))
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_truncation_to_model_window(fp32):
    text = " ".join(["Tokenizers split text into word pieces before the encoder sees it."] * 60)
    assert len(fp32.raw_tokenizer.encode(text, add_special_tokens=False).ids) > 600
    assert fp32.count_tokens([text]) == [256]
    window = fp32.max_length - fp32.special_tokens
    offsets = fp32.raw_tokenizer.encode(text, add_special_tokens=False).offsets
    prefix = text[:offsets[window - 1][1]]  # exactly the first 254 word pieces
    assert fp32.count_tokens([prefix]) == [256]
    a, b = fp32.embed([text])[0], fp32.embed([text])[0]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, fp32.embed([prefix])[0], atol=1e-5)


@pytest.mark.parametrize("bad", ["", "   ", "\n\t "])
def test_empty_or_whitespace_text_is_invalid(embedder, bad):
    with pytest.raises(InvalidInput, match="text 1 is empty"):
        embedder.embed(["fine", bad])


def test_non_string_is_invalid(embedder):
    with pytest.raises(InvalidInput, match="expected str"):
        embedder.embed(["fine", None])  # type: ignore[list-item]


def test_cuda_without_cuda_is_unavailable():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(Unavailable, match="onnxruntime-gpu") as exc:
        Embedder(MODEL_DIR, variant="int8", provider="cuda")
    assert "'cuda'" in str(exc.value) and "provider 'cpu'" in str(exc.value)


def test_unknown_provider_or_variant_is_invalid():
    with pytest.raises(InvalidInput, match="provider"):
        Embedder(MODEL_DIR, provider="tpu")
    with pytest.raises(InvalidInput, match="variant"):
        Embedder(MODEL_DIR, variant="fp8")


def test_missing_model_dir_is_unavailable(tmp_path):
    with pytest.raises(Unavailable, match="make models"):
        Embedder(tmp_path / "no-such-model")


def test_embed_iter_streams_in_order(fp32):
    texts = TEXTS * 3
    pulled = []

    def source():
        for t in texts:
            pulled.append(t)
            yield t

    it = fp32.embed_iter(source(), window=5)
    first = next(it)
    assert first.shape == (5, 384)
    assert len(pulled) == 5, "holds one window, not the whole input"
    blocks = [first, *it]
    assert [len(b) for b in blocks] == [5, 5, 5, 5, 4]
    np.testing.assert_allclose(np.concatenate(blocks), fp32.embed(texts), atol=1e-5)


def test_paraphrase_closer_than_unrelated(any_variant):
    a, para, other = any_variant.embed([
        "How do I reset my password?",
        "What are the steps to change a forgotten password?",
        "The recipe needs two cups of flour and an egg.",
    ])
    assert a @ para > a @ other + 0.3
