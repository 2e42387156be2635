"""The generator's per-machine execution plan (engine/plan.py): measured by `make models` for
this CPU, a rule from CPU features otherwise, overridable; a prefill on one variant's
weights and a decode on another's, alone or in the scheduler's batch."""

from __future__ import annotations

import json

import pytest

from engine.generate import Completion, Generator, SamplingParams
from engine import plan as plan_module
from engine.config import Config
from engine.errors import InvalidInput
from engine.plan import (AUTO_VARIANTS, DRAFT_YIELD, INT8_DOT, PLAN_SPEED_TOLERANCE, Plan, built_variants,
                         cpu_features, cpu_key, draft_choice, drafts_pay_in_full_runs, eligible, fastest, for_config,
                         measured, recorded, resolve, rule, verify_choice)
from engine.scheduler import Scheduler


@pytest.fixture(scope="module")
def mixed(config):
    """fp32 prefill, int8 decode: the plan of CPUs without 8-bit dot-product instructions."""
    return Generator(config.gen_model_dir, variant="int8", prefill_variant="fp32", threads=2,
                     context_window=config.context_window)


def test_make_models_recorded_a_measured_plan_for_this_cpu(config):
    plan = recorded(config.gen_model_dir)
    assert plan is not None, "make models measures the plan of a CPU it has not seen (engine.plan --measure)"
    assert plan.source == "measured" and plan.cpu == cpu_key()
    variants = built_variants(config.gen_model_dir)
    assert {plan.prefill, plan.decode} <= set(variants) and set(plan.rates) == set(variants)
    for r in plan.rates.values():
        assert r["prefill"] > 0 and r["decode"] > 0 and r["batch_decode"] > 0 and r["verify"] > 0
    auto = eligible(plan.rates)
    for phase, chosen in (("prefill", plan.prefill), ("decode", plan.decode)):  # the fastest but for noise
        assert chosen == fastest(plan.rates, phase) and chosen in auto and "int4" in plan.rates
        assert plan.rates[chosen][phase] >= (1 - PLAN_SPEED_TOLERANCE) * max(plan.rates[v][phase] for v in auto)
    assert all(r["verify_full"] > 0 for r in plan.rates.values()), "full runs through the row-slots graph"
    assert plan.objective == "latency" and measured(plan)
    # the recorded verify choice is what `measure` chose; a plan in use chooses again from the
    # rates (a manifest from before a change of verify_choice keeps its old choice)
    latency = resolve(config.gen_model_dir)
    assert plan.verify in auto and latency.verify == verify_choice(plan.rates, plan.decode, plan.prefill)
    assert f"drafts verified on {latency.verify} up to {latency.drafts} a run" in latency.describe()
    assert all(r["verify_long"] > 0 for r in plan.rates.values())
    assert latency.drafts == draft_choice(plan.rates, latency.verify) == config.draft_tokens
    manifest = json.loads((config.gen_model_dir / "manifest.json").read_text())
    entry = manifest["execution_plans"][cpu_key()]
    assert (entry["decode"], entry["verify"]) == (plan.decode, plan.verify)
    assert entry["batch_decode"] == fastest(plan.rates, "batch_decode")


