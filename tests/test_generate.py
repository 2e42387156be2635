"""engine/generate.py on the real default model: KV-cache decoding equals transformers,
streaming is UTF-8 safe, sampling is reproducible, stops and limits give the right reason."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest

from engine.config import Config
from engine.errors import InvalidInput
from engine.generate import (FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Completion, Generator, KVBatch, SamplingParams,
                             draft_match, lookup_draft)

REPO = Path(__file__).resolve().parent.parent
HF_DIR = REPO / ".cache" / "hf" / "qwen2.5-coder-0.5b-instruct"  # written by `make models`
GREEDY = SamplingParams(max_new_tokens=24)


def chat(gen, text):
    return gen.render_chat([{"role": "user", "content": text}])


def test_greedy_is_token_identical_to_transformers(config):
    """fp32 ONNX with KV cache vs transformers PyTorch generate(do_sample=False)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    gen = Generator(config.gen_model_dir, variant="fp32", threads=2)
    prompts = [chat(gen, "What is a binary search? One sentence."),
               chat(gen, "Name three primary colours."),
               "def fibonacci(n):"]
    ours = [c.token_ids + ([] if c.finish_reason != FINISH_EOS else ["eos"])
            for c in (gen.generate([p], GREEDY)[0] for p in prompts)]
    ids = [gen.encode(p) for p in prompts]
    del gen
    gc.collect()
    model = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    model.eval()
    for prompt_ids, mine in zip(ids, ours):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                 max_new_tokens=GREEDY.max_new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=[151643, 151645], pad_token_id=151643)
        theirs = out[0, len(prompt_ids):].tolist()
        if theirs and theirs[-1] in (151643, 151645):
            theirs = theirs[:-1] + ["eos"]
        assert mine == theirs
    del model
    gc.collect()


def collect(stream):
    deltas, final = [], None
    for ev in stream:
        if isinstance(ev, Completion):
            final = ev
        else:
            deltas.append(ev)
    return deltas, final


@pytest.mark.parametrize("request_text", [
    "Write one short sentence in Chinese about tea.",
    "Reply with three different emoji and nothing else.",
    "Écris une phrase en français avec des accents: é, è, ç, à.",
])
def test_stream_deltas_are_whole_characters_and_concatenate(generator, request_text):
    deltas, final = collect(generator.stream(chat(generator, request_text), SamplingParams(max_new_tokens=40)))
    assert "".join(deltas) == final.text
    assert all(deltas) and all("\ufffd" not in d for d in deltas)
    assert final.text == generator.decode(final.token_ids)
    assert any(ord(ch) > 127 for ch in final.text), "the answer exercises multi-byte characters"
    # the non-streaming path gives the same text
    assert generator.generate([chat(generator, request_text)], SamplingParams(max_new_tokens=40))[0].text == final.text


def test_same_seed_same_text(generator):
    p = chat(generator, "Invent a name for a cat.")
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a = generator.generate([p], params)[0]
    b = generator.generate([p], params)[0]
    assert a.token_ids == b.token_ids
    others = {tuple(generator.generate([p], SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50,
                                                             top_p=0.95, seed=s))[0].token_ids)
              for s in (1, 2, 3)}
    assert len(others | {tuple(a.token_ids)}) > 1, "different seeds explore different texts"


def test_finish_reasons(generator):
    p = chat(generator, "Count from 1 to 30 separated by commas.")
    long = generator.generate([p], SamplingParams(max_new_tokens=5))[0]
    assert long.finish_reason == FINISH_LENGTH and long.completion_tokens == 5
    stopped = generator.generate([p], SamplingParams(max_new_tokens=60, stop=("5",)))[0]
    assert stopped.finish_reason == FINISH_STOP
    assert "5" not in stopped.text and stopped.text.startswith("1")
    deltas, final = collect(generator.stream(p, SamplingParams(max_new_tokens=60, stop=(", 4",))))
    assert final.finish_reason == FINISH_STOP and "".join(deltas) == final.text and ", 4" not in final.text
    done = generator.generate([chat(generator, "Say OK.")], SamplingParams(max_new_tokens=30))[0]
    assert done.finish_reason == FINISH_EOS


def test_batched_equals_one_by_one(generator):
    prompts = [chat(generator, "What is 2 + 2?"),
               chat(generator, "Write a haiku about autumn leaves falling on a quiet pond in the evening."),
               "The capital of Italy is"]
    params = SamplingParams(max_new_tokens=20)
    batched = generator.generate(prompts, params)
    single = [generator.generate([p], params)[0] for p in prompts]
    for b, s in zip(batched, single):
        assert b.token_ids == s.token_ids and b.finish_reason == s.finish_reason


def test_repetition_penalty_changes_output(generator):
    p = "word word word word word word"
    plain = generator.generate([p], SamplingParams(max_new_tokens=8))[0]
    penalised = generator.generate([p], SamplingParams(max_new_tokens=8, repetition_penalty=2.0))[0]
    assert plain.token_ids != penalised.token_ids


@pytest.mark.parametrize("params, match", [
    (SamplingParams(max_new_tokens=0), "max_new_tokens"),
    (SamplingParams(max_new_tokens=10**6), "max_new_tokens"),
    (SamplingParams(temperature=-0.1), "temperature"),
    (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(top_p=1.5), "top_p"),
    (SamplingParams(top_k=-1), "top_k"),
    (SamplingParams(repetition_penalty=0), "repetition_penalty"),
    (SamplingParams(stop=("",)), "stop"),
    (SamplingParams(speculative_tokens=8), "speculative_tokens"),
    (SamplingParams(speculative_tokens=-1), "speculative_tokens"),
])
def test_bad_parameters(generator, params, match):
    with pytest.raises(InvalidInput, match=match):
        generator.generate(["hello"], params)


