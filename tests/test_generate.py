"""engine/generate.py on the real default model: KV-cache decoding equals transformers,
streaming is UTF-8 safe, sampling is reproducible, stops and limits give the right reason."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InvalidInput
from engine.generate import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Completion, Generator, SamplingParams

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