def test_throughput_objective_decodes_on_the_fastest_full_batch(config):
    """The plan times a full batch too; the throughput objective serves the variant that
    decodes most tokens/s over all its rows, the latency objective (default) a row alone."""
    latency, throughput = (resolve(config.gen_model_dir, objective=o) for o in ("latency", "throughput"))
    auto = eligible(latency.rates)
    assert latency.decode == fastest(latency.rates, "decode") and latency.decode in auto
    assert throughput.decode == fastest(latency.rates, "batch_decode")
    assert throughput.prefill == latency.prefill and throughput.source == "measured"
    assert "for throughput" in throughput.describe() and "for latency" in latency.describe()
    assert for_config(config.replace(plan_objective="throughput")) == throughput
    assert for_config(config) == latency
    forced = resolve(config.gen_model_dir, decode="fp32", objective="throughput")
    assert forced.decode == "fp32" and forced.source == "config", "a configured decode beats either objective"
    with pytest.raises(InvalidInput, match="plan_objective must be one of"):
        Config(plan_objective="fastest")
    # speculative decoding follows the objective unless configured: it serves one stream
    # faster; a full batch speculates where full verify runs keep more tokens/s than its
    # one-token steps make
    pays = drafts_pay_in_full_runs(latency.rates, throughput.verify, throughput.decode)
    assert throughput.verify == verify_choice(latency.rates, throughput.decode, throughput.prefill, "throughput")
    assert Config().draft_tokens in DRAFT_YIELD
    want = draft_choice(latency.rates, throughput.verify) if pays else 0  # its own verify weights' count
    assert Config(plan_objective="throughput").draft_tokens == throughput.drafts == want
    assert Config(plan_objective="throughput", speculative_tokens=2).draft_tokens == 2
    assert Config(speculative_tokens=0).draft_tokens == 0
    for bad in (-1, 8, 2.5, True):
        with pytest.raises(InvalidInput, match="speculative_tokens must be an integer in"):
            Config(speculative_tokens=bad)


def test_a_plan_recorded_before_batch_or_verify_rates_is_measured_again(tmp_path):
    """A manifest from before batched rates: throughput falls back to the one-row choice;
    from before verify rates: drafts are verified on the decode's weights; either way
    `engine.plan --measure --if-missing` (make models) measures this CPU again."""
    rates = {"int8": {"prefill": 300.0, "decode": 25.0}, "int4": {"prefill": 200.0, "decode": 40.0}}

    def record(**entry):
        (tmp_path / "manifest.json").write_text(json.dumps({"execution_plans": {
            cpu_key(): {"prefill": "int8", "decode": "int4", "rates": rates, **entry}}}))
        return recorded(tmp_path)

    old = record()
    assert old is not None and not measured(old) and not measured(old, "batch_decode")
    assert resolve(tmp_path, objective="throughput").decode == "int4"
    assert resolve(tmp_path).verify == "int4" and resolve(tmp_path, decode="int8").verify == "int8"
    for r, batch in zip(rates.values(), (150.0, 90.0)):
        r["batch_decode"] = batch
    assert measured(record(batch_decode="int8"), "batch_decode") and not measured(recorded(tmp_path))
    assert resolve(tmp_path, objective="throughput").decode == "int8"
    assert resolve(tmp_path).decode == "int4" and resolve(tmp_path).verify == "int4"
    for r, verify in zip(rates.values(), (120.0, 80.0)):
        r["verify"] = verify
    assert not measured(record(batch_decode="int8", verify="int8")), "runs of 8 tokens not measured yet"
    latency = resolve(tmp_path)
    assert (latency.decode, latency.verify, latency.source, latency.drafts) == ("int4", "int8", "measured", 3)
    assert resolve(tmp_path, decode="fp32").verify == "int8", "a measured verify is its own phase"
    for r, long in zip(rates.values(), (230.0, 100.0)):  # int8: 8 tokens in 35 ms against 4 in 33
        r["verify_long"] = long
    assert not measured(record(batch_decode="int8", verify="int8")), "full verify runs not measured yet"
    assert resolve(tmp_path).drafts == 7 and resolve(tmp_path, verify="int4").drafts == 3
    for r, full in zip(rates.values(), (150.0, 400.0)):  # int8 at half int4's speed in a full run
        r["verify_full"] = full
    assert measured(record(batch_decode="int8", verify="int8"))
    assert resolve(tmp_path).verify == "int8" and resolve(tmp_path, objective="throughput").verify == "int4"


