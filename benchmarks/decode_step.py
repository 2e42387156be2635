"""What does one batched decode step cost, with the KV cache copied each step or updated in place?

    .venv/bin/python benchmarks/decode_step.py                  # rows 1,4,8,16 x keys 256,800
    .venv/bin/python benchmarks/decode_step.py --variant fp32 --rows 8 --keys 400
    .venv/bin/python benchmarks/decode_step.py --gemm 1,2,8,16,32,128   # the products alone

Baseline: `session.run` with the batch's cache as the past inputs, as the engine did before
KVBatch; onnxruntime returns each present output one column wider, so GroupQueryAttention
copies every row's keys and values into it every step. Ours: engine.generate.KVBatch, which
binds the same buffers as past and present (IO binding) so the new keys are written in place.
Both run the same decoder on the same random cache (rows of `--keys` keys each), in this
process, alternating; each prints ms per step, tokens/s and the ratio, and whether the logits
of the two are identical. Where Generator.row_padding pads (int8 on an AVX-512 VNNI / AMX
Xeon: odd row counts; int4 on the AVX2 EPYC: one row), ours carries a padding row, which
the baseline did not: there its row took another kernel, so its logits differ, and ours
costs one more row. One JSON line per (rows, keys) to bench-results/decode_step.jsonl.

`--roofline`: the floor under a one-row step, where every step reads all the projection
weights once: their bytes in the graph (fp32, or 4/8-bit levels with their scales and zero
points; the embedding table, read one row per token, not counted) over this machine's read
bandwidth, timed here as a Numba parallel sum over as many bytes (best of 5). Prints the
floor in ms and tokens/s, and the share of it each one-row step reached.

`--ops`: where a batched step's time goes, per operator type: the same in-place steps
(rows x keys as given) in a session of the variant loaded with onnxruntime's profiler on;
prints each shape's wall ms a step, the kernels' ms, and the four costliest operator types
(e.g. MatMulNBits, GroupQueryAttention), one JSON line per shape. A profile, not a
comparison: onnxruntime's profiler adds its own cost to every node.

`--verify int4,w8a8`: what a speculative-decoding run of one row costs per variant
(KVBatch.verify over its last token and n-1 drafts, n = 2..8, after `--keys` keys of a real
prefill), against that variant's one-token step (KVBatch.step) as the baseline, in the
same process: rounds alternate the variants, each shape keeps its best round. Prints ms per
run and the ratio run / one-token step; engine/plan.py chooses the verify weights by the
4-token run. Beside each run, the same run with its binding made afresh every time (the
baseline: KVBatch before it kept a lone row's binding, `AfreshBatch`), in the same rounds,
and whether the two give the same logits.

`--gemm 1,8,32,128`: what the products alone cost here, per weight format, for a run of M
tokens (rows x tokens a row): one graph per format holding every projection of the model
(its config.json's shapes: per layer Q|K|V, output, gate, up and down, and the output head;
random weights, distinct per layer, so they are read from memory as a real step reads
them), each in the form the engine's variants use: int4 and int8 MatMulNBits (block 128,
int8 compute; int4 with zero points), w8a8 (an 8-bit activation scale per row in the graph,
MatMulIntegerToFloat, the row scale applied after; here each input width is quantized once,
where the real graph quantizes every layer's inputs, so its floor is a little low) and fp32
MatMul. Prints ms per run,
multiply-adds per second and tokens per second for each M: the floor under a step of M
tokens that no scheduler can go below, without attention and elementwise work. Best of
`--rounds`, formats alternating; one JSON line per (format, M).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_name, log_jsonl  # noqa: E402

from engine.config import Config  # noqa: E402
from engine.generate import VARIANT_FILES, Generator, KVBatch  # noqa: E402


def copying_step(g: Generator, ids: np.ndarray, lengths: np.ndarray, past: list[np.ndarray]):
    """The baseline: plain session.run; present comes back one column wider (a copy)."""
    width = past[0].shape[2]
    feeds = {"input_ids": ids, "attention_mask": (np.arange(width + 1)[None, :] <= lengths[:, None]).astype(np.int64),
             **dict(zip(g.past_names, past))}
    if "position_ids" in g.input_names:
        feeds["position_ids"] = lengths[:, None]
    outs = g.session.run(None, feeds)
    return outs[0][:, -1, :], outs[1:1 + len(g.past_names)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=("fp32", "int8", "int4", "w8a8"), default="int8")
    ap.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16])
    ap.add_argument("--keys", type=lambda s: [int(x) for x in s.split(",")], default=[256, 800])
    ap.add_argument("--steps", type=int, default=16, help="timed steps per system and shape")
    ap.add_argument("--threads", type=int, default=Config().threads)
    ap.add_argument("--roofline", action="store_true", help="also the weight-read floor of a one-row step")
    ap.add_argument("--verify", type=lambda s: [x for x in s.split(",") if x], default=[],
                    help="variants whose verify runs to time (instead of batched steps)")
    ap.add_argument("--rounds", type=int, default=3, help="with --verify: rounds alternating the variants")
    ap.add_argument("--ops", action="store_true", help="per-operator profile of the steps (instead of the A/B)")
    ap.add_argument("--gemm", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                    help="token counts M whose products alone to time, per weight format (instead of the A/B)")
    a = ap.parse_args()
    if a.gemm:
        return gemm_rates(a)
    if a.verify:
        return verify_runs(a)
    if a.ops:
        return op_profile(a)

    cfg = Config()
    if a.roofline:  # before onnxruntime's spinning threads exist: they would slow the read
        weight_bytes = projection_bytes(Path(cfg.gen_model_dir) / VARIANT_FILES[a.variant])
        gbs = read_bandwidth(weight_bytes, a.threads)
    g = Generator(cfg.gen_model_dir, variant=a.variant, threads=a.threads)
    print(f"CPU: {cpu_name()}; {g.name} {a.variant}, {a.threads} threads, {a.steps} steps each")
    rng = np.random.default_rng(0)
    steps: dict[tuple[int, int], float] = {}
    for rows in a.rows:
        for keys in a.keys:
            kv = [(rng.standard_normal((rows, g.num_kv_heads, keys, g.head_dim)) * 0.5).astype(np.float32)
                  for _ in g.past_names]
            lengths = np.full(rows, keys, np.int64)
            ids = rng.integers(0, 1000, size=(rows, 1)).astype(np.int64)
            batch = KVBatch(g)
            for b in range(rows):
                batch.add([v[b:b + 1] for v in kv], keys + a.steps + 2)
            want, _ = copying_step(g, ids, lengths, kv)  # also a warm-up of each path
            got = batch.step(ids).copy()
            same = bool(np.array_equal(want, got))
            base_s = ours_s = 0.0
            past = kv
            for _ in range(a.steps):  # alternate, so both see the same machine
                t = time.perf_counter()
                _, past = copying_step(g, ids, lengths, kv)
                base_s += time.perf_counter() - t
                t = time.perf_counter()
                batch.step(ids)
                ours_s += time.perf_counter() - t
            base_ms, ours_ms = 1000 * base_s / a.steps, 1000 * ours_s / a.steps
            rec = {"variant": a.variant, "threads": a.threads, "rows": rows, "keys": keys,
                   "copying_ms": base_ms, "in_place_ms": ours_ms, "copying_tok_per_s": rows * 1000 / base_ms,
                   "in_place_tok_per_s": rows * 1000 / ours_ms, "ratio": base_ms / ours_ms,
                   "identical_logits": same, "padded_rows": g.padded_rows(rows) - rows}
            print(f"rows {rows:2d} keys {keys:4d}: copying {base_ms:6.1f} ms ({rec['copying_tok_per_s']:6.1f} tok/s)"
                  f"  in place {ours_ms:6.1f} ms ({rec['in_place_tok_per_s']:6.1f} tok/s)  ratio {rec['ratio']:.2f}x"
                  f"  logits identical: {same}" + (f"  (ours + {rec['padded_rows']} padding row)" if rec["padded_rows"] else ""),
                  flush=True)
            log_jsonl("decode_step", rec)
            steps[(rows, keys)] = ours_ms
            del past
    if a.roofline:
        floor_ms = weight_bytes / gbs / 1e6
        print(f"roofline: {weight_bytes / 1e6:.0f} MB of projection weights per step, read at {gbs:.1f} GB/s "
              f"(Numba, {a.threads} threads): floor {floor_ms:.1f} ms ({1000 / floor_ms:.1f} tok/s) for one row")
        for (rows, keys), ms in steps.items():
            if rows == 1:
                print(f"  keys {keys:4d}: one-row step {ms:.1f} ms, {100 * floor_ms / ms:.0f}% of the floor's speed")
                log_jsonl("decode_step", {"variant": a.variant, "threads": a.threads, "rows": 1, "keys": keys,
                                          "roofline_mb": weight_bytes / 1e6, "read_gb_per_s": gbs,
                                          "floor_ms": floor_ms, "in_place_ms": ms, "share_of_floor": floor_ms / ms})
    return 0


class AfreshBatch(KVBatch):
    """The baseline of a lone row's binding: made afresh every run (its caches, 2 x 24, and
    a new logits array), as KVBatch did before _lone_binding."""

    def _lone_binding(self, b: int, n: int):
        logits = np.empty((1, n, self.gen.vocab_size), np.float32)
        return self._binding(b, 1, logits), logits


def verify_runs(a) -> int:
    """One row's verify runs of 2..8 tokens against its one-token step, per variant; and
    each against the same run with its binding made afresh (AfreshBatch)."""
    cfg = Config()
    gens = {v: Generator(cfg.gen_model_dir, variant=v, threads=a.threads) for v in a.verify}
    keys = a.keys[0]
    prompt = [int(x) for x in np.random.default_rng(0).integers(1000, 20000, keys + a.steps + 16)]
    caches = {v: g.prefill(prompt[:keys])[1] for v, g in gens.items()}
    sizes = (1, 2, 3, 4, 6, 8)
    best: dict[tuple[str, int], float] = {}
    print(f"CPU: {cpu_name()}; one row after {keys} keys, {a.steps} runs per shape, best of {a.rounds} rounds")
    afresh: dict[tuple[str, int], float] = {}
    same = True
    for _ in range(a.rounds):
        for v, g in gens.items():
            for n in sizes:
                for kind in ("kept", "afresh") if n > 1 else ("kept",):
                    row = (KVBatch if kind == "kept" else AfreshBatch)(g)
                    row.add(caches[v], keys + a.steps + 16)
                    if n == 1:  # the baseline: a one-token step
                        def run(i, row=row):
                            row.step(np.array([[prompt[keys + i]]], np.int64))
                            row.lengths[0] -= 1  # the same position every time, as the runs below
                    else:
                        def run(i, row=row, n=n):
                            return row.verify(0, prompt[keys + i:keys + i + n])  # keeps nothing: same position
                    first = run(0)  # warm up
                    first = None if first is None else first.copy()  # held until the next run only
                    t = time.perf_counter()
                    for i in range(1, a.steps + 1):
                        run(i)
                    ms = 1000 * (time.perf_counter() - t) / a.steps
                    times = best if kind == "kept" else afresh
                    times[(v, n)] = min(times.get((v, n), ms), ms)
                    if kind == "kept":
                        kept_first = first
                    else:  # the same run's logits, kept binding or fresh: the same bits
                        same = same and np.array_equal(first, kept_first)
    for v in gens:
        one = best[(v, 1)]
        print(f"{v:5s} " + "  ".join(f"{n}: {best[(v, n)]:5.1f} ms ({best[(v, n)] / one:.2f}x)" for n in sizes))
        print(f"      binding afresh (the baseline): " + "  ".join(
            f"{n}: {afresh[(v, n)]:5.1f} ms (kept {afresh[(v, n)] / best[(v, n)]:.3f}x faster)" for n in sizes[1:]))
        for n in sizes:
            log_jsonl("decode_step", {"mode": "verify", "variant": v, "threads": a.threads, "keys": keys,
                                      "tokens": n, "ms": best[(v, n)], "ratio_to_one_token_step": best[(v, n)] / one,
                                      "afresh_ms": afresh.get((v, n)),
                                      "kept_binding_speedup": afresh[(v, n)] / best[(v, n)] if n > 1 else None})
    print(f"logits of kept and afresh bindings identical: {same}")
    return 0


def op_profile(a) -> int:
    """Per shape (rows x keys), a step's wall time and its kernels' time by operator type,
    from onnxruntime's profiler over `--steps` in-place steps (after 3 untimed)."""
    import collections
    import json
    import os
    import tempfile

    import onnxruntime as ort

    cfg = Config()
    g = Generator(cfg.gen_model_dir, variant=a.variant, threads=a.threads)
    shapes = [(rows, keys) for rows in a.rows for keys in a.keys]
    for rows, _ in shapes:
        g.padded_rows(rows)  # the padding rule's own runs, before the profiled session exists
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="rag-decode-ops-"), "profile")
    g.session = ort.InferenceSession(str(Path(cfg.gen_model_dir) / VARIANT_FILES[a.variant]), opts,
                                     providers=["CPUExecutionProvider"])
    print(f"CPU: {cpu_name()}; {g.name} {a.variant}, {a.threads} threads, {a.steps} profiled steps a shape")
    rng = np.random.default_rng(0)
    walls = []
    for rows, keys in shapes:
        kv = [(rng.standard_normal((rows, g.num_kv_heads, keys, g.head_dim)) * 0.5).astype(np.float32)
              for _ in g.past_names]
        ids = rng.integers(0, 1000, size=(rows, 1)).astype(np.int64)
        batch = KVBatch(g)
        for b in range(rows):
            batch.add([v[b:b + 1] for v in kv], keys + 8)
        for _ in range(3):
            batch.step(ids)
            batch.lengths -= 1  # the same position every step
        t = time.perf_counter()
        for _ in range(a.steps):
            batch.step(ids)
            batch.lengths -= 1
        walls.append(1000 * (time.perf_counter() - t) / a.steps)
    path = g.session.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    runs, cur = [], collections.Counter()
    for e in events:  # a run's node events come before its model_run event
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            cur[e["args"]["op_name"]] += e["dur"]
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            runs.append(cur)
            cur = collections.Counter()
    per = a.steps + 3
    for i, ((rows, keys), wall) in enumerate(zip(shapes, walls)):
        ops = collections.Counter()
        for r in runs[i * per + 3:(i + 1) * per]:
            ops.update(r)
        ms = {op: us / a.steps / 1000 for op, us in ops.items()}
        top = sorted(ms.items(), key=lambda x: -x[1])[:4]
        print(f"rows {rows:2d} keys {keys:4d}: {wall:6.1f} ms a step, kernels {sum(ms.values()):6.1f} ms: "
              + ", ".join(f"{op} {v:.1f}" for op, v in top), flush=True)
        log_jsonl("decode_step", {"mode": "ops", "variant": a.variant, "threads": a.threads, "rows": rows,
                                  "keys": keys, "padded_rows": g.padded_rows(rows) - rows, "wall_ms": wall,
                                  "kernel_ms": sum(ms.values()), "op_ms": ms})
    return 0