def test_prompt_longer_than_window(generator):
    with pytest.raises(InvalidInput, match="context window"):
        generator.generate(["word " * generator.window], SamplingParams(max_new_tokens=10))
    with pytest.raises(InvalidInput, match="empty"):
        generator.generate_ids([[]], SamplingParams(max_new_tokens=10))


def test_cancellation_stops_within_one_step(generator):
    calls = {"n": 0}

    def cancelled():
        calls["n"] += 1
        return calls["n"] >= 3

    deltas, final = collect(generator.stream(chat(generator, "Count from 1 to 100."),
                                             SamplingParams(max_new_tokens=100), cancelled=cancelled))
    assert final.finish_reason == "cancelled"
    assert len(final.token_ids) == 3


@pytest.mark.parametrize("variant", ["fp32", "int8", "int4", "w8a8"])
def test_built_decoder_has_the_graph_passes(config, variant):
    """`make models` applied every pass to every variant and quantized int8, int4 and w8a8
    with the current bits, block sizes and recipes (upgrading older builds in place)."""
    import json

    import onnx

    from engine.export_lm import GRAPH_PASSES, QUANT_RECIPES, QUANTIZED, block_key, recipe_key
    from engine.generate import VARIANT_FILES

    manifest = json.loads((config.gen_model_dir / "manifest.json").read_text())
    assert set(GRAPH_PASSES) <= set(manifest["graph_passes"]) and manifest["kv_layout"] == "right"
    file = VARIANT_FILES[variant]
    assert file in manifest["variants"]
    graph = onnx.load(str(config.gen_model_dir / file), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == manifest["num_layers"]
    left = [n.name for n in graph.node if n.op_type in ("Softmax", "Expand", "IsNaN", "MatMul") and "self_attn/" in n.name
            and "_proj/" not in n.name]
    assert not left, f"nothing of the exported attention is left: {left[:3]}"
    logits = next(o for o in graph.output if o.name == "logits")  # short_run_logits: 1 or a short run's length
    assert logits.type.tensor_type.shape.dim[1].dim_param == "logit_positions"
    assert "/lm_head/FirstPosition" in {n.name for n in graph.node}
    if file not in QUANTIZED:
        return
    # every projection and the output head are quantized, only the embedding stays fp32
    weights = {i.name for i in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and weights.intersection(n.input)]
    bits, block = QUANTIZED[file]
    assert manifest[block_key(file)] == block and manifest[recipe_key(file)] == QUANT_RECIPES[file]
    if block == 0:  # w8a8: integer products of per-row 8-bit activations, 4 quantized inputs a layer
        assert ops.count("MatMulIntegerToFloat") == 5 * manifest["num_layers"] + 1
        assert ops.count("QuantizeLinear") == 4 * manifest["num_layers"] + 1
        assert "/lm_head/MatMul_W8A8" in {n.name for n in graph.node} and "MatMulNBits" not in ops
        return
    attrs = {(a.name, a.i) for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute
             if a.name in ("bits", "block_size")}
    assert attrs == {("bits", bits), ("block_size", block)}
    # int4's recipe (asymmetric-search) gives every block a zero point, int8's none
    with_zero_points = {len([i for i in n.input if i]) == 4 for n in graph.node if n.op_type == "MatMulNBits"}
    assert with_zero_points == {bits == 4}
    assert f"/lm_head/MatMul_Q{bits}" in {n.name for n in graph.node}


def test_w8a8_computes_the_quantized_product_row_by_row():
    """quantize_w8a8 on a two-MatMul graph over [batch, seq, K] activations (both MatMuls read
    one input, so it is quantized once): onnxruntime's result equals the numpy product of the
    per-row 8-bit activations and per-column 8-bit weights (integer sums: exact up to the
    float scales), is close to the fp32 product, an all-zero row gives zeros, and every row
    computes the same alone as inside the batch. Random weights: a test of the math."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from engine.export_lm import quantize_w8a8

    rng = np.random.default_rng(0)
    k, n = 64, 48
    w1, w2 = (rng.standard_normal((2, k, n)) * 0.05).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="a"), helper.make_node("MatMul", ["x", "w2"], ["y2"], name="b")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [None, None, n]) for y in ("y1", "y2")],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = quantize_w8a8(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    ops = [nd.op_type for nd in model.graph.node]
    assert sum(nd.op_type == "QuantizeLinear" and nd.input[0] == "x" for nd in model.graph.node) == 1
    assert ops.count("MatMulIntegerToFloat") == 2 and "MatMul" not in ops
    assert not {"w1", "w2"} & {t.name for t in model.graph.initializer}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    x = rng.standard_normal((2, 3, k)).astype(np.float32) * np.array([1, 10, 0.1], np.float32)[None, :, None]
    x[1, 2] = 0
    y1, y2 = session.run(None, {"x": x})
    for w, y in ((w1, y1), (w2, y2)):
        ws = np.abs(w).max(0) / 127
        wq = np.clip(np.rint(w / ws), -127, 127)
        xs = np.maximum(np.abs(x).max(-1, keepdims=True) / 127, 1e-30)
        xq = np.clip(np.rint(x / xs), -127, 127)
        np.testing.assert_allclose(y, (xq @ wq) * ws * xs, rtol=1e-5, atol=1e-6)
        assert np.abs(y - x @ w).max() < 0.02 * np.abs(x @ w).max()
    assert not y1[1, 2].any()
    for b in range(2):
        for t in range(3):
            alone = session.run(None, {"x": x[b:b + 1, t:t + 1]})[0]
            assert np.array_equal(alone[0, 0], y1[b, t])


def test_int4_blocks_are_what_onnxruntime_computes_and_beat_round_to_nearest():
    """int4_blocks' packing (nibble order, zero points two per byte, an odd block count) is the
    layout MatMulNBits reads: onnxruntime's product equals x @ the dequantized weight (up to
    its int8 activations), and the searched blocks err less than onnxruntime's symmetric
    round-to-nearest on the same weight. Random weights: a test of the layout and the math."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from engine.export_lm import int4_blocks

    rng = np.random.default_rng(0)
    k, n = 96, 40  # three blocks of 32: an odd count, so the last zero-point byte is half used
    w = (rng.standard_normal((k, n)) * 0.05 + 0.01).astype(np.float32)
    packed, scales, zero_points, deq = int4_blocks(w, 32)
    assert packed.shape == (n, 3, 16) and scales.shape == (n, 3) and zero_points.shape == (n, 2)

    def product(x, inputs, **attrs):
        names = ["B", "scales", "zero_points"][:len(inputs)]
        node = helper.make_node("MatMulNBits", ["x", *names], ["y"], domain="com.microsoft", K=k, N=n, **attrs)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                                  [numpy_helper.from_array(a, nm) for a, nm in zip(inputs, names)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    x = rng.standard_normal((5, k)).astype(np.float32)
    exact = product(x, [packed, scales, zero_points], bits=4, block_size=32, accuracy_level=0)
    np.testing.assert_allclose(exact, x @ deq, rtol=1e-4, atol=1e-5)
    int8_compute = product(x, [packed, scales, zero_points], bits=4, block_size=32, accuracy_level=4)
    assert np.abs(int8_compute - x @ deq).max() < 0.02 * np.abs(x @ deq).max()

    # onnxruntime's symmetric round-to-nearest of the same weight
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph([matmul], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], [numpy_helper.from_array(w, "w")])
    q = MatMulNBitsQuantizer(helper.make_model(graph), algo_config=DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=True, accuracy_level=0, bits=4))
    q.process()
    inits = {t.name: numpy_helper.to_array(t) for t in q.model.model.graph.initializer}
    rtn = product(np.eye(k, dtype=np.float32), [inits["w_Q4"], inits["w_scales"]], bits=4, block_size=32, accuracy_level=0)
    assert np.linalg.norm(deq - w) < 0.9 * np.linalg.norm(rtn - w)