def test_a_near_tie_goes_to_the_most_faithful_variant(monkeypatch):
    """Every phase: within 10% of the fastest rate, the variant closest to fp32 wins (int8,
    then w8a8, then int4), so noise between two measurements does not flip the plan; further
    off, speed wins. w8a8 only where the CPU has 8-bit dot products."""
    monkeypatch.setattr(plan_module, "has_int8_dot", lambda: True)  # as on a VNNI / AMX CPU, whatever runs this

    def rates(phase, **r):
        return {v: {phase: x} for v, x in r.items()}

    assert fastest(rates("batch_decode", w8a8=202.5, int4=202.9), "batch_decode") == "w8a8"
    assert fastest(rates("batch_decode", w8a8=225.9, int4=206.6, int8=188.8), "batch_decode") == "w8a8"
    assert fastest(rates("decode", int4=75.9, int8=47.4, w8a8=43.5), "decode") == "int4"
    assert fastest(rates("decode", int4=100.0, int8=91.0), "decode") == "int8"
    assert fastest(rates("decode", int4=100.0, int8=89.0), "decode") == "int4"
    assert fastest(rates("prefill", w8a8=679.0, int8=400.0, fp32=254.0), "prefill") == "w8a8"
    assert fastest(rates("prefill", w8a8=100.0, fp32=95.0), "prefill") == "fp32"
    monkeypatch.setattr(plan_module, "has_int8_dot", lambda: False)  # the AVX2 EPYC: w8a8 is never chosen
    assert fastest(rates("prefill", w8a8=679.0, int8=400.0, fp32=254.0), "prefill") == "int8"


def test_verify_runs_take_the_most_faithful_of_the_fastest(monkeypatch):
    """Verify runs decide a stream's tokens: within 10% of the fastest verify rate, the
    variant closest to fp32 wins (int8, then w8a8, then int4); further off, speed wins,
    alone and in a full run."""
    # as on a CPU with 8-bit dot products, whatever runs this (without them w8a8 is not
    # eligible: test_w8a8_is_chosen_only_with_8_bit_dot_products)
    monkeypatch.setattr(plan_module, "has_int8_dot", lambda: True)

    def rates(**verify):
        return {v: {"verify": r} for v, r in verify.items()}

    assert verify_choice(rates(int4=105.0, int8=100.0), "int4") == "int8"
    assert verify_choice(rates(int4=120.0, int8=100.0), "int8") == "int4"
    assert verify_choice(rates(int4=100.0, fp32=95.0, int8=80.0), "int4") == "fp32"
    assert verify_choice(rates(int4=100.0, int8=50.0, fp32=30.0), "int8") == "int4"
    # under the throughput objective a full run (8 rows of 4 tokens) counts too: the lower of
    # a variant's two shares of the fastest rate; w8a8 at 0.88 alone and 1.0 full beats int8
    # at 1.0 alone and 0.5 full; under latency (a lone row's run) int8 wins
    def both(**r):
        return {v: {"verify": a, "verify_full": f} for v, (a, f) in r.items()}

    def busy(rates, default, prefill=None):
        return verify_choice(rates, default, prefill, "throughput")

    assert busy(both(int8=(145.0, 200.0), w8a8=(128.0, 400.0)), "int4") == "w8a8"
    assert verify_choice(both(int8=(145.0, 200.0), w8a8=(128.0, 400.0)), "int4") == "int8"
    assert verify_choice(both(int8=(145.0, 200.0), w8a8=(128.0, 400.0)), "int4", "w8a8") == "int8", "too slow"
    assert busy(both(int8=(145.0, 380.0), w8a8=(128.0, 400.0)), "int4") == "int8"
    assert busy(both(int8=(100.0, 0.0), int4=(120.0, 0.0)), "int8") == "int4", "no full runs: alone"
    # of the close ones, the prefill's weights (its chunks ride in verify runs), then fidelity
    assert busy(both(int8=(145.0, 300.0), w8a8=(130.0, 339.0)), "int4") == "int8"
    assert busy(both(int8=(145.0, 300.0), w8a8=(130.0, 339.0)), "int4", "w8a8") == "w8a8"
    assert verify_choice(both(int8=(145.0, 300.0), w8a8=(140.0, 339.0)), "int4", "w8a8") == "w8a8"
    assert busy(both(int8=(145.0, 200.0), w8a8=(128.0, 400.0)), "int4", "int8") == "w8a8", "too slow"
    # a graph that cannot verify measured nothing: the decode's weights, no extra session
    assert verify_choice(rates(int4=0.0, int8=0.0, fp32=0.0), "int4") == "int4"