GEMM_FORMATS = ("int4", "int8", "w8a8", "fp32")


def projection_graph(fmt: str, shapes: list[tuple[int, int]], rng):
    """One graph whose outputs are x @ W for every (K, N) in `shapes`, W random in `fmt`'s
    form (export_lm: quantize_int4, quantize_weights, quantize_w8a8); inputs x_K [M, K]."""
    from onnx import TensorProto, helper, numpy_helper

    from engine.export_lm import INT4_BLOCK_SIZE, INT8_BLOCK_SIZE

    nodes, inits, outs = [], [], []
    if fmt == "w8a8":
        inits += [numpy_helper.from_array(v, k) for k, v in (
            ("c127", np.array(127, np.float32)), ("tiny", np.array(1e-30, np.float32)),
            ("one", np.array(1, np.float32)), ("zp", np.array(128, np.uint8)), ("axes", np.array([-1], np.int64)))]
        for k in sorted({k for k, _ in shapes}):  # the activation's row scales, once per input (as gate and up share)
            x = f"x_{k}"
            nodes += [helper.make_node("Abs", [x], [x + "/abs"]),
                      helper.make_node("ReduceMax", [x + "/abs", "axes"], [x + "/max"], keepdims=1),
                      helper.make_node("Div", [x + "/max", "c127"], [x + "/s0"]),
                      helper.make_node("Max", [x + "/s0", "tiny"], [x + "/s"]),
                      helper.make_node("Shape", [x + "/s"], [x + "/rows"]),
                      helper.make_node("Expand", ["zp", x + "/rows"], [x + "/zps"]),
                      helper.make_node("QuantizeLinear", [x, x + "/s", x + "/zps"], [x + "/u8"], axis=-1, block_size=k)]
    for i, (k, n) in enumerate(shapes):
        x, w, y = f"x_{k}", f"w{i}", f"y{i}"
        if fmt == "fp32":
            inits.append(numpy_helper.from_array((rng.standard_normal((k, n), np.float32) * 0.02), w))
            nodes.append(helper.make_node("MatMul", [x, w], [y]))
        elif fmt == "w8a8":
            inits += [numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), w),
                      numpy_helper.from_array((rng.random(n, np.float32) * 0.01 + 1e-3), w + "s")]
            nodes += [helper.make_node("MatMulIntegerToFloat", [x + "/u8", w, "one", w + "s", "zp"], [y + "c"],
                                       domain="com.microsoft"),
                      helper.make_node("Mul", [y + "c", x + "/s"], [y])]
        else:
            bits, block = (4, INT4_BLOCK_SIZE) if fmt == "int4" else (8, INT8_BLOCK_SIZE)
            blocks = -(-k // block)
            inits += [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8), w),
                      numpy_helper.from_array((rng.random(n * blocks, np.float32) * 0.01 + 1e-3), w + "s")]
            ins = [x, w, w + "s"]
            if bits == 4:  # asymmetric: a zero point per block, two to a byte
                inits.append(numpy_helper.from_array(rng.integers(0, 256, (n, -(-blocks // 2)), dtype=np.uint8), w + "z"))
                ins.append(w + "z")
            nodes.append(helper.make_node("MatMulNBits", ins, [y], domain="com.microsoft", K=k, N=n, bits=bits,
                                          block_size=block, accuracy_level=4))
        outs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, ["M", n]))
    inputs = [helper.make_tensor_value_info(f"x_{k}", TensorProto.FLOAT, ["M", k]) for k in sorted({k for k, _ in shapes})]
    g = helper.make_graph(nodes, fmt, inputs, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def gemm_rates(a) -> int:
    """Every projection of the model in each weight format, timed for runs of M tokens."""
    import json

    import onnxruntime as ort

    from engine.export_lm import PROTOBUF_LIMIT

    cfg = json.loads((Path(Config().gen_model_dir) / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    d = cfg.get("head_dim", h // cfg["num_attention_heads"])
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * d
    shapes = [(h, qkv), (cfg["num_attention_heads"] * d, h), (h, inter), (h, inter), (inter, h)] * layers
    shapes.append((h, cfg["vocab_size"]))
    macs = sum(k * n for k, n in shapes)  # per token
    rng = np.random.default_rng(0)
    formats = [f for f in GEMM_FORMATS if f != "fp32" or 4 * macs < PROTOBUF_LIMIT]  # one protobuf, no external data
    sessions = {}
    for fmt in formats:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = a.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sessions[fmt] = ort.InferenceSession(projection_graph(fmt, shapes, rng).SerializeToString(), opts,
                                             providers=["CPUExecutionProvider"])
    print(f"CPU: {cpu_name()}; {a.threads} threads; {len(shapes)} products, {macs / 1e6:.0f} M multiply-adds "
          f"a token; ms per run of M tokens (best of {a.rounds} rounds of {a.steps} runs)")
    best: dict[tuple[str, int], float] = {}
    for _ in range(a.rounds):
        for m in a.gemm:
            feeds = {f"x_{k}": rng.standard_normal((m, k), np.float32) for k in {k for k, _ in shapes}}
            for fmt, s in sessions.items():
                s.run(None, feeds)
                t = time.perf_counter()
                for _ in range(a.steps):
                    s.run(None, feeds)
                ms = 1000 * (time.perf_counter() - t) / a.steps
                best[(fmt, m)] = min(best.get((fmt, m), ms), ms)
    for m in a.gemm:
        fastest = min(formats, key=lambda f: best[(f, m)])
        print(f"M {m:4d}: " + "  ".join(
            f"{f} {best[(f, m)]:6.1f} ms ({macs * m / best[(f, m)] / 1e6:5.0f} GMAC/s)" for f in formats)
            + f"  fastest: {fastest}, {1000 * m / best[(fastest, m)]:.0f} tok/s")
        for f in formats:
            log_jsonl("decode_step", {"mode": "gemm", "format": f, "threads": a.threads, "tokens": m,
                                      "ms": best[(f, m)], "gmac_per_s": macs * m / best[(f, m)] / 1e6,
                                      "tok_per_s": 1000 * m / best[(f, m)]})
    return 0


def projection_bytes(path: Path) -> int:
    """Bytes of the initializers that MatMul-like nodes read (weights, scales, zero points)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
             for t in model.graph.initializer}
    read = {x for n in model.graph.node if n.op_type.startswith("MatMul") for x in n.input[1:]}
    return sum(sizes.get(x, 0) for x in read)


def read_bandwidth(nbytes: int, threads: int) -> float:
    """GB/s of a Numba parallel sum over `nbytes` of float32 on `threads` threads (best of 5)."""
    import numba

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))

    @numba.njit(parallel=True, fastmath=True, cache=False)
    def total(x):
        t = 0.0
        for i in numba.prange(x.size):
            t += x[i]
        return t

    x = np.ones(nbytes // 4, np.float32)
    total(x)
    best = min(_timed(total, x) for _ in range(5))
    return x.nbytes / best / 1e9


def _timed(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