def test_quantize_int4_leaves_the_kept_matmuls_in_fp32():
    """quantize_int4(keep=...) (benchmarks/quant_fidelity.py: int4 with the output head in
    fp32): the kept MatMul and its weight stay as they were and compute the fp32 product;
    the other becomes MatMulNBits and its fp32 weight goes. Random weights: a graph test."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from engine.export_lm import quantize_int4

    rng = np.random.default_rng(1)
    k, n = 64, 24
    w1, w2 = (rng.standard_normal((2, k, n)) * 0.05).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="a"), helper.make_node("MatMul", ["x", "w2"], ["y2"], name="b")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [None, n]) for y in ("y1", "y2")],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = quantize_int4(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), 32, keep={"b"})
    assert [(nd.name, nd.op_type) for nd in model.graph.node] == [("a_Q4", "MatMulNBits"), ("b", "MatMul")]
    inits = {t.name for t in model.graph.initializer}
    assert "w2" in inits and "w1" not in inits
    x = rng.standard_normal((3, k)).astype(np.float32)
    y1, y2 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y2, x @ w2, rtol=1e-5, atol=1e-6)
    assert 0 < np.abs(y1 - x @ w1).max() < 0.05 * np.abs(x @ w1).max()


def test_large_weights_move_to_a_data_file_and_give_the_same_outputs(tmp_path, config):
    """A graph built with its weights inside (before EXTERNAL_MIN_BYTES) gets them moved to a
    data file beside it by `make models` (export_lm.externalize: onnxruntime opens it ~3x
    sooner), its row-slots copy is dropped (rewritten pointing at the data file), and it
    computes the same; the default model's variants are built that way."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from engine import export_lm

    rows = export_lm.EXTERNAL_MIN_BYTES // (4 * 64) + 16
    table = np.random.default_rng(0).standard_normal((rows, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["out"])], "big",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 64])], [numpy_helper.from_array(table, "table")])
    path = tmp_path / "model_int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    slots = tmp_path / export_lm.rows_file(path.name)
    slots.write_bytes(b"a full copy of the weights")
    ids = {"ids": np.array([rows - 1, 0, 7], np.int64)}

    def run() -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, ids)[0]

    before = run()
    assert export_lm.externalize(path)
    assert path.stat().st_size < 1 << 20 and (tmp_path / "model_int8.onnx_data").stat().st_size >= table.nbytes
    assert not slots.exists() and not list(tmp_path.glob(".*"))
    assert np.array_equal(run(), before) and np.array_equal(before, table[[rows - 1, 0, 7]])
    assert not export_lm.externalize(path), "already moved"
    model_dir = config.gen_model_dir
    for name in json.loads((model_dir / "manifest.json").read_text())["variants"]:
        model = onnx.load(str(model_dir / name), load_external_data=False)
        assert any(t.external_data for t in model.graph.initializer), f"{name} holds its weights inside"