def test_a_drafts_place_is_worth_what_one_token_steps_make_in_its_time():
    """Plan.draft_worth: the seconds one more token costs a lone row's verify run (its 4- and
    8-token runs) or a shared one (the 8-token run and a full run of 8 rows x 4 tokens), times
    the decode weights' one-token tokens/s (one row; a full batch)."""
    rates = {"w8a8": {"verify": 4 / 0.030, "verify_long": 8 / 0.036, "verify_full": 32 / 0.084},
             "int4": {"decode": 60.0, "batch_decode": 150.0}}
    worth = Plan("w8a8", "int4", "measured", "cpu", rates, verify="w8a8").draft_worth()
    assert worth["alone"] == pytest.approx(0.0015 * 60) and worth["shared"] == pytest.approx(0.002 * 150)
    assert Plan("w8a8", "int4", "measured", "cpu", {"w8a8": {"verify": 100.0}}, verify="w8a8").draft_worth() is None


def test_a_full_batch_speculates_only_where_full_verify_runs_pay():
    """Under the throughput objective drafts are on where a full run of 8 rows x 4 tokens,
    keeping DRAFT_YIELD's 2.51 tokens a row, makes more tokens/s than a full batch's
    one-token steps (w8a8 on the AVX-512 VNNI EPYC: 420 x 2.51 / 4 = 264 against 226)."""
    rates = {"w8a8": {"verify_full": 420.0, "batch_decode": 226.0}, "int4": {"verify_full": 290.0,
                                                                          "batch_decode": 207.0}}
    assert drafts_pay_in_full_runs(rates, "w8a8", "w8a8")
    assert not drafts_pay_in_full_runs(rates, "int4", "w8a8"), "290 x 2.51 / 4 = 182 < 226"
    assert not drafts_pay_in_full_runs({"w8a8": {"batch_decode": 226.0}}, "w8a8", "w8a8"), "not measured"


def test_drafts_per_run_follow_what_a_longer_run_costs():
    """7 drafts where a run of 8 tokens costs little more than one of 4 (w8a8 on the AMX
    Xeon), 3 where it costs much more (int4 there), 3 where runs of 8 were not measured."""
    def rates(short, long):
        return {"v": {"verify": short, "verify_long": long}}

    assert draft_choice(rates(4 / 0.0313, 8 / 0.0330), "v") == 7  # 31.3 ms against 33.0
    assert draft_choice(rates(4 / 0.0481, 8 / 0.0753), "v") == 3  # 48.1 ms against 75.3
    assert draft_choice(rates(100.0, 0.0), "v") == 3 and draft_choice({}, "v") == 3


def test_rule_follows_cpu_features(config):
    _, feats = cpu_features()
    dot = any(f in feats for f in INT8_DOT)
    plan = rule(["fp32", "int8", "int4"])
    assert plan.decode == "int8"  # int4 only when measured faster here, or configured
    assert plan.prefill == ("int8" if dot else "fp32")
    assert rule(["fp32", "int8", "int4", "w8a8"]).prefill == ("w8a8" if dot else "fp32")
    assert rule(["fp32"]) == Plan("fp32", "fp32", "rule", cpu_key())
    # a verify run is a short prefill: on w8a8 where 8-bit dot products make it fast
    assert rule(["fp32", "int8", "int4", "w8a8"]).verify == ("w8a8" if dot else "int8")
    assert "chosen by CPU features" in plan.describe()


