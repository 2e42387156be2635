"""How fast does our ONNX generator prefill and decode, against transformers `generate`?

    .venv/bin/python benchmarks/generate_throughput.py [--new-tokens 64] [--batches 1,4,16] [--paragraphs 8]

Same model (the default Qwen2.5-Coder-0.5B-Instruct: ours from models/, transformers from
the dequantized HF folder that `make models` leaves in .cache/hf), same prompts (SQuAD dev
paragraphs + question in the chat template, or a built-in paragraph if SQuAD is absent),
greedy, same thread count, one process. Prints prefill tokens/s, time to first token,
decode tokens/s per system and the ratio, then batch throughput (generated tokens/s) at
several batch sizes. One JSON line per measurement goes to bench-results/generate_throughput.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.config import Config  # noqa: E402
from engine.generate import Generator, SamplingParams  # noqa: E402

SQUAD = REPO.parent / "shared" / "data" / "squad-dev-v1.1.json"
FALLBACK = ("The Fresnel lens, invented by Augustin-Jean Fresnel in 1822, bends light with concentric rings "
            "of glass prisms, so a small flame can be seen more than twenty nautical miles away. ") * 8


def prompts(gen: Generator, n: int, paragraphs: int = 1) -> list[list[int]]:
    """n chat prompts, each `paragraphs` consecutive SQuAD paragraphs as numbered sources (a
    RAG prompt's shape) and the first one's question."""
    items = []
    want = n * paragraphs
    if SQUAD.exists():
        data = json.loads(SQUAD.read_text())["data"]
        for art in data:
            for para in art["paragraphs"]:
                items.append((para["context"], para["qas"][0]["question"]))
                if len(items) >= want:
                    break
            if len(items) >= want:
                break
    while len(items) < want:
        items.append((FALLBACK, "Who invented the lens and what does it do? Explain in detail."))
    out = []
    for i in range(n):
        group = items[i * paragraphs:(i + 1) * paragraphs]
        ctx = group[0][0] if paragraphs == 1 else "\n\n".join(f"[{j + 1}] {c}" for j, (c, _) in enumerate(group))
        text = gen.render_chat([{"role": "user", "content": f"{ctx}\n\nQuestion: {group[0][1]}\n"
                                 "Explain your answer in detail."}])
        out.append(gen.encode(text))
    return out


def log(rec: dict) -> None:
    out = REPO / "bench-results"
    out.mkdir(exist_ok=True)
    with open(out / "generate_throughput.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), **rec}) + "\n")


def run_ours(gen: Generator, ps: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens)
    gen.generate_ids([ps[0]], SamplingParams(max_new_tokens=4))  # warm-up
    prefill, decode, ttft, ntoks = [], [], [], []
    for p in ps:
        c = gen.generate_ids([p], params)[0]
        prefill.append(len(p) / (c.prefill_ns / 1e9))
        ttft.append(c.first_token_ns / 1e6)
        if c.completion_tokens > 1:
            decode.append((c.completion_tokens - 1) / (c.decode_ns / 1e9))
        ntoks.append(c.completion_tokens)
    return {"prefill_tok_s": statistics.median(prefill), "ttft_ms": statistics.median(ttft),
            "decode_tok_s": statistics.median(decode), "tokens": sum(ntoks)}


def run_hf(model, ps: list[list[int]], new_tokens: int, torch) -> dict:
    def gen(p, n):
        x = torch.tensor([p])
        with torch.inference_mode():
            return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                  eos_token_id=[151643, 151645], pad_token_id=151643)

    gen(ps[0], 4)  # warm-up
    prefill, decode, ttft, ntoks = [], [], [], []
    for p in ps:
        t0 = time.perf_counter()
        gen(p, 1)
        t1 = time.perf_counter()
        out = gen(p, new_tokens)
        t2 = time.perf_counter()
        n = out.shape[1] - len(p)
        first = t1 - t0
        prefill.append(len(p) / first)
        ttft.append(first * 1e3)
        if n > 1:
            decode.append((n - 1) / max((t2 - t1) - first, 1e-9))
        ntoks.append(n)
    return {"prefill_tok_s": statistics.median(prefill), "ttft_ms": statistics.median(ttft),
            "decode_tok_s": statistics.median(decode), "tokens": sum(ntoks)}


def batch_ours(gen: Generator, ps: list[list[int]], new_tokens: int, b: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens)
    t0 = time.perf_counter()
    done = gen.generate_ids(ps[:b], params)
    return sum(c.completion_tokens for c in done) / (time.perf_counter() - t0)


def batch_hf(model, tok_pad: int, ps: list[list[int]], new_tokens: int, b: int, torch) -> float:
    rows = ps[:b]
    w = max(len(p) for p in rows)
    ids = torch.full((b, w), tok_pad, dtype=torch.long)
    mask = torch.zeros((b, w), dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, w - len(p):] = torch.tensor(p)
        mask[i, w - len(p):] = 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=[151643, 151645], pad_token_id=tok_pad)
    gen = out[:, w:]
    n = int(((gen != tok_pad) & (gen != 151645)).sum())
    return n / (time.perf_counter() - t0)


def run(args) -> None:
    cfg = Config()
    threads = args.threads or cfg.threads
    ours = {v: Generator(cfg.gen_model_dir, variant=v, threads=threads, context_window=4096)
            for v in args.variants.split(",")}
    first = next(iter(ours.values()))
    ps = prompts(first, max(args.prompts, max(args.batches)), args.paragraphs)
    single = ps[:args.prompts]
    print(f"prompts: {len(single)} for latency, median prompt {statistics.median(len(p) for p in single)} tokens; "
          f"{args.new_tokens} new tokens, greedy, {threads} threads")
    results = {}
    for v, gen in ours.items():
        results[f"ours-{v}"] = run_ours(gen, single, args.new_tokens)
    hf = None
    if not args.no_baseline:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        hf = AutoModelForCausalLM.from_pretrained(REPO / ".cache/hf" / cfg.gen_model, dtype=torch.float32).eval()
        results["transformers-fp32"] = run_hf(hf, single, args.new_tokens, torch)
    base = results.get("transformers-fp32")
    for name, r in results.items():
        ratio = ""
        if base and name != "transformers-fp32":
            r["decode_speedup"] = r["decode_tok_s"] / base["decode_tok_s"]
            r["prefill_speedup"] = r["prefill_tok_s"] / base["prefill_tok_s"]
            ratio = f"  decode speedup {r['decode_speedup']:.2f}x, prefill speedup {r['prefill_speedup']:.2f}x"
        print(f"{name:<18} prefill {r['prefill_tok_s']:8.1f} tok/s  TTFT {r['ttft_ms']:8.1f} ms  "
              f"decode {r['decode_tok_s']:6.1f} tok/s{ratio}")
        log({"system": name, "threads": threads, "new_tokens": args.new_tokens, "paragraphs": args.paragraphs,
             "prompt_tokens_median": statistics.median(len(p) for p in single), **r})
    for b in args.batches:
        line = f"batch {b:>3}:"
        for v, gen in ours.items():
            tps = batch_ours(gen, ps, args.new_tokens, b)
            line += f"  ours-{v} {tps:7.1f} tok/s"
            log({"system": f"ours-{v}", "batch": b, "gen_tok_s": tps})
        if hf is not None and b <= args.hf_max_batch:
            import torch

            tps = batch_hf(hf, 151643, ps, args.new_tokens, b, torch)
            line += f"  transformers-fp32 {tps:7.1f} tok/s"
            log({"system": "transformers-fp32", "batch": b, "gen_tok_s": tps})
        print(line, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=3, help="prompts timed one by one")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--variants", default="int8,fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--paragraphs", type=int, default=1, help="SQuAD paragraphs per prompt (8: ~1,300 tokens, "
                   "a RAG prompt with several sources)")
    p.add_argument("--hf-max-batch", type=int, default=4, help="largest batch also run with transformers")
    p.add_argument("--no-baseline", action="store_true")
    run(p.parse_args())


if __name__ == "__main__":
    main()
