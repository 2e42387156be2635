"""Does the w8a8 graph's row quantization by QuantizeLinear's blocks pay, against the old
reshape chain, at the same bits?

    .venv/bin/python benchmarks/w8a8_graph.py [--rounds-scale 1.0]

engine/export_lm.quantize_w8a8 quantizes each activation row with QuantizeLinear's blocks
(opset 21: Abs, ReduceMax, Div, Max, Shape, Expand, QuantizeLinear; 7 nodes). Before, the
row scales went through opset 18's per-axis QuantizeLinear, which needed the activation
reshaped to [rows, K] and back (11 nodes). This script rebuilds that old graph from the built
model_w8a8.onnx (graph only, beside it, sharing its weights file; removed after), checks that
both give the same logits and keys bit for bit, and times the two sessions in turns in one
process at the shapes the scheduler runs: a lone row's one-token step and verify runs of 4 and
8 tokens after a 400-token cache, 8 rows of one token, a 32-token run and a 256-token prefill
chunk. Prints the median times and the median of the per-turn ratios old / new, and appends
one JSON line per shape to bench-results/w8a8_graph.jsonl, with the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import cpu_name, log_jsonl  # noqa: E402

from engine.config import Config  # noqa: E402
from engine.embed import make_session  # noqa: E402
from engine.export_lm import W8A8_FILE  # noqa: E402

SHAPES = ((1, 1, 400), (1, 4, 400), (1, 8, 400), (8, 1, 400), (1, 32, 400), (1, 256, 0))  # rows, tokens, cache


def old_chain_graph(src: Path, dst: Path) -> int:
    """Write the built w8a8 graph with its row quantization as the old reshape chain (opset 18)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "w8a8/flat"))
    nodes = []
    for n in g.node:
        if n.op_type in ("Shape", "Expand") and "/w8a8/" in n.output[0]:
            continue  # the blocked zero points
        if n.op_type != "QuantizeLinear" or not n.output[0].endswith("/w8a8/u8"):
            nodes.append(n)
            continue
        x, q = n.input[0], n.output[0][:-len("/u8")]
        k = next(a.i for a in n.attribute if a.name == "block_size")
        g.initializer.append(numpy_helper.from_array(np.array([-1, k], np.int64), q + "/shape2d"))
        nodes += [helper.make_node("Reshape", [q + "/scale", "w8a8/flat"], [q + "/scale_rows"]),
                  helper.make_node("Reshape", [x, q + "/shape2d"], [q + "/x2d"]),
                  helper.make_node("Shape", [q + "/scale_rows"], [q + "/rows"]),
                  helper.make_node("Expand", ["w8a8/zp", q + "/rows"], [q + "/zps"]),
                  helper.make_node("QuantizeLinear", [q + "/x2d", q + "/scale_rows", q + "/zps"], [q + "/q2d"], axis=0),
                  helper.make_node("Shape", [x], [q + "/xshape"]),
                  helper.make_node("Reshape", [q + "/q2d", q + "/xshape"], [q + "/u8"])]
    del g.node[:]
    g.node.extend(nodes)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 18
    onnx.save(model, str(dst))
    return len(nodes)


def feeds(rows: int, tokens: int, cache: int, layers: int, kv_heads: int, head_dim: int) -> dict:
    rng = np.random.default_rng(rows * 1000 + tokens)
    f = {"input_ids": rng.integers(100, 30000, (rows, tokens)).astype(np.int64),
         "attention_mask": np.ones((rows, cache + tokens), np.int64),
         "position_ids": np.tile(np.arange(cache, cache + tokens, dtype=np.int64), (rows, 1))}
    for i in range(layers):
        for kv in ("key", "value"):
            f[f"past_key_values.{i}.{kv}"] = rng.standard_normal((rows, kv_heads, cache, head_dim)).astype(np.float32)
    return f


def main() -> None:
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds-scale", type=float, default=1.0, help="more (or fewer) turns per shape")
    args = ap.parse_args()
    cfg = Config()
    model_dir = Path(cfg.gen_model_dir)
    src = model_dir / W8A8_FILE
    if not src.exists():
        raise SystemExit(f"{src} not found; run `make models`")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    dims = manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"]
    old_path = model_dir / ".w8a8_graph_old_chain.onnx"  # beside the weights file it reads
    try:
        n_old = old_chain_graph(src, old_path)
        # as the generator opens them (stop_spinning: one session's threads leave the cores to the other's run)
        sessions = {"old": make_session(old_path, "cpu", cfg.threads, stop_spinning=True),
                    "new": make_session(src, "cpu", cfg.threads, stop_spinning=True)}
    finally:
        old_path.unlink(missing_ok=True)
    import onnx

    n_new = len(onnx.load(str(src), load_external_data=False).graph.node)
    print(f"{cpu_name()}, {cfg.threads} threads: old reshape chain {n_old} nodes, blocked QuantizeLinear {n_new}")
    print("rows tokens cache   same bits   old ms   new ms   old/new")
    for rows, tokens, cache in SHAPES:
        f = feeds(rows, tokens, cache, *dims)
        outs = {k: s.run(None, f) for k, s in sessions.items()}
        same = all(np.array_equal(a, b) for a, b in zip(outs["old"], outs["new"]))
        turns = max(9, int(args.rounds_scale * 200 / (rows * tokens) ** 0.7))
        times = {k: [] for k in sessions}
        for r in range(turns):
            for k in (("old", "new") if r % 2 else ("new", "old")):
                t0 = time.perf_counter()
                sessions[k].run(None, f)
                times[k].append(time.perf_counter() - t0)
        ratio = float(np.median(np.array(times["old"]) / np.array(times["new"])))
        old_ms, new_ms = (float(np.median(times[k])) * 1000 for k in ("old", "new"))
        print(f"{rows:4d} {tokens:6d} {cache:5d}   {str(same):9s} {old_ms:8.2f} {new_ms:8.2f}   x{ratio:.3f}")
        log_jsonl("w8a8_graph", {"rows": rows, "tokens": tokens, "cache": cache, "same_bits": same, "turns": turns,
                                 "old_ms": old_ms, "new_ms": new_ms, "old_over_new": ratio,
                                 "threads": cfg.threads, "nodes_old": n_old, "nodes_new": n_new})
        if not same:
            raise SystemExit("the two graphs differ: the blocked quantization is not the old chain's")


if __name__ == "__main__":
    main()