def test_a_graph_over_2gib_is_saved_with_external_data(tmp_path):
    """The 1.5B preset's quantized graph is over 2 GiB (its fp32 embeddings), more than one
    protobuf can hold: save_onnx writes the weights to a data file beside it, and
    onnxruntime runs the result. A real 2.1 GiB initializer, not a lowered limit."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from engine.export_lm import PROTOBUF_LIMIT, save_onnx

    rows = PROTOBUF_LIMIT // (4 * 64) + 1024  # a [rows, 64] fp32 table just over the limit
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["out"])], "big",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 64])],
        [numpy_helper.from_array(np.zeros((1, 64), np.float32), "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # filled in place: protobuf cannot copy a message over 2 GiB, as make_model would
    table = np.zeros((rows, 64), np.float32)
    table[-1] = np.arange(64)
    init = model.graph.initializer[0]
    init.dims[:] = [rows, 64]
    init.raw_data = table.tobytes()
    del table
    assert len(init.raw_data) > PROTOBUF_LIMIT
    save_onnx(model, tmp_path / "model_int8.onnx")
    del model
    assert (tmp_path / "model_int8.onnx").stat().st_size < 1 << 20
    assert (tmp_path / "model_int8.onnx_data").stat().st_size > PROTOBUF_LIMIT
    sess = ort.InferenceSession(str(tmp_path / "model_int8.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"ids": np.array([rows - 1, 0], np.int64)})[0]
    assert np.array_equal(out[0], np.arange(64, dtype=np.float32)) and not out[1].any()


def test_gqa_pass_rewrites_the_exported_attention_exactly(tmp_path, config):
    """The built graph (engine/export_lm.gqa_attention, then fused_qkv_rotary): one
    GroupQueryAttention per layer taking the packed Q|K|V projection, rotating it at the
    graph's position_ids, reading that layer's past and writing its present; the interface
    unchanged, both passes idempotent. That the rewritten graph computes what the model does
    is checked against transformers above (test_greedy_is_token_identical_to_transformers)
    and batch by batch in tests/test_scheduler.py."""
    import json

    import onnx

    from engine.export_lm import fused_qkv_rotary, gqa_attention

    cfg = json.loads((config.gen_model_dir / "config.json").read_text())
    model = onnx.load(str(config.gen_model_dir / "model.onnx"), load_external_data=False)
    g = model.graph
    assert [i.name for i in g.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    nodes = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == cfg["num_hidden_layers"]
    producer = {o: n for n in g.node for o in n.output}
    for layer, n in enumerate(nodes):
        # fused_qkv_rotary: the packed projection as query, key and value empty, rotated inside
        assert list(n.input[1:]) == ["", "", f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
                                     "gqa_seqlens_k", "gqa_total_length", "gqa_cos_cache", "gqa_sin_cache",
                                     "position_ids"]
        assert producer[n.input[0]].name == f"/model/layers.{layer}/self_attn/qkv_proj/Add"
        assert list(n.output[1:]) == [f"present.{layer}.key", f"present.{layer}.value"]
        attrs = {a.name: a.i for a in n.attribute}
        assert attrs["num_heads"] == cfg["num_attention_heads"] and attrs["kv_num_heads"] == cfg["num_key_value_heads"]
        assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 0
    ops = {n.op_type for n in g.node}
    assert not ops & {"Cos", "Sin", "Neg", "Transpose"}, "the export's rotation and head reshapes are gone"
    # per layer qkv, o, gate, up and down; then lm_head
    assert len([n for n in g.node if n.op_type == "MatMul"]) == 5 * cfg["num_hidden_layers"] + 1
    assert gqa_attention(model, cfg["num_key_value_heads"], cfg["num_attention_heads"]) == 0  # idempotent
    assert fused_qkv_rotary(model, cfg["num_key_value_heads"], cfg["num_attention_heads"], 64) == 0


def test_kv_batch_decodes_in_place_and_one_row_equals_a_wide_batch(generator):
    """KVBatch writes each step's keys into the buffers it reads, and a row's logits do not
    depend on how many rows share the step, even where one row alone would take other
    kernels (Generator.row_padding)."""
    a = generator.encode(chat(generator, "What is 2 + 2?"))
    b = generator.encode("The capital of Italy is")
    kv = {len(a): generator.prefill(a)[1], len(b): generator.prefill(b)[1]}
    alone, wide = KVBatch(generator), KVBatch(generator)
    alone.add(kv[len(a)], len(a) + 8)
    for p in (a, b, a):
        wide.add(kv[len(p)], len(p) + 8)
    bufs = list(alone.bufs)
    token = [[generator.encode(" The")[0]]]
    for _ in range(4):
        one = alone.step(np.array(token, np.int64))
        many = wide.step(np.array(token * 3, np.int64))
        assert np.array_equal(one[0], many[0]) and np.array_equal(one[0], many[2])
        token = [[int(one[0].argmax())]]
    assert all(x is y for x, y in zip(bufs, alone.bufs)), "the steps wrote into the same buffers"
    assert list(alone.lengths) == [len(a) + 4] and list(wide.lengths) == [len(a) + 4, len(b) + 4, len(a) + 4]
    wide.keep([2])
    assert list(wide.lengths) == [len(a) + 4]
    assert np.array_equal(wide.step(np.array(token, np.int64))[0], alone.step(np.array(token, np.int64))[0])
    wide.keep([])
    assert wide.bufs == [] and len(wide) == 0


def test_lookup_draft_copies_what_followed_the_latest_match():
    """Prompt lookup: the longest suffix (up to 3 tokens) seen before, latest occurrence first."""
    h = np.array([5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 5, 6, 7], np.int64)
    assert lookup_draft(h, 3) == [2, 3, 5]  # "5 6 7" last followed by 2 3 5
    assert lookup_draft(h, 1) == [2]
    assert lookup_draft(np.array([4, 1, 2, 9, 1, 2], np.int64), 4) == [9, 1, 2]  # the match may run into the tail
    assert lookup_draft(np.array([1, 2, 3, 9, 2, 3, 4, 3], np.int64), 2) == [4, 3]  # "4 3" unseen: after the latest "3"
    assert lookup_draft(np.array([1, 2, 3, 4], np.int64), 3) == []
    assert lookup_draft(np.array([7], np.int64), 3) == []
    # draft_match: the matched suffix's length and where its continuation starts
    assert draft_match(h) == (3, 9) and draft_match(h, max_ngram=2) == (2, 9)
    assert draft_match(np.array([1, 2, 3, 9, 2, 3, 4, 3], np.int64)) == (1, 6)  # a one-token match: a weak guess
    assert draft_match(np.array([1, 2, 3, 4], np.int64)) == (0, 0)


def test_verify_runs_do_not_depend_on_the_other_rows(generator):
    """KVBatch.verify: a row's run over its last token and drafts returns the logits after
    each token (short_run_logits), writes their keys in place, and gives the same bits
    whether the row sits alone or in a wider buffer beside other rows; `accept` keeps the
    agreed keys, and the next run continues from them."""
    assert generator.verify_max_tokens >= 4
    a = generator.encode(chat(generator, "What is 2 + 2?"))
    b = generator.encode("The capital of Italy is Rome, and the capital of France is")
    first, kv_a = generator.prefill(a)
    kv_b = generator.prefill(b)[1]
    alone, wide = KVBatch(generator), KVBatch(generator)
    alone.add(kv_a, len(a) + 8)
    wide.add(kv_b, len(b) + 40)
    wide.add(kv_a, len(a) + 8)
    token = int(first.argmax())
    for drafts in ([token, token, token], [generator.encode(" The")[0]]):
        one = alone.verify(0, [token, *drafts])
        two = wide.verify(1, [token, *drafts])
        assert one.shape == (len(drafts) + 1, generator.vocab_size)
        assert np.array_equal(one, two)
        alone.accept(0, 1)
        wide.accept(1, 1)
        token = int(one[0].argmax())
    assert list(alone.lengths) == [len(a) + 2] and list(wide.lengths) == [len(b), len(a) + 2]
    # a row without drafts runs with a filler after its token: the logits of that token
    one = alone.verify(0, [token])
    assert one.shape == (1, generator.vocab_size)
    assert np.array_equal(one[0], wide.verify(1, [token, token])[0])
    with pytest.raises(ValueError, match="1 to"):
        alone.verify(0, [token] * (generator.verify_max_tokens + 1))
    # the row beside it was not touched: its next step is what it is alone
    other = KVBatch(generator)
    other.add(kv_b, len(b) + 40)
    wide.keep([0])
    t = np.array([[generator.encode(" Paris")[0]]], np.int64)
    assert np.array_equal(wide.step(t)[0], other.step(t)[0])


def test_a_lone_rows_kept_binding_follows_its_buffers(generator):
    """KVBatch keeps a lone row's verify-run binding (_lone_binding) while its buffers stay:
    runs of 2 and 4 tokens, one after another, past a widening of the buffers (COLUMN_ROUNDING)
    and a second row's coming and going, give the bits of runs bound afresh each time, and
    each run's logits are its own (not the run's before)."""
    prompt = generator.encode(chat(generator, "Name three rivers in Europe. " * 8))
    prompt = prompt[:KVBatch.COLUMN_ROUNDING - 6]  # a few keys short of the buffers' first width
    kv = generator.prefill(prompt)[1]
    kept, fresh = KVBatch(generator), KVBatch(generator)
    kept.add(kv, len(prompt) + 1)  # reserve little: the runs below must widen the buffers
    fresh.add(kv, len(prompt) + 1)
    widths, before = {kept.columns}, None
    tokens = [int(t) for t in generator.encode(" the Danube, the Rhine and the Volga flow through many lands")]
    for i in range(12):
        if i == 6:  # another row joins and leaves: the buffers are replaced
            kept.add(kv, len(prompt) + 200)
            kept.keep([0])
        run = tokens[i:i + (2 if i % 2 else 4)]
        fresh._lone_io_version = -1  # bound afresh
        got, want = kept.verify(0, run), fresh.verify(0, run)
        assert np.array_equal(got, want), f"run {i}"
        assert before is None or not np.array_equal(got[0], before), f"run {i} returned the run before's logits"
        before = got[0].copy()
        kept.accept(0, len(run) - 1)
        fresh.accept(0, len(run) - 1)
        widths.add(kept.columns)
    assert len(widths) > 1, "the buffers widened during the runs"


def test_speculating_rows_share_a_verify_run_with_their_alone_bits(generator, monkeypatch):
    """The row-slots graph (make models writes one per variant, engine/export_lm.row_slots):
    one run verifies several rows' drafts, each row with its own token count, and every
    row's logits are the bits of a run of that row alone in the plain graph; rows past the
    graph's slots take another run."""
    assert generator.rows_session is not None and generator.row_slots == 8, "make models writes model_int8_slots.onnx"
    prompts = [generator.encode(chat(generator, q)) for q in ("What is 2 + 2?", "Name a colour.", "Why is the sky blue?")]
    prompts.append(generator.encode("The capital of Italy is Rome, and the capital of France is"))
    caches = [generator.prefill(p)[1] for p in prompts]
    runs = [[5, 6, 7, 8], [9], [13, 14, 15, 16, 21, 22, 23], [17, 18]]
    alone = []
    for p, kv, tokens in zip(prompts, caches, runs):
        plain = KVBatch(generator)  # not a verify batch: the plain graph, one row a run
        plain.add(kv, len(p) + 8)
        alone.append(plain.verify(0, tokens))
    together = KVBatch(generator, verify=True)
    for p, kv in zip(prompts, caches):
        together.add(kv, len(p) + 40)
    out = together.verify_rows([0, 1, 2, 3], runs)
    assert [o.shape for o in out] == [(len(r), generator.vocab_size) for r in runs]
    for i in range(4):
        assert np.array_equal(out[i], alone[i]), f"row {i} changed in a shared run"
    assert list(together.lengths) == [len(p) for p in prompts], "keys are written, kept only when accepted"
    for b in range(4):
        together.accept(b, 1)
    together.accept(0, 1)
    # rows continue from their kept keys, here more rows than slots: rows 0 and 1 share a run,
    # rows 2 and 3 another
    monkeypatch.setattr(generator, "row_slots", 2)
    nxt = [[7, 8], [9, 10, 11], [11], [12, 13]]
    sub = together.verify_rows([0, 1, 2, 3], nxt)
    monkeypatch.undo()
    for b in range(4):
        plain = KVBatch(generator)
        plain.add(caches[b], len(prompts[b]) + 8)
        plain.verify(0, runs[b])
        plain.accept(0, 2 if b == 0 else 1)
        assert np.array_equal(sub[b], plain.verify(0, nxt[b])), f"row {b}'s next run"
    with pytest.raises(ValueError, match="1 to"):
        together.verify_rows([0, 1], [[1, 2], []])


