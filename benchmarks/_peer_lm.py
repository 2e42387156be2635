"""One peer generator, single stream, run inside the peer's own virtual environment.

    .cache/peers/llama/bin/python benchmarks/_peer_lm.py < job.json    # llama-cpp-python
    .cache/peers/genai/bin/python benchmarks/_peer_lm.py < job.json    # onnxruntime-genai

Imports nothing from the engine (the peers need other versions of its dependencies).
The job, a JSON object on stdin: {"peer": "llama" | "genai", "model": PATH, "threads": N,
"new_tokens": N, "prompts": [TEXT, ...], "prompt_lookup": N (llama only, optional: draft N
tokens per step from the prompt, llama-cpp-python's LlamaPromptLookupDecoding; 0 or absent =
off)}; each prompt is the full chat text (special tokens
written out), answered greedily. Prints one JSON line per prompt: prompt_tokens, prefill_s
(time to the first generated token: the whole prompt's forward pass), decode_tok_per_s
(the tokens after the first), text. benchmarks/serve_answers.py --peers drives it.
"""

from __future__ import annotations

import json
import sys
import time


def run_llama(job: dict):
    from llama_cpp import Llama

    draft = None
    if job.get("prompt_lookup"):
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=job["prompt_lookup"])
    # With a draft model llama-cpp-python keeps every position's logits, but sizes its score
    # buffer by `logits_all` (n_batch rows without it): a prompt past 512 tokens then fails
    # ("could not broadcast ... into shape (0,)"), so ask for them.
    llm = Llama(model_path=job["model"], n_ctx=4096, n_batch=512, n_threads=job["threads"],
                n_threads_batch=job["threads"], verbose=False, draft_model=draft, logits_all=draft is not None)
    first = llm.tokenize(b"Hello", add_bos=False, special=True)
    for _ in llm.generate(first, temp=0.0, top_k=1):  # warm up
        break
    for text in job["prompts"]:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        t0 = time.perf_counter()
        stamps, out = [], []
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            if tok == llm.token_eos() or len(out) >= job["new_tokens"]:
                break
            out.append(tok)
        yield ids, t0, stamps, llm.detokenize(out).decode(errors="replace")


def run_genai(job: dict):
    from pathlib import Path

    import onnxruntime_genai as og

    cfg_path = Path(job["model"]) / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    options = cfg["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") != job["threads"]:  # the same threads as ours
        options.update(intra_op_num_threads=job["threads"], inter_op_num_threads=1)
        cfg_path.write_text(json.dumps(cfg, indent=4))
    model = og.Model(job["model"])
    tok = og.Tokenizer(model)
    for text in ["Hello", *job["prompts"]]:
        ids = list(tok.encode(text))
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + job["new_tokens"])
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)  # the prompt's forward pass
        stamps, out = [], []
        while not gen.is_done() and len(out) < job["new_tokens"]:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
            stamps.append(time.perf_counter())
        del gen
        if text != "Hello":  # the first one warms up
            yield ids, t0, stamps, tok.decode(out)


def main() -> None:
    job = json.load(sys.stdin)
    runner = {"llama": run_llama, "genai": run_genai}[job["peer"]]
    for ids, t0, stamps, text in runner(job):
        decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
        print(json.dumps({"prompt_tokens": len(ids), "prefill_s": stamps[0] - t0, "decode_tok_per_s": decode,
                          "generated": len(stamps), "text": text}), flush=True)


if __name__ == "__main__":
    main()
