"""How fast could any fp32 embedder be on this CPU? A roofline for the embedding target.

    .venv/bin/python benchmarks/embed_ceiling.py [--n 500] [--threads 2] [--rounds 3]

Issue 2 asks for ours fp32 >= 2x sentence-transformers. This script measures, in one
process on the same chunks as benchmarks/embed_throughput.py:

1. the work: multiply-add FLOPs the encoder must do for these chunks, counted from the
   model's config.json (per layer and token: QKV, output and the two FFN projections,
   2 * (4 h^2 + 2 h I); plus attention scores and weighted sum, 4 L h per token). LayerNorm,
   GELU, softmax and the embedding lookup are left out, so this undercounts the work;
2. the machine: fp32 GEMM rate of onnxruntime's MatMul on the model's own projection shapes
   (M = the median chunk length), the best of (a) `threads` workers each running a
   single-threaded session, as engine/embed.py does, and (b) one session with `threads`
   intra-op threads; plus numpy's large square GEMM as a second opinion;
3. sentence-transformers and ours fp32, interleaved for `--rounds` rounds.

Then: ceiling tokens/s = GEMM rate / FLOPs per token. This is what an encoder would do if
every operator, attention included, ran at the speed of a large GEMM and the elementwise
work were free. No real implementation reaches it. The last lines print the highest
speedup over sentence-transformers that the ceiling allows, and what fraction of the
GEMM peak a 2x would require. One JSON line goes to bench-results/embed_ceiling.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from embed_throughput import CORPUS, load_chunks  # noqa: E402

from engine.config import DEFAULT_EMBED_MODEL, DEFAULT_MODELS_DIR  # noqa: E402
from engine.embed import Embedder  # noqa: E402

RESULTS = REPO / "bench-results" / "embed_ceiling.jsonl"


def model_flops(cfg: dict, lengths: list[int]) -> tuple[float, list[tuple[int, int]]]:
    """Multiply-add FLOPs for encoding texts of these token lengths, and the projection
    shapes (K, N) of one layer."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    per_token = 2 * (4 * h * h + 2 * h * inter)
    total = 0.0
    for n in lengths:
        total += layers * (n * per_token + 4 * n * n * h)
    return total, [(h, 3 * h), (h, h), (h, inter), (inter, h)]