def test_a_prefill_chunk_rides_in_a_verify_run_with_prefills_bits(generator):
    """KVBatch.verify_rows(prefill=...): a newcomer's prompt chunk takes a slot after the
    speculating rows; its cache comes out as Generator.prefill makes it, bit for bit (from
    an empty cache or after one), and the rows' logits are their alone bits."""
    assert generator.prefill_variant == generator.verify_variant
    rows = [generator.encode(chat(generator, q)) for q in ("What is 2 + 2?", "Name a colour.")]
    caches = [generator.prefill(p)[1] for p in rows]
    batch = KVBatch(generator, verify=True)
    assert batch.can_ride_prefill
    for p, kv in zip(rows, caches):
        batch.add(kv, len(p) + 40)
    alone = []
    for p, kv in zip(rows, caches):
        one = KVBatch(generator, verify=True)
        one.add(kv, len(p) + 8)
        alone.append(one.verify(0, [5, 6, 7]))
    newcomer = generator.encode(chat(generator, "Why is the sky blue? Answer in one sentence, please, and say why "
                                                "sunsets are red while you are at it, and what colour the sky is on "
                                                "Mars, and on the Moon, and why, in plain words."))
    assert len(newcomer) >= 64 + 9  # a last chunk of 9 tokens or more (Scheduler.last_chunk)
    want_logits, want = generator.prefill(newcomer)
    kv = None
    for a, b in ((0, 32), (32, 48)):
        *out, kv = batch.verify_rows([0, 1], [[5, 6, 7], [5, 6, 7]], prefill=(kv, newcomer[a:b]))
        assert all(np.array_equal(o, w) for o, w in zip(out, alone)), "the rows' logits are their alone bits"
    # beside one row, then the rest alone (chunks start at multiples of 16: tokens keep their pairs)
    kv = batch.verify_rows([0], [[5, 6, 7]], prefill=(kv, newcomer[48:64]))[-1]
    assert all(np.array_equal(x, y[:, :, :64]) for x, y in zip(kv, want))
    logits, kv = generator.prefill(newcomer[64:], kv)
    assert np.array_equal(logits, want_logits) and all(np.array_equal(x, y) for x, y in zip(kv, want))
    with pytest.raises(ValueError, match="rides along"):
        batch.verify_rows([0], [[5]], prefill=(None, newcomer[:1]))


