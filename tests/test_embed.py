"""engine/embed.py: the behaviour callers rely on, on the real default model.

Length sorting, token-budget batching and per-batch padding are internal; these tests
check that none of them shows: vectors come back in input order and do not depend on
which other texts share a batch (exactly for fp32, closely for int8, whose activation
scale is computed per batch).
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


def test_int8_batch_composition_changes_little(embedder):
    # Dynamic quantization picks one activation scale per batch, so int8 vectors depend
    # slightly on the batch; they must still be the same vector for retrieval purposes.
    batch = embedder.embed(TEXTS)
    single = np.stack([embedder.embed([t])[0] for t in TEXTS])
    assert ((batch * single).sum(1) > 0.995).all()


def test_padding_does_not_change_result(fp32):
    # A small budget still puts both in one batch only if the long one fits; use a big one.
    emb = Embedder(MODEL_DIR, variant="fp32", threads=2, batch_max_tokens=8192)
    short = "Vector search finds the nearest embeddings to a query."
    alone = emb.embed([short])[0]
    padded = emb.embed([LONG * 3, short, LONG])[1]  # one batch, short row padded to ~256
    np.testing.assert_allclose(alone, padded, atol=1e-5)


@pytest.mark.parametrize("budget, max_batch", [(1, 1), (300, 2), (100_000, 128)])
def test_batching_settings_do_not_change_vectors(fp32, budget, max_batch):
    emb = Embedder(MODEL_DIR, variant="fp32", threads=2, batch_max_tokens=budget, max_batch=max_batch)
    np.testing.assert_allclose(emb.embed(TEXTS), fp32.embed(TEXTS), atol=1e-5)


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