def layer_session(m: int, shapes: list[tuple[int, int]], threads: int):
    """One onnxruntime session (one thread pool) running the layer's projections as
    independent MatMuls on [m, K] inputs, and its feeds."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inputs, outputs, weights, feeds = [], [], [], [], {}
    for i, (k, n) in enumerate(shapes):
        x = f"X{k}"
        if x not in feeds:
            inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [m, k]))
            feeds[x] = rng.standard_normal((m, k), dtype=np.float32)
        weights.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"Y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [m, n]))
    model = helper.make_model(helper.make_graph(nodes, "layer", inputs, outputs, weights),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess, feeds


def gemm_rate(shapes: list[tuple[int, int]], m: int, threads: int, calls: int = 200) -> dict:
    """GFLOP/s over one pass of the layer's projections, both ways of using the cores."""
    flops_per_pass = sum(2 * m * k * n for k, n in shapes)
    out = {}
    # (a) `threads` workers sharing a single-threaded session (engine/embed.py's CPU path)
    sess, feeds = layer_session(m, shapes, 1)

    def worker(count: int) -> None:
        for _ in range(count):
            sess.run(None, feeds)

    worker(10)
    pool = [threading.Thread(target=worker, args=(calls,)) for _ in range(threads)]
    t = time.perf_counter()
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    out["workers"] = threads * calls * flops_per_pass / (time.perf_counter() - t) / 1e9
    # (b) one session with `threads` intra-op threads
    sess, feeds = layer_session(m, shapes, threads)
    worker(10)
    t = time.perf_counter()
    worker(calls)
    out["intra_op"] = calls * flops_per_pass / (time.perf_counter() - t) / 1e9
    del sess
    # numpy's BLAS on a large square GEMM, for a second opinion on the machine's peak
    a = np.random.default_rng(1).standard_normal((2048, 2048), dtype=np.float32)
    a @ a
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    out["numpy_2048"] = 10 * 2 * 2048 ** 3 / (time.perf_counter() - t) / 1e9
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="chunks to embed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODELS_DIR / DEFAULT_EMBED_MODEL)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    args = parser.parse_args(argv)

    import torch
    from sentence_transformers import SentenceTransformer

    from engine.export import default_hf_dir

    torch.set_num_threads(args.threads)
    ours = Embedder(args.model_dir, variant="fp32", threads=args.threads)
    chunks = load_chunks(args.corpus, ours, args.n)
    lengths = ours.count_tokens(chunks)
    tokens = sum(lengths)
    cfg = json.loads((args.model_dir / "config.json").read_text())
    flops, shapes = model_flops(cfg, lengths)
    print(f"{len(chunks)} chunks, {tokens} tokens (median {int(np.median(lengths))}/chunk), "
          f"{flops / tokens / 1e6:.1f} MFLOP/token counted, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}")

    st = SentenceTransformer(str(default_hf_dir()), device="cpu")

    def st_embed(texts):
        return st.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                         show_progress_bar=False)

    systems = {"sentence-transformers": st_embed, "ours fp32": ours.embed}
    for fn in systems.values():
        fn(chunks[:64])
    times: dict[str, list[float]] = {name: [] for name in systems}
    rates: list[dict] = []
    m = int(np.median(lengths))
    for _ in range(args.rounds):  # the GEMM probe takes turns with the systems too
        for name, fn in systems.items():
            t = time.perf_counter()
            fn(chunks)
            times[name].append(time.perf_counter() - t)
        rates.append(gemm_rate(shapes, m, args.threads))

    peak = max(max(r["workers"], r["intra_op"]) for r in rates)
    st_tps = tokens / statistics.median(times["sentence-transformers"])
    ours_tps = tokens / statistics.median(times["ours fp32"])
    ceiling_tps = peak * 1e9 * tokens / flops
    need = 2 * st_tps * flops / tokens / 1e9
    for name in systems:
        tps = tokens / statistics.median(times[name])
        print(f"{name:22s} {tps:8.0f} tokens/s  {tps * flops / tokens / 1e9:6.1f} GFLOP/s "
              f"({100 * tps / ceiling_tps:4.1f}% of the GEMM peak)")
    print("fp32 GEMM, model shapes (M=%d), GFLOP/s per round: workers %s; intra-op %s; numpy 2048^3 %s" % (
        m, ", ".join(f"{r['workers']:.0f}" for r in rates), ", ".join(f"{r['intra_op']:.0f}" for r in rates),
        ", ".join(f"{r['numpy_2048']:.0f}" for r in rates)))
    print(f"ceiling (every FLOP at the GEMM peak {peak:.0f} GFLOP/s): {ceiling_tps:.0f} tokens/s")
    print(f"ours fp32 / sentence-transformers: {ours_tps / st_tps:.2f}x; the ceiling allows at most "
          f"{ceiling_tps / st_tps:.2f}x")
    print(f"2x sentence-transformers needs {need:.0f} GFLOP/s = {100 * need / peak:.0f}% of the GEMM peak "
          f"on every operator (ours runs at {100 * ours_tps / ceiling_tps:.0f}%)")
    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps({
            "benchmark": "embed_ceiling", "python": platform.python_version(), "time": time.time(),
            "chunks": len(chunks), "tokens": tokens, "flops": flops, "threads": args.threads,
            "st_tokens_per_s": st_tps, "ours_fp32_tokens_per_s": ours_tps, "gemm_gflops": rates,
            "ceiling_tokens_per_s": ceiling_tps, "ceiling_ratio": ceiling_tps / st_tps,
            "ratio": ours_tps / st_tps, "needed_fraction_of_peak_for_2x": need / peak}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