def _tiny_qwen2(path: Path) -> Path:
    """A randomly initialised two-layer Qwen2 HF folder (the default model's architecture at
    a few hundred KB, no tokenizer), for graph-pass tests that need a fresh export."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=10000.0, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).eval().save_pretrained(path)
    return path


def _logits_after(model_file: Path, prompt: list[int], steps: list[int]) -> list[np.ndarray]:
    """Prefill `prompt` in one run, then decode `steps` one token at a time (plain
    session.run): the logits of every run."""
    import onnxruntime as ort

    s = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    past_names = [i.name for i in s.get_inputs() if i.name.startswith("past_key_values")]
    heads_dim = next(i.shape for i in s.get_inputs() if i.name.startswith("past_key_values"))[1:4:2]
    past = [np.zeros((1, heads_dim[0], 0, heads_dim[1]), np.float32) for _ in past_names]
    out, pos = [], 0
    for ids in [prompt, *([t] for t in steps)]:
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, pos + len(ids)), np.int64),
                 "position_ids": np.arange(pos, pos + len(ids), dtype=np.int64)[None, :], **dict(zip(past_names, past))}
        res = s.run(None, feeds)
        out.append(res[0][0, -1])
        past, pos = res[1:], pos + len(ids)
    return out


def test_fused_qkv_rotary_computes_what_the_unfused_graph_does_and_upgrades_a_folder(tmp_path, monkeypatch):
    """export_lm.fused_qkv_rotary on a fresh export: logits of a prefill and 6 decode steps
    within float rounding of the same export without it, and `upgrade` of a folder built
    before it (fp32 weights in an external data file, as the 0.5B model's are) rewrites the
    fp32 graph with a new data file, removes the old one and re-quantizes int8 and int4."""
    import json
    import shutil

    import onnx

    from engine import export_lm

    hf = _tiny_qwen2(tmp_path / "hf")
    built = export_lm.export_hf(hf, tmp_path / "built")
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["graph_passes"] == list(export_lm.GRAPH_PASSES)
    ops = [n.op_type for n in onnx.load(str(built / "model.onnx")).graph.node]
    assert "Cos" not in ops and ops.count("GroupQueryAttention") == 2

    # the same export as a folder built before the pass: fp32 weights in a data file
    from optimum.exporters.onnx import main_export

    old, fresh = tmp_path / "old", tmp_path / "fresh"
    shutil.copytree(built, old)

    main_export(str(hf), output=str(fresh), task="text-generation-with-past", device="cpu", do_validation=False)
    shutil.copy(hf / "config.json", fresh / "config.json")
    before = export_lm.GRAPH_PASSES[:export_lm.GRAPH_PASSES.index("fused_qkv_rotary")]  # and the passes after it
    assert export_lm.apply_graph_passes(fresh / "model.onnx", before) == list(before)
    model = onnx.load(str(fresh / "model.onnx"))
    onnx.save_model(model, str(old / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=1024)
    for f in (export_lm.INT8_FILE, export_lm.INT4_FILE):
        (old / f).unlink()
        export_lm.quantize_weights(old / "model.onnx", old / f, *export_lm.QUANTIZED[f])
    manifest["graph_passes"] = list(before)
    (old / "manifest.json").write_text(json.dumps(manifest))

    prompt, steps = [5, 17, 99, 240, 3, 77, 120, 8, 301, 42], [11, 400, 7, 250, 33, 9]
    want = _logits_after(old / "model.onnx", prompt, steps)
    # a disk without room for the re-quantized copies, or for the new fp32 weights beside the
    # old (with the copies' share set to nothing): refused, nothing changed
    files = {f.name: f.read_bytes() for f in old.iterdir()}
    for copy_size, free, refusal in ((export_lm.COPY_SIZE, 1 << 20, "writing model_int8.onnx"),
                                     (0.0, (256 << 20) + 1, "free beside it")):
        with monkeypatch.context() as m:
            m.setattr(export_lm, "COPY_SIZE", copy_size)
            m.setattr(export_lm.shutil, "disk_usage", lambda p, free=free: shutil._ntuple_diskusage(10 << 30, 10 << 30, free))
            with pytest.raises(SystemExit, match=f"{refusal}.*"):
                export_lm.upgrade(old)
        assert {f.name: f.read_bytes() for f in old.iterdir()} == files
    export_lm.upgrade(old)
    got = _logits_after(old / "model.onnx", prompt, steps)
    assert max(float(np.abs(a - b).max()) for a, b in zip(want, got)) < 1e-4
    fresh_build = _logits_after(built / "model.onnx", prompt, steps)  # the same graph, built fused
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, fresh_build)) < 1e-5
    assert json.loads((old / "manifest.json").read_text())["graph_passes"] == list(export_lm.GRAPH_PASSES)
    # rewritten whole: this small graph now holds its weights, and the old data file is gone
    # (the 0.5B model's go to a new data file, model.onnx_data.1: save_onnx past 2 GiB)
    assert not (old / "model.onnx_data").exists() and not (old / "model.onnx_data.1").exists()
    for f in (export_lm.INT8_FILE, export_lm.INT4_FILE, export_lm.W8A8_FILE):
        ops = [n.op_type for n in onnx.load(str(old / f)).graph.node]
        # qkv, o, gate, up and down per layer (this tiny model's tied lm_head stays a MatMul)
        op = "MatMulIntegerToFloat" if f == export_lm.W8A8_FILE else "MatMulNBits"
        assert ops.count(op) == 5 * 2 and "Cos" not in ops


def test_upgrade_writes_a_missing_copy_or_refuses_a_full_disk_first(tmp_path, monkeypatch):
    """A folder built before the w8a8 copy existed gets it from `upgrade` (make models), with
    its recipe in the manifest and the plan to be measured again; on a disk without room
    for it, upgrade refuses before touching anything."""
    import json
    import shutil

    import onnx

    from engine import export_lm

    built = export_lm.export_hf(_tiny_qwen2(tmp_path / "hf"), tmp_path / "built")
    manifest = json.loads((built / "manifest.json").read_text())
    manifest["variants"].remove(export_lm.W8A8_FILE)
    for key in (export_lm.block_key(export_lm.W8A8_FILE), export_lm.recipe_key(export_lm.W8A8_FILE)):
        manifest.pop(key)
    manifest["execution_plans"] = {"some cpu": {"prefill": "int8", "decode": "int8"}}
    (built / "manifest.json").write_text(json.dumps(manifest))
    (built / export_lm.W8A8_FILE).unlink()
    files = {f.name: f.read_bytes() for f in built.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(export_lm.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
        with pytest.raises(SystemExit, match=r"writing model_w8a8.onnx into .* needs about .* GB free there"):
            export_lm.upgrade(built)
    assert {f.name: f.read_bytes() for f in built.iterdir()} == files
    export_lm.upgrade(built)
    after = json.loads((built / "manifest.json").read_text())
    assert export_lm.W8A8_FILE in after["variants"] and "execution_plans" not in after
    assert after[export_lm.recipe_key(export_lm.W8A8_FILE)] == export_lm.QUANT_RECIPES[export_lm.W8A8_FILE]
    ops = [n.op_type for n in onnx.load(str(built / export_lm.W8A8_FILE)).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 5 * 2
    assert {f.name: f.read_bytes() for f in built.iterdir() if f.name in files and f.name != "manifest.json"} == \
        {k: v for k, v in files.items() if k != "manifest.json"}, "the other files stay as they were"


def test_row_slots_graph_is_written_per_variant_and_dropped_by_an_upgrade(tmp_path):
    """export_lm.write_rows_graph on a tiny Qwen2 export: the row-slots copy has one
    GroupQueryAttention per slot and layer and a cache input and output per slot; a graph
    without slots to give (already slotted) is left alone; an upgrade that changes the
    folder removes the copies made from the old graphs (make models writes them again)."""
    import json

    import onnx

    from engine import export_lm

    built = export_lm.export_hf(_tiny_qwen2(tmp_path / "hf"), tmp_path / "built")
    for f in (export_lm.FP32_FILE, export_lm.W8A8_FILE):
        legacy = built / f.replace(".onnx", "_rows.onnx")  # the first layout's copy: replaced
        legacy.write_bytes(b"old")
        assert export_lm.write_rows_graph(built, f, slots=3)
        assert not legacy.exists()
        g = onnx.load(str(built / export_lm.rows_file(f)), load_external_data=False).graph
        assert [n.op_type for n in g.node].count("GroupQueryAttention") == 2 * 3
        assert {"past_key_values.1.value.slot2", "past_key_values.0.key", "slot_starts", "logits_index"} <= \
            {i.name for i in g.input}
        assert "attention_mask" not in {i.name for i in g.input}, "slots take seqlens and totals instead"
        assert "present.1.value.slot2" in {o.name for o in g.output}
        assert export_lm.row_slots(onnx.load(str(built / export_lm.rows_file(f))), 3) == 0, "already slotted"
    manifest = json.loads((built / "manifest.json").read_text())
    manifest["variants"].remove(export_lm.INT4_FILE)
    (built / "manifest.json").write_text(json.dumps(manifest))
    export_lm.upgrade(built)
    assert not any(built.glob("*_slots.onnx"))


def test_short_run_logits_returns_every_position_of_a_short_run(tmp_path):
    """export_lm.short_run_logits on a fresh export of a tiny Qwen2: a run of up to
    VERIFY_MAX_TOKENS tokens after a cache returns logits for each of them, within float
    rounding of feeding them one by one; a longer run (a prompt) returns the last position's."""
    import onnxruntime as ort

    from engine import export_lm

    built = export_lm.export_hf(_tiny_qwen2(tmp_path / "hf"), tmp_path / "built", quantize=False)
    s = ort.InferenceSession(str(built / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs() if i.name.startswith("past_key_values")]
    heads, dim = next(i.shape for i in s.get_inputs() if i.name.startswith("past_key_values"))[1:4:2]

    def run(ids, past, pos):
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, pos + len(ids)), np.int64),
                 "position_ids": np.arange(pos, pos + len(ids), dtype=np.int64)[None, :], **dict(zip(names, past))}
        out = s.run(None, feeds)
        return out[0][0], out[1:]

    empty = [np.zeros((1, heads, 0, dim), np.float32) for _ in names]
    prompt = list(range(3, 3 + export_lm.VERIFY_MAX_TOKENS + 4))
    logits, past = run(prompt, empty, 0)
    assert logits.shape[0] == 1  # a prompt: the last position only
    run_ids = [11, 250, 7, 19, 402, 5, 88, 31][:export_lm.VERIFY_MAX_TOKENS]
    together, _ = run(run_ids, past, len(prompt))
    assert together.shape == (len(run_ids), 512)
    one_by_one, p, pos = [], past, len(prompt)
    for t in run_ids:
        lg, p = run([t], p, pos)
        one_by_one.append(lg[-1])
        pos += 1
    assert np.abs(together - np.stack(one_by_one)).max() < 1e-4
    from engine.config import MAX_SPECULATIVE_TOKENS

    assert MAX_SPECULATIVE_TOKENS == export_lm.VERIFY_MAX_TOKENS - 1, "Config allows what a verify run carries"