def test_w8a8_is_chosen_only_with_8_bit_dot_products(config, monkeypatch, caplog):
    """Without VNNI / AMX onnxruntime's u8 x s8 kernels saturate 16-bit pair sums: there w8a8
    is measured but no plan takes it, by rule or by measurement, and configuring it warns."""
    everything = ["fp32", "int8", "int4", "w8a8"]
    monkeypatch.setattr(plan_module, "cpu_features", lambda: ("AVX2 CPU", ["avx2"]))
    assert eligible(everything) == ["fp32", "int8", "int4"]
    assert rule(everything).prefill == "fp32"
    with caplog.at_level("WARNING", logger="engine.plan"):
        assert resolve(config.gen_model_dir, prefill="w8a8").prefill == "w8a8"
    assert "without 8-bit dot products" in caplog.text
    monkeypatch.setattr(plan_module, "cpu_features", lambda: ("AMX CPU", ["avx2", "avx512f", "avx512_vnni", "amx_int8"]))
    assert eligible(everything) == everything and rule(everything).prefill == "w8a8"
    assert set(AUTO_VARIANTS) == set(everything)


def test_config_overrides_the_plan(config):
    base = resolve(config.gen_model_dir)
    other = "fp32" if base.prefill != "fp32" else "int8"  # a prefill this machine's plan did not choose
    forced = resolve(config.gen_model_dir, decode=base.decode, prefill=other)
    assert (forced.prefill, forced.decode, forced.source, forced.cpu) == (other, base.decode, "config", cpu_key())
    same = resolve(config.gen_model_dir, decode=base.decode, prefill=base.prefill)
    assert same == base, "asking for what the plan chose overrides nothing"
    decode = "int4" if base.decode != "int4" else "int8"  # a decode this machine's plan did not choose
    auto = resolve(config.gen_model_dir, decode=decode)
    assert auto.decode == decode and auto.source == "config" and auto.prefill == base.prefill
    assert resolve(config.gen_model_dir, provider="cuda") == Plan("int8", "int8", "config", "cuda")
    verify = "fp32" if base.verify != "fp32" else "int8"
    own = for_config(config.replace(gen_verify_variant=verify))
    assert (own.prefill, own.decode, own.verify, own.source) == (base.prefill, base.decode, verify, "config")
    with pytest.raises(InvalidInput, match="gen_verify_variant must be one of"):
        Config(gen_verify_variant="int3")


def test_mixed_plan_prefills_on_fp32_and_decodes_on_int8(mixed, generator):
    assert mixed.prefill_variant == "fp32" and mixed.prefill_session is not mixed.session
    prompt = mixed.encode(mixed.render_chat([{"role": "user", "content": "Name three colours of tea."}]))
    params = SamplingParams(max_new_tokens=12)
    comp = next(ev for ev in mixed.stream_ids(prompt, params) if isinstance(ev, Completion))
    assert comp.completion_tokens >= 1 and comp.text.strip()
    # the same tokens through the scheduler, alone and beside other rows
    assert_same_in_a_batch(mixed, prompt, params, comp.token_ids, repeats=4, other_tokens=20, alone_too=True)


def assert_same_in_a_batch(gen, prompt, params, want, *, repeats, other_tokens, alone_too=False):
    """`prompt` gives the tokens `want` in the scheduler beside another row (and alone first)."""
    s = Scheduler(gen, prefix_cache_mb=0, prefill_chunk=64, block_tokens=16)
    try:
        if alone_too:
            assert s.submit(prompt, params).result().token_ids == want
        other = gen.encode(gen.render_chat([{"role": "user", "content": "Why is the sky blue? " * repeats}]))
        tickets = [s.submit(other, SamplingParams(max_new_tokens=other_tokens)), s.submit(prompt, params)]
        assert tickets[1].result().token_ids == want
        tickets[0].result()
    finally:
        s.close()


