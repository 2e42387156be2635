"""How closely does each execution plan follow the fp32 model's decode path, and do two
well-known quantization recipes (GPTQ, SmoothQuant) follow it more closely than ours?

    .venv/bin/python benchmarks/quant_fidelity.py                      # 40 prompts, all candidates
    .venv/bin/python benchmarks/quant_fidelity.py --build "" --plans "w8a8>int4,int4"

fp32 answers each SQuAD v1.1 dev question, with its gold paragraph as passage [1] through the
engine's prompt, greedily for --steps tokens. Every other plan (PREFILL>DECODE weights, as
engine/plan.py combines them) runs along the same tokens, teacher-forced: its own prefill of
the prompt, then one-row decode steps fed fp32's tokens. Printed per plan: how often its top
token is fp32's (all positions; the first, which the prefill weights decide), and the mean
KL(fp32 || plan) per position. Cheaper and steadier than answer_quality.py's F1 at the same
number of questions (no answers generated per plan, nothing scored against gold text), so
it ranks recipes before an F1 run confirms one.

Candidates built for the comparison (into --work, never into models/; each ~1 GB):
- `gptq-int4`: 4-bit blocks with a zero point, as our int4's, but every block chosen by
  GPTQ (Frantar et al., 2022: quantize one input row at a time and push its error, weighted
  by the inverse Hessian of the layer's inputs, onto the rows not yet quantized; each block's
  scale and zero point by our int4_blocks search at the moment it is reached). Calibration:
  16 windows of 512 tokens of English text that ships with this repo and with Python (the
  example corpus, pydoc's topic texts), through the fp32 graph.
- `smooth-w8a8`: our w8a8 after SmoothQuant (Xiao et al., 2022; alpha 0.5): each input
  channel of a projection divided by s = max|x|^a / max|w|^(1-a) where the activation is
  made (the RMSNorm weight, or up_proj's output column before down_proj) and its weight row
  multiplied by s: the same function, with the activation outliers moved into the weights.
- `head-fp32-int4`: our int4 with the output head (lm_head) left in fp32: how much of int4's
  drift is the head's.
- `b32-int4`, `b64-int4`, `b128-int4`: our int4 recipe with 32, 64 or 128 weights per scale
  and zero point (export_lm.INT4_BLOCK_SIZE is 128, 32 before; a one-row decode step of
  Qwen2.5-0.5B reads 316 / 283 / 266 MB).
Each plan's one-row decode steps are timed as it walks (median ms a step, the plans in
turn: compare within one run).
One JSON line per plan to bench-results/quant_fidelity.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_name, log_jsonl  # noqa: E402

from engine import export_lm  # noqa: E402
from engine.config import Config  # noqa: E402
from engine.embed import make_session  # noqa: E402
from engine.generate import VARIANT_FILES, Generator, KVBatch  # noqa: E402
from engine.pipeline import Engine, Hit  # noqa: E402

DEFAULT_SQUAD = REPO.parent / "shared" / "data" / "squad-dev-v1.1.json"
CANDIDATES = {"gptq-int4": "model_gptq_int4.onnx", "smooth-w8a8": "model_smooth_w8a8.onnx",
              "head-fp32-int4": "model_head_fp32_int4.onnx", "b32-int4": "model_b32_int4.onnx",
              "b64-int4": "model_b64_int4.onnx", "b128-int4": "model_b128_int4.onnx"}
CALIB_WINDOWS, CALIB_TOKENS = 16, 512


# ----------------------------------------------------------------------------- calibration
def calibration_windows(tokenizer) -> list[list[int]]:
    """CALIB_WINDOWS windows of CALIB_TOKENS tokens, spread evenly over the example corpus
    and pydoc's topic texts (English prose and code that every Python install ships)."""
    import pydoc_data.topics as topics

    texts = [p.read_text(errors="replace") for p in sorted((REPO / "examples" / "corpus").rglob("*")) if p.is_file()]
    texts += [topics.topics[k] for k in sorted(topics.topics)]
    ids: list[int] = []
    for t in texts:
        ids += tokenizer.encode(t).ids
    wins = [ids[i:i + CALIB_TOKENS] for i in range(0, len(ids) - CALIB_TOKENS, CALIB_TOKENS)]
    return wins[::max(1, len(wins) // CALIB_WINDOWS)][:CALIB_WINDOWS]


def weight_inputs(model) -> dict[str, str]:
    """weight initializer -> the activation its MatMul reads (for the output head: all
    positions, before the last-position Slice)."""
    inits = {t.name for t in model.graph.initializer}
    prod = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits:
            x, p = n.input[0], prod.get(n.input[0])
            out[n.input[1]] = p.input[0] if p is not None and p.op_type == "Slice" else x
    return out


def activation_stats(model_dir: Path, windows: list[list[int]]) -> tuple[dict, dict]:
    """Run the fp32 graph over the calibration windows with every MatMul's activation as an
    extra output. Returns (activation -> X^T X / tokens, activation -> max |x| per channel)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    m = onnx.load(str(model_dir / export_lm.FP32_FILE), load_external_data=False)
    names = sorted(set(weight_inputs(m).values()))
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in names if x not in have)
    with tempfile.NamedTemporaryFile(dir=model_dir, prefix=".calib-", suffix=".onnx") as f:
        onnx.save_model(m, f.name)  # beside the fp32 graph: its external data resolves
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = 2, 3
        sess = ort.InferenceSession(f.name, opts, providers=["CPUExecutionProvider"])
    past = [i.name for i in sess.get_inputs() if i.name.startswith("past")]
    man = json.loads((model_dir / "manifest.json").read_text())
    hess: dict[str, np.ndarray] = {}
    amax: dict[str, np.ndarray] = {}
    tokens = 0
    for w in windows:
        feeds = {"input_ids": np.array([w], np.int64), "attention_mask": np.ones((1, len(w)), np.int64),
                 "position_ids": np.arange(len(w), dtype=np.int64)[None],
                 **{p: np.zeros((1, man["num_kv_heads"], 0, man["head_dim"]), np.float32) for p in past}}
        for x, a in zip(names, sess.run(names, feeds)):
            a = a.reshape(-1, a.shape[-1])
            hess[x] = hess.get(x, 0) + a.T @ a
            amax[x] = np.maximum(amax.get(x, 0), np.abs(a).max(0))
        tokens += len(w)
    return {x: h / tokens for x, h in hess.items()}, amax


# ----------------------------------------------------------------------------- GPTQ
def gptq_int4(w: np.ndarray, h: np.ndarray, block: int = 32, lazy: int = 128, damp: float = 0.01):
    """GPTQ of a [K, N] weight (y = x @ w) given H = E[x^T x] [K, K]: returns the uint8
    levels [K, N], scales and zero points [N, K / block] (int4_blocks' search per block)."""
    k, n = w.shape
    w = w.astype(np.float32).copy()
    h = h.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead] = 0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    linv = np.linalg.inv(np.linalg.cholesky(h))
    u = np.linalg.cholesky(linv.T @ linv).T.astype(np.float32)  # upper Cholesky factor of H^-1
    q = np.empty((k, n), np.uint8)
    scales = np.empty((n, k // block), np.float32)
    zeros = np.empty((n, k // block), np.float32)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1, err, u1 = w[i1:i2], np.empty((i2 - i1, n), np.float32), u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % block == 0:
                g = (i1 + i) // block
                _, s_g, zp, _ = export_lm.int4_blocks(w1[i:i + block], block)
                s, z = s_g[:, 0], (zp[:, 0] & 15).astype(np.float32)
                scales[:, g], zeros[:, g] = s, z
            qi = np.clip(np.round(w1[i] / s + z), 0, 15)
            q[i1 + i] = qi
            e = (w1[i] - s * (qi - z)) / u1[i, i]
            w1[i:] -= np.outer(u1[i, i:], e)
            err[i] = e
        w[i2:] -= u[i1:i2, i2:].T @ err
    return q, scales, zeros


def build_gptq(model_dir: Path, dst: Path, hess: dict) -> None:
    import onnx

    model = onnx.load(str(model_dir / export_lm.FP32_FILE))
    inputs = weight_inputs(model)

    def blocks(name, w, bs):
        parts = [gptq_int4(w[:, c:c + 16384], hess[inputs[name]], bs) for c in range(0, w.shape[1], 16384)]
        q, s, z = (np.concatenate(p, axis=ax) for p, ax in zip(zip(*parts), (1, 0, 0)))  # columns are independent
        packed, zero_points = export_lm.pack_int4(q.T.reshape(w.shape[1], -1, bs), z)
        return packed, s, zero_points

    export_lm.save_onnx(export_lm.quantize_int4(model, blocks=blocks), dst)


# ----------------------------------------------------------------------------- SmoothQuant
def build_smooth(model_dir: Path, dst: Path, amax: dict, alpha: float = 0.5) -> int:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_dir / export_lm.FP32_FILE))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    readers: dict[str, list[str]] = {}
    for w, x in weight_inputs(model).items():
        readers.setdefault(x, []).append(w)
    done = 0
    for x, weights in readers.items():
        p = prod.get(x)
        if p is None or p.op_type != "Mul":  # o_proj reads attention output: nowhere exact to fold
            continue
        norm = [i for i in p.input if i in inits and len(inits[i].dims) == 1]
        up = [prod[i].input[1] for i in p.input if i in prod and prod[i].op_type == "MatMul"
              and prod[i].input[1] in inits]
        if not norm and not up:
            continue
        wmax = np.max([np.abs(numpy_helper.to_array(inits[w])).max(1) for w in weights], axis=0)
        s = np.clip(np.maximum(amax[x], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha), 1e-2, 1e2)
        fold = norm[0] if norm else up[0]
        a = numpy_helper.to_array(inits[fold])
        inits[fold].CopyFrom(numpy_helper.from_array((a / s if norm else a / s[None, :]).astype(np.float32), fold))
        for w in set(weights):
            a = numpy_helper.to_array(inits[w])
            inits[w].CopyFrom(numpy_helper.from_array((a * s[:, None]).astype(np.float32), w))
        done += 1
    export_lm.save_onnx(export_lm.quantize_w8a8(model), dst)
    return done


def build_int4(model_dir: Path, dst: Path, block_size: int = export_lm.INT4_BLOCK_SIZE, *,
               head_fp32: bool = False) -> None:
    """Our int4 recipe with `block_size` weights per scale; `head_fp32`: the output head kept in fp32."""
    import onnx

    model = onnx.load(str(model_dir / export_lm.FP32_FILE))
    head = {n.name for n in model.graph.node if n.op_type == "MatMul" and "lm_head" in n.name} if head_fp32 else set()
    export_lm.save_onnx(export_lm.quantize_int4(model, block_size, keep=frozenset(head)), dst)


# ----------------------------------------------------------------------------- fidelity
def gold_prompts(squad: Path, n: int, seed: int) -> tuple[list[list[int]], Path]:
    data = json.loads(squad.read_text())["data"]
    qs = [(f"{a['title']}-{i}", qa["question"], p["context"])
          for a in data for i, p in enumerate(a["paragraphs"]) for qa in p["qas"]]
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(Config(data_dir=Path(tmp) / "data"))
        prompts = []
        for pid, q, ctx in random.Random(seed).sample(qs, n):
            hit = Hit(rank=1, score=1.0, cosine=1.0, key=-1, doc_id=pid, source=pid, ordinal=0, start=0, end=len(ctx),
                      text=ctx, metadata={"title": pid.rsplit("-", 1)[0]})
            prompts.append(engine.build_prompt(q, [hit], 48)[0])
        model_dir = engine.config.gen_model_dir
        engine.close()
    return prompts, Path(model_dir)


def walk(g: Generator, prompts, steps: int, path: list[list[int]] | None, step_s: list[float] | None = None):
    """Logits [steps, vocab] per prompt: greedy when `path` is None (returns its tokens),
    else fed path's tokens; each decode step's seconds appended to `step_s`."""
    logits, paths = [], []
    for i, p in enumerate(prompts):
        first, kv = g.prefill(p)
        batch = KVBatch(g)
        batch.add(kv, len(p) + steps + 2)
        rows = [first.copy()]
        toks = list(path[i]) if path is not None else []
        for s in range(steps - 1):
            if path is None:
                toks.append(int(np.argmax(rows[-1])))
            t0 = time.perf_counter()
            rows.append(batch.step(np.array([[toks[s]]], np.int64))[0].copy())
            if step_s is not None:
                step_s.append(time.perf_counter() - t0)
        logits.append(np.stack(rows))
        paths.append(toks)
    return logits, paths


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--squad", default=str(DEFAULT_SQUAD))
    ap.add_argument("--n", type=int, default=40, help="questions")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--steps", type=int, default=24, help="positions per answer")
    ap.add_argument("--build", default=",".join(CANDIDATES), help=f"candidates to build: {', '.join(CANDIDATES)}")
    ap.add_argument("--plans", default="w8a8>int4,w8a8>gptq-int4,smooth-w8a8>int4,int4,gptq-int4,w8a8,smooth-w8a8,"
                    "head-fp32-int4", help="PREFILL>DECODE, comma-separated; a name alone prefills and decodes")
    ap.add_argument("--work", default=str(REPO / ".cache" / "quant-fidelity"), help="where candidates are written")
    a = ap.parse_args()

    prompts, model_dir = gold_prompts(Path(a.squad), a.n, a.seed)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_name()}; {len(prompts)} gold-paragraph prompts (seed {a.seed}), {a.steps} positions each", flush=True)
    build = [b for b in a.build.split(",") if b]
    if build:
        from tokenizers import Tokenizer

        hess, amax = None, None
        if {"gptq-int4", "smooth-w8a8"} & set(build):
            t = time.perf_counter()
            hess, amax = activation_stats(model_dir,
                                          calibration_windows(Tokenizer.from_file(str(model_dir / "tokenizer.json"))))
            print(f"calibration: {CALIB_WINDOWS} x {CALIB_TOKENS} tokens through fp32 in {time.perf_counter() - t:.0f} s",
                  flush=True)
        for b in build:
            t = time.perf_counter()
            dst = work / CANDIDATES[b]
            if b == "gptq-int4":
                build_gptq(model_dir, dst, hess)
            elif b == "smooth-w8a8":
                build_smooth(model_dir, dst, amax)
            elif b.startswith("b") and b.endswith("-int4"):  # b32-int4, b64-int4, b128-int4
                build_int4(model_dir, dst, int(b[1:-5]))
            else:
                build_int4(model_dir, dst, head_fp32=True)
            print(f"built {b} in {time.perf_counter() - t:.0f} s", flush=True)
        del hess, amax

    def session(name: str):
        return make_session(work / CANDIDATES[name], "cpu", 2) if name in CANDIDATES else None

    t = time.perf_counter()
    ref, path = walk(Generator(model_dir, variant="fp32", threads=2), prompts, a.steps, None)
    print(f"fp32 greedy path in {time.perf_counter() - t:.0f} s", flush=True)
    ref_lp = [log_softmax(r) for r in ref]
    for plan in a.plans.split(","):
        pre, _, dec = plan.partition(">")
        dec = dec or pre
        base = {n: n.rsplit("-", 1)[-1] for n in (pre, dec)}  # a candidate runs in its base variant's place
        if any(b not in VARIANT_FILES for b in base.values()):
            raise SystemExit(f"unknown plan {plan!r}: names are {sorted(VARIANT_FILES)} and {sorted(CANDIDATES)}")
        if any(n in CANDIDATES and not (work / CANDIDATES[n]).exists() for n in (pre, dec)):
            print(f"{plan}: not built (--build)")
            continue
        g = Generator(model_dir, variant=base[dec], prefill_variant=base[pre], threads=2)
        ps, ds = session(pre), session(dec) if dec != pre else None
        if pre == dec and ps is not None:
            g.session, g._prefill_session = ps, None
        else:
            g.session = ds or g.session
            g._prefill_session = ps or g._prefill_session
        t = time.perf_counter()
        step_s: list[float] = []
        got, _ = walk(g, prompts, a.steps, path, step_s)
        del g
        rec = {"plan": plan, "n": len(prompts), "seed": a.seed, "steps": a.steps, "cpu": cpu_name(),
               "top1_agree": float(np.mean([np.mean(x.argmax(-1) == r.argmax(-1)) for x, r in zip(got, ref)])),
               "first_token_agree": float(np.mean([x[0].argmax() == r[0].argmax() for x, r in zip(got, ref)])),
               "kl": float(np.mean([np.mean((np.exp(r) * (r - log_softmax(x))).sum(-1)) for x, r in zip(got, ref_lp)])),
               "decode_step_ms": float(np.median(step_s) * 1e3)}
        print(f"{plan:22s} top-1 = fp32 {rec['top1_agree']:.4f}  first token {rec['first_token_agree']:.3f}  "
              f"KL {rec['kl']:.4f}  decode step {rec['decode_step_ms']:.1f} ms  ({time.perf_counter() - t:.0f} s)",
              flush=True)
        log_jsonl("quant_fidelity", rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