def test_padding_rule_pads_fewest_rows_that_keep_every_run_exact():
    """Generator.row_padding's choice, on the patterns measured: none needed; int8 on the AMX
    Xeon (an odd last row takes another kernel); int4 on the AVX2 EPYC (only one row does);
    nothing exact."""
    from engine.generate import padding_rule

    assert padding_rule({n: True for n in range(1, 9)}) == (1, 1)
    assert padding_rule({n: n % 2 == 0 for n in range(1, 9)}) == (2, 1)
    assert padding_rule({n: n > 1 for n in range(1, 9)}) == (1, 2)
    k, m = padding_rule({n: n == 8 for n in range(1, 9)})
    assert [max(m, -(-n // k) * k) for n in range(1, 9)] == [8] * 8
    assert padding_rule({n: False for n in range(1, 9)}) is None


def test_sessions_stop_spinning_after_a_run_unless_configured(generator, config):
    """The scheduler switches between the generator's sessions every step: each one's idle
    threads stop spinning when its run returns (session.force_spinning_stop), so they do not
    take a core from the next session's run; Config.stop_spinning False keeps them spinning."""
    def entries(g):
        sessions = {g.session, g.prefill_session, g.verify_session, g.rows_session} - {None}
        out = set()
        for s in sessions:
            try:
                out.add(s.get_session_options().get_session_config_entry("session.force_spinning_stop"))
            except RuntimeError:  # never set: onnxruntime's default, spinning on
                out.add("")
        return out

    assert entries(generator) == {"1"}
    spinning = Generator(config.gen_model_dir, variant="int4", prefill_variant="int8", threads=2,
                         stop_spinning=False)
    assert len({spinning.session, spinning.prefill_session}) == 2 and entries(spinning) == {""}
    assert Config().stop_spinning and not Config(stop_spinning=False).stop_spinning