def test_int4_decodes_when_configured(config):
    """The 4-bit weights (chosen by a measured plan where they decode fastest): a sensible
    answer, and the same tokens alone and beside another row in the scheduler."""
    gen = Generator(config.gen_model_dir, variant="int4", threads=2, context_window=config.context_window)
    prompt = gen.encode(gen.render_chat([{"role": "user", "content": "What is the capital of France? One word."}]))
    params = SamplingParams(max_new_tokens=8)
    alone = gen.generate_ids([prompt], params)[0]
    assert "Paris" in alone.text
    assert_same_in_a_batch(gen, prompt, params, alone.token_ids, repeats=3, other_tokens=16)


def test_w8a8_prefill_is_exact_in_chunks_and_hands_over_to_the_decoder(config):
    """8-bit activations scaled per row: a token's keys and values are the same whether its
    prompt is prefilled at once or in chunks (what the prefix cache and chunked prefill rely
    on), and a w8a8 prefill before an int4 decode answers sensibly, with the same tokens alone
    and beside another row in the scheduler."""
    import numpy as np

    gen = Generator(config.gen_model_dir, variant="int4", prefill_variant="w8a8", threads=2,
                    context_window=config.context_window)
    prompt = gen.encode(gen.render_chat([{"role": "user", "content": "What is the capital of France? One word."}]))
    whole_logits, whole = gen.prefill(prompt)
    _, head = gen.prefill(prompt[:16])
    _, mid = gen.prefill(prompt[16:32], head)
    tail_logits, chunked = gen.prefill(prompt[32:], mid)
    assert all(np.array_equal(a, b) for a, b in zip(whole, chunked))
    assert np.array_equal(whole_logits, tail_logits)
    params = SamplingParams(max_new_tokens=8)
    alone = gen.generate_ids([prompt], params)[0]
    assert "Paris" in alone.text
    assert_same_in_a_batch(gen, prompt, params, alone.token_ids, repeats=3, other_tokens=16)


def test_drafts_verified_on_their_own_weights_keep_every_request_exact(config):
    """The verify phase on a third variant (int8 decode, fp32 prefill, int4 verify runs: all
    eligible on every CPU): speculating rows run on it, batched rows on the decode's weights,
    and each request gets the tokens it gets alone; drafts are accepted."""
    gen = Generator(config.gen_model_dir, variant="int8", prefill_variant="fp32", verify_variant="int4", threads=2,
                    context_window=config.context_window)
    assert gen.verify_variant == "int4" and gen.verify_session not in (gen.session, gen.prefill_session)
    shared = Generator(config.gen_model_dir, variant="int8", prefill_variant="fp32", verify_variant="fp32", threads=2,
                       context_window=config.context_window)
    assert shared.verify_session is shared.prefill_session, "a variant already loaded is not loaded twice"
    del shared
    text = "The Amazon river flows through Brazil, Peru and Colombia into the Atlantic Ocean."
    spec = gen.encode(gen.render_chat([{"role": "user", "content": f"Repeat exactly: {text}"}]))
    batched = gen.encode(gen.render_chat([{"role": "user", "content": "Name three colours of tea."}]))
    params = [SamplingParams(max_new_tokens=20), SamplingParams(max_new_tokens=16, speculative_tokens=0)]
    s = Scheduler(gen, prefix_cache_mb=0, draft_tokens=3)
    try:
        alone = [s.submit(spec, params[0]).result(), s.submit(batched, params[1], streamed=False).result()]
        assert alone[0].accepted_prediction_tokens > 0 and alone[1].accepted_prediction_tokens == 0
        assert s._solo.session is gen.verify_session
        together = [s.submit(spec, params[0]), s.submit(batched, params[1], streamed=False)]
        assert [t.result().token_ids for t in together] == [c.token_ids for c in alone]
    finally:
        s.close()
