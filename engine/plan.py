"""Per-machine execution plan of the generator: which weights prefill, which decode.

The two phases stress a CPU differently. Decode reads every weight once per step for one
token per row, so fewer bytes per weight win everywhere measured (int8 MatMulNBits decodes
~2x faster than fp32 on AVX2 and on AVX-512). Prefill multiplies whole prompts by the
weights, so it runs at the CPU's arithmetic speed, and int8 arithmetic is only fast with
8-bit dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX): on an AVX2-only AMD EPYC, int8
prefilled an 850-token prompt at 96 tokens/s against fp32's 156, while on an avx512_vnni
machine int8 won. So the plan is chosen per machine:
  - `measure` times both phases on each built variant (a 512-token prompt and 16 decode
    steps) and records the fastest per phase in the model's manifest.json under the CPU's
    model name and features (`make models` does this once per CPU);
  - without a measurement for this CPU, `rule` decides from the CPU's features.
Decode is timed twice: one row alone (a lone stream's speed, the "latency" objective, the
default) and a full batch of MEASURE_BATCH_ROWS rows (the aggregate tokens/s of a busy
server, "throughput"). They can disagree: on the AMX Xeon int4 MatMulNBits decodes one row
fastest, but 8 rows cost it ~2.5x one row, while w8a8's integer GEMM takes 8 rows for ~1.3x.
A server decodes every row on one variant (a request's greedy tokens must not depend on its
batch), so Config.plan_objective picks which of the two the plan serves.
A third phase, `verify`, is speculative decoding's run (a row's last token and three drafts
from its prompt, engine/scheduler.py): speculating rows run apart from the one-token
steps (all of them together, through the row-slots graph), so they may take other weights
than the one-token steps: of those within VERIFY_SPEED_TOLERANCE of the best at a lone
row's run of MEASURE_VERIFY_TOKENS tokens (the latency objective) or at both that and a
busy server's full run (MEASURE_BATCH_ROWS rows of them; throughput), the prefill's weights
(newcomers' prompt chunks then ride in verify runs), else the most faithful to fp32
(verify_choice). On the AMX Xeon, w8a8's integer GEMM takes 4 tokens for little more than
one (int4's MatMulNBits ~1.6x), so w8a8 verifies there, while int4 stays the fastest
one-token step; on the AVX-512 VNNI EPYC without AMX int4 runs a lone row's tokens fastest
(2 for the cost of 1) and w8a8 a full run, so int4 verifies for latency, w8a8 for throughput.
A prefill on fp32 weights and a decode on int8 weights share one KV cache layout (the
same graph, quantized), so the decoder continues from the fp32 prefill's keys and values.
Users override any phase (Config.gen_variant for decode, Config.gen_prefill_variant,
Config.gen_verify_variant).
The variants: fp32, int8 and int4 (weight-only MatMulNBits), w8a8 (8-bit weights and
activations through onnxruntime's integer GEMM; engine/export_lm.py); a plan measured here
may choose any of them, w8a8 only where the CPU has 8-bit dot products (NEEDS_INT8_DOT).

    .venv/bin/python -m engine.plan [--measure] [--model-dir models/qwen2.5-coder-0.5b-instruct]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import time
from pathlib import Path

from .config import PLAN_OBJECTIVES, SPECULATIVE_TOKENS_LATENCY
from .fsutil import atomic_write

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")
# The variants a measured plan chooses from, per phase the fastest. int4 joined when its
# recipe became searched asymmetric blocks (engine/export_lm.py QUANT_RECIPES): gold-
# paragraph SQuAD F1 (benchmarks/answer_quality.py --plans, AVX-512 VNNI EPYC) 28.2 against
# int8's 27.1 and fp32's 27.8 (60 questions), 25.6 against 24.8 and 26.6 (100 others); it
# gives fp32's very answer less often (37% / 24%; int8 85% / 85%). An int8 prefill before an
# int4 decode, the plan there: F1 24.6 / 24.8, 63% / 58% the same (differences of 2-3 F1 are
# within these samples' noise; README "Answers per plan"). The round-to-nearest int4 before
# it had F1 21.7 and was never chosen.
# w8a8 joined as a prefill candidate: on the AMX Xeon it prefills 512 tokens 3.4x faster
# than int8 (919 against 274 tok/s; its integer GEMM runs on AMX / VNNI, MatMulNBits
# dequantizes blocks first), with the same answers as the int8 > int4 plan (README).
AUTO_VARIANTS = ("int4", "int8", "w8a8", "fp32")
# Its u8 x s8 products are exact only with 8-bit dot-product instructions: without them
# onnxruntime's kernels use VPMADDUBSW, whose 16-bit pair sums saturate. Elsewhere it is
# measured (rates) but never chosen, and configuring it is the user's call.
NEEDS_INT8_DOT = ("w8a8",)
# Without a measurement for this CPU (`rule`), decode on int8: int4 decodes slower than int8
# where its one-row kernel needs a padding row (the AVX2 EPYC) and faster elsewhere.
RULE_DECODE = ("int8", "fp32")
MEASURE_PROMPT_TOKENS = 512
MEASURE_DECODE_STEPS = 16
MEASURE_ROUNDS = 2
# Rows of the batched decode measurement (the server's default row limit,
# config.DEFAULT_MAX_CONCURRENT_GENERATIONS) and the keys each row attends to.
MEASURE_BATCH_ROWS = 8
MEASURE_BATCH_KEYS = 256
# Tokens of the timed verify run: a row's last token and Config's default three drafts.
MEASURE_VERIFY_TOKENS = 4
MEASURE_VERIFY_ROUNDS = 6
# A verify run decides a stream's tokens, and the variants run 4 tokens at close speeds (on
# the AMX Xeon w8a8, int8 and int4 came within 5-30% of each other, in an order that changed
# from one measurement to the next), so among the variants within VERIFY_SPEED_TOLERANCE of
# the fastest the plan takes the one whose tokens follow fp32's closest: FIDELITY, most
# faithful first (benchmarks/quant_fidelity.py, AMX Xeon, mean KL(fp32 || variant) per
# position over 960 answer positions: int8 0.0008, w8a8 0.0047, int4 0.0433).
FIDELITY = ("fp32", "int8", "w8a8", "int4")
VERIFY_SPEED_TOLERANCE = 0.10
# The same holds for every phase: a near tie is noise, and a plan whose choice flips with it
# gives other answers after the next measurement (on the AVX-512 VNNI EPYC a full batch's
# one-token steps ran at 225.9 tok/s on w8a8 against 206.6 on int4 in one `make models`,
# 202.5 against 202.9 in a fresh clone's an hour later: the throughput objective decoded on
# w8a8, then on int4). So `fastest` takes, of the variants within PLAN_SPEED_TOLERANCE of
# the highest rate, the most faithful to fp32 (FIDELITY).
PLAN_SPEED_TOLERANCE = VERIFY_SPEED_TOLERANCE
# Drafts per run under the latency objective (draft_choice): more drafts keep more tokens a
# run but make the run longer, by how much depends on the weights and the CPU (on the AMX
# Xeon w8a8 ran 8 tokens for ~1.05x the time of 4, int4 for ~1.6x). Tokens a greedy
# gold-paragraph SQuAD answer kept per run with k drafts (16 answers of 48 tokens, an
# ad-hoc run through the scheduler, AMX Xeon): 3 drafts 2.51, 7 drafts 3.27. So the plan
# also times runs of MEASURE_VERIFY_LONG_TOKENS tokens and takes the count whose tokens per
# second, DRAFT_YIELD[k] / (time of a (k + 1)-token run), is higher.
DRAFT_YIELD = {SPECULATIVE_TOKENS_LATENCY: 2.51, 7: 3.27}
MEASURE_VERIFY_LONG_TOKENS = 8
# A busy server's verify run is another matter: MEASURE_BATCH_ROWS speculating rows share one
# run of about 32 tokens (scheduler.VERIFY_RUN_TOKENS: 3 drafts a row at 8 rows), where the
# arithmetic, not the weights' bytes, sets the cost. On the AVX-512 VNNI EPYC (no AMX) int8
# MatMulNBits ran 4 tokens faster than w8a8 (146-150 against 126-130 tok/s) but full runs at
# 0.7-0.8x w8a8's speed (269-271 against 339-389 tok/s); 8 streams decoding in process made
# 98-112 tok/s verified on int8 against 133-149 on w8a8 (ad-hoc, interleaved; served in one
# run, README: 1.25x at c=8, 1.13x for a lone stream). So the plan also times a full run
# ("verify_full": MEASURE_BATCH_ROWS rows of MEASURE_VERIFY_TOKENS tokens through the
# row-slots graph) and verify_choice weighs both. Of the variants close at
# both, the prefill's: then a newcomer's prompt chunks ride in the verify runs (one pass over
# the weights for both), which made most of that EPYC's difference (8 streams in process: 10.3
# of 29.9 s in prefill runs of their own verified on int8, 2.1 of 20.4 on w8a8, where 36
# chunks rode).
PHASES = ("prefill", "decode", "batch_decode", "verify", "verify_long", "verify_full")


def cpu_features() -> tuple[str, list[str]]:
    """(CPU model name, the vector features among FEATURES it has)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
                break
    except OSError:
        pass
    return model, [f for f in FEATURES if f in flags]


def cpu_key() -> str:
    model, feats = cpu_features()
    return f"{model} [{' '.join(feats) or 'no avx2'}]"


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    prefill: str
    decode: str
    source: str  # "measured", "rule" or "config"
    cpu: str
    # variant -> {"prefill": tok/s, "decode": tok/s one row, "batch_decode": tok/s all rows of a
    # full batch, "verify": tok/s of a MEASURE_VERIFY_TOKENS-token run of one row}
    rates: dict = dataclasses.field(default_factory=dict)
    objective: str = "latency"  # what chose the decode variant (config.PLAN_OBJECTIVES)
    verify: str = ""  # the weights of speculative decoding's verify runs ("": the decode's)
    # drafts per run (0: none unless a request asks; under throughput where they do not pay,
    # drafts_pay_in_full_runs)
    drafts: int = SPECULATIVE_TOKENS_LATENCY

    def __post_init__(self) -> None:
        if not self.verify:
            object.__setattr__(self, "verify", self.decode)

    def draft_worth(self) -> dict[str, float] | None:
        """The chance of being kept a draft needs to be worth its place in a verify run here
        (scheduler.DRAFT_WORTH): the seconds one more token costs such a run on the verify
        weights, from the measured runs ("alone": between a lone row's MEASURE_VERIFY_TOKENS-
        and MEASURE_VERIFY_LONG_TOKENS-token runs; "shared": between the latter and a full run
        of MEASURE_BATCH_ROWS rows of MEASURE_VERIFY_TOKENS), times the tokens per second the
        decode weights make without drafts in that time (one row's one-token steps; a full
        batch's). Also a lone row's run time, "alone_run_s" + "alone_token_s" x its tokens,
        the line through its two measured runs (Ticket.drafts_for_speed). None without
        those rates."""
        r, d = self.rates.get(self.verify, {}), self.rates.get(self.decode, {})
        runs = ((MEASURE_VERIFY_TOKENS, r.get("verify", 0.0)), (MEASURE_VERIFY_LONG_TOKENS, r.get("verify_long", 0.0)),
                (MEASURE_BATCH_ROWS * MEASURE_VERIFY_TOKENS, r.get("verify_full", 0.0)))
        plain = d.get("decode", 0.0), d.get("batch_decode", 0.0)
        if min(rate for _, rate in runs) <= 0 or min(plain) <= 0:
            return None
        (s, ts), (l, tl), (f, tf) = ((n, n / rate) for n, rate in runs)
        token = max((tl - ts) / (l - s), 0.0)
        return {"alone": token * plain[0], "shared": max((tf - tl) / (f - l), 0.0) * plain[1],
                "alone_run_s": max(ts - token * s, 0.0), "alone_token_s": token}

    def describe(self) -> str:
        how = {"measured": "measured on", "rule": "chosen by CPU features for", "config": "set by config on"}[self.source]
        drafts = (f"drafts verified on {self.verify} up to {self.drafts} a run" if self.drafts
                  else "no drafts unless asked")
        return f"prefill {self.prefill}, decode {self.decode} for {self.objective}, {drafts} ({how} {self.cpu})"


def has_int8_dot() -> bool:
    return any(f in cpu_features()[1] for f in INT8_DOT)


def eligible(variants) -> list[str]:
    """The variants among `variants` that a plan may choose on this CPU."""
    dot = has_int8_dot()
    return [v for v in variants if v in AUTO_VARIANTS and (dot or v not in NEEDS_INT8_DOT)]


def rule(variants: list[str], cpu: str | None = None) -> Plan:
    """The plan from CPU features alone (no measurement for this CPU yet): decode on int8
    (RULE_DECODE); prefill and verify runs (several tokens, like a short prefill) with 8-bit
    dot-product instructions on w8a8 (else the decode's weights), prefill without them on fp32."""
    decode = next((v for v in RULE_DECODE if v in variants), variants[0])
    verify = decode
    if has_int8_dot():
        prefill = verify = "w8a8" if "w8a8" in variants else decode
    else:
        prefill = "fp32" if "fp32" in variants else decode
    return Plan(prefill, decode, "rule", cpu or cpu_key(), verify=verify)


def recorded(model_dir: Path) -> Plan | None:
    """The plan measured on this CPU, if `measure` recorded one."""
    try:
        manifest = json.loads((Path(model_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    entry = manifest.get("execution_plans", {}).get(cpu_key())
    if not entry:
        return None
    return Plan(entry["prefill"], entry["decode"], "measured", cpu_key(), entry.get("rates", {}),
                verify=entry.get("verify", ""))


def measured(plan: Plan | None, *phases: str) -> bool:
    """Whether `plan` holds rates of `phases` (default: every phase; plans recorded before
    batched decode or verify runs were measured do not: `make models` measures them again)."""
    want = set(phases or PHASES)
    return bool(plan and plan.rates and all(want <= set(r) for r in plan.rates.values()))


def candidates(rates: dict) -> list[str]:
    """The measured variants a plan may choose here (all of them if none is eligible)."""
    return eligible(rates) or list(rates)


def unfaithfulness(variant: str) -> int:
    """A variant's place in FIDELITY (0: fp32); unknown variants last."""
    return FIDELITY.index(variant) if variant in FIDELITY else len(FIDELITY)


def fastest(rates: dict, phase: str) -> str:
    """Of the eligible variants within PLAN_SPEED_TOLERANCE of the highest `phase` rate, the
    most faithful to fp32 (FIDELITY): a near tie goes the same way from one measurement to
    the next, toward the better answers."""
    auto = candidates(rates)
    top = max(rates[v][phase] for v in auto)
    close = [v for v in auto if rates[v][phase] >= (1 - PLAN_SPEED_TOLERANCE) * top]
    return min(close, key=unfaithfulness)


def verify_choice(rates: dict, default: str, prefill: str | None = None, objective: str = "latency") -> str:
    """The verify runs' variant: each eligible one scores the share of the fastest rate it
    keeps, under the latency objective a lone row's run ("verify"), under throughput also a
    full run ("verify_full", where measured), whichever share is lower; of those within
    VERIFY_SPEED_TOLERANCE of the best score, the prefill's weights (a newcomer's prompt
    chunks then ride in the verify runs instead of runs of their own:
    Scheduler._ride_chunk), else the most faithful to fp32 (FIDELITY). `default` where none
    could verify (a graph from before short_run_logits: no speculative decoding at all).

    A request's tokens must not depend on the load, so one variant verifies every run, and
    the two objectives want different ones where the CPU's kernels differ in kind: on the
    AVX-512 VNNI EPYC (no AMX) a lone row's 2-token int4 run takes what a one-token step
    takes (14.5 against 14.2 ms at ~400 keys) while w8a8's takes twice that (28.5: twice
    the bytes), but 8 rows of 4 tokens run at 290 tok/s on int4 against 420 on w8a8. Served
    there in one run (serve_answers.py, 20 s each): verified on int4, a lone stream 95.9
    tok/s against 75.5, 8 streams 139 against 163 (decode-bound), 592 prompt tok/s against
    749 (RAG prompts; no chunk rides on int4 there)."""
    auto = candidates(rates)
    top = max(rates[v]["verify"] for v in auto)
    if top <= 0:
        return default
    full = max(rates[v].get("verify_full", 0.0) for v in auto) if objective == "throughput" else 0.0

    def score(v: str) -> float:
        alone = rates[v]["verify"] / top
        return min(alone, rates[v].get("verify_full", 0.0) / full) if full > 0 else alone

    best = max(score(v) for v in auto)
    close = [v for v in auto if score(v) >= (1 - VERIFY_SPEED_TOLERANCE) * best]
    return min(close, key=lambda v: (v != prefill, unfaithfulness(v)))


def draft_choice(rates: dict, verify: str) -> int:
    """Drafts per run on `verify`'s weights: of DRAFT_YIELD's counts, the one keeping most
    tokens per second of verify runs (SPECULATIVE_TOKENS_LATENCY without both run lengths)."""
    r = rates.get(verify, {})
    short, long = r.get("verify", 0.0), r.get("verify_long", 0.0)
    if short <= 0 or long <= 0:
        return SPECULATIVE_TOKENS_LATENCY
    seconds = {MEASURE_VERIFY_TOKENS: MEASURE_VERIFY_TOKENS / short,
               MEASURE_VERIFY_LONG_TOKENS: MEASURE_VERIFY_LONG_TOKENS / long}  # a run of n tokens

    def run_time(n: int) -> float:  # linear in n between (and beyond) the two measured lengths
        (a, ta), (b, tb) = sorted(seconds.items())
        return ta + (tb - ta) * (n - a) / (b - a)

    return max(DRAFT_YIELD, key=lambda k: DRAFT_YIELD[k] / max(run_time(k + 1), 1e-9))


def drafts_pay_in_full_runs(rates: dict, verify: str, decode: str) -> bool:
    """Whether a full batch (MEASURE_BATCH_ROWS rows) makes more tokens/s speculating, in
    full verify runs on `verify`'s weights keeping DRAFT_YIELD's tokens of 3 drafts a row
    a run, than in one-token steps on `decode`'s (the throughput objective's drafts; False
    where either is not measured). On the AVX-512 VNNI EPYC: w8a8 runs 8 rows x 4 tokens at
    420 tok/s, so 2.51 of 4 kept make 264 against w8a8's one-token batches' 226 (served in
    one run, 8 decode-bound streams: 164.6 tok/s speculating on w8a8 against 116.4 in
    one-token steps)."""
    full = rates.get(verify, {}).get("verify_full", 0.0)
    steps = rates.get(decode, {}).get("batch_decode", 0.0)
    k = MEASURE_VERIFY_TOKENS - 1
    return full > 0 and steps > 0 and DRAFT_YIELD.get(k, 0.0) / MEASURE_VERIFY_TOKENS * full > steps


def built_variants(model_dir: Path) -> list[str]:
    from .generate import VARIANT_FILES

    return [v for v, f in VARIANT_FILES.items() if (Path(model_dir) / f).exists()]


def resolve(model_dir: Path, *, decode: str = "auto", prefill: str = "auto", verify: str = "auto",
            provider: str = "cpu", objective: str = "latency") -> Plan:
    """The plan to run: the configured phases, with "auto" filled in from this machine's plan
    (on a GPU, which no CPU measurement describes: int8 decodes, and prefills and verifies too).
    The decode is the one fastest for `objective`: "latency", a row alone; "throughput", a
    full batch (a plan measured before batched rates, or none: the same as for latency). An
    "auto" verify follows a configured decode unless the plan measured verify runs."""
    if provider != "cpu":
        decode = "int8" if decode == "auto" else decode
        return Plan(decode if prefill == "auto" else prefill, decode, "config", provider, objective=objective,
                    verify=decode if verify == "auto" else verify,
                    drafts=SPECULATIVE_TOKENS_LATENCY if objective == "latency" else 0)
    plan = recorded(model_dir) or rule(built_variants(model_dir))
    plan = dataclasses.replace(plan, objective=objective)
    if measured(plan, "prefill", "decode"):  # chosen again: a manifest keeps what its measurement chose then
        plan = dataclasses.replace(plan, prefill=fastest(plan.rates, "prefill"), decode=fastest(plan.rates, "decode"))
    if objective == "throughput" and measured(plan, "batch_decode"):
        plan = dataclasses.replace(plan, decode=fastest(plan.rates, "batch_decode"))
    decode = plan.decode if decode == "auto" else decode
    if measured(plan, "verify"):
        plan = dataclasses.replace(plan, verify=verify_choice(
            plan.rates, decode, plan.prefill if prefill == "auto" else prefill, objective))
    elif plan.source != "rule":  # recorded before verify runs were measured: the decode's weights
        plan = dataclasses.replace(plan, verify=decode)
    chosen = (plan.prefill if prefill == "auto" else prefill, decode, plan.verify if verify == "auto" else verify)
    if measured(plan, "verify", "verify_long"):
        plan = dataclasses.replace(plan, drafts=draft_choice(plan.rates, chosen[2]))
    if objective == "throughput" and not drafts_pay_in_full_runs(plan.rates, chosen[2], decode):
        plan = dataclasses.replace(plan, drafts=0)
    if not has_int8_dot() and any(v in NEEDS_INT8_DOT for v in chosen):
        log.warning("%s is configured on a CPU without 8-bit dot products (%s): its integer products "
                    "may saturate there and change answers", "/".join(sorted(set(chosen) & set(NEEDS_INT8_DOT))),
                    plan.cpu)
    if chosen == (plan.prefill, plan.decode, plan.verify):
        return plan
    return Plan(chosen[0], chosen[1], "config", plan.cpu, plan.rates, objective, verify=chosen[2], drafts=plan.drafts)


def for_config(c) -> Plan:
    """resolve() for an engine.config.Config."""
    return resolve(c.gen_model_dir, decode=c.gen_variant, prefill=c.gen_prefill_variant, verify=c.gen_verify_variant,
                   provider=c.provider, objective=c.plan_objective)


def measure(model_dir: Path, threads: int, *, log=print) -> Plan:
    """Time prefill, one-row decode, full-batch decode and verify runs of every built variant
    here; record them, and the fastest of the eligible ones per phase as the plan (verify
    runs: verify_choice)."""
    import numpy as np

    from .generate import Completion, Generator, KVBatch, SamplingParams

    model_dir = Path(model_dir)
    rates: dict[str, dict[str, float]] = {}
    gens = {v: Generator(model_dir, variant=v, threads=threads) for v in built_variants(model_dir)}
    prompt = [int(x) for x in np.random.default_rng(0).integers(1000, 20000, MEASURE_PROMPT_TOKENS)]
    caches = {}
    # Rounds alternate the variants and each keeps its best, so a burst of load on a shared
    # machine slows one round of every variant rather than all of one variant.
    for _ in range(MEASURE_ROUNDS):
        for variant, gen in gens.items():
            gen.generate_ids([prompt[:32]], SamplingParams(max_new_tokens=2))  # warm up
            t0 = time.perf_counter()
            comp = next(ev for ev in gen.stream_ids(prompt, SamplingParams(max_new_tokens=MEASURE_DECODE_STEPS + 1))
                        if isinstance(ev, Completion))
            t1 = time.perf_counter()
            steps = max(comp.completion_tokens - 1, 1)
            r = rates.setdefault(variant, dict.fromkeys(PHASES, 0.0))
            r["prefill"] = max(r["prefill"], len(prompt) / (comp.first_token_ns / 1e9))
            r["decode"] = max(r["decode"], steps / max(t1 - t0 - comp.first_token_ns / 1e9, 1e-9))
            # a full batch: MEASURE_BATCH_ROWS rows of the prompt's first keys, decoding together
            if variant not in caches:
                caches[variant] = gen.prefill(prompt[:MEASURE_BATCH_KEYS])[1]
            batch = KVBatch(gen)
            for _ in range(MEASURE_BATCH_ROWS):
                batch.add(caches[variant], MEASURE_BATCH_KEYS + MEASURE_DECODE_STEPS + 2)
            ids = np.full((MEASURE_BATCH_ROWS, 1), prompt[MEASURE_BATCH_KEYS], np.int64)
            batch.step(ids)  # warm up
            t0 = time.perf_counter()
            for _ in range(MEASURE_DECODE_STEPS):
                batch.step(ids)
            took = time.perf_counter() - t0
            r["batch_decode"] = max(r["batch_decode"], MEASURE_BATCH_ROWS * MEASURE_DECODE_STEPS / took)
            del batch
    # Verify runs: cheap (~50 ms each) and close between variants (within 10-20% on the AMX
    # Xeon, where one round of a shared machine varied by more), so more rounds of them.
    for _ in range(MEASURE_VERIFY_ROUNDS):
        for variant, gen in gens.items():
            rates[variant]["verify"] = max(rates[variant]["verify"], verify_rate(gen, caches[variant], prompt))
            rates[variant]["verify_long"] = max(rates[variant]["verify_long"], verify_rate(
                gen, caches[variant], prompt, MEASURE_VERIFY_LONG_TOKENS))
            rates[variant]["verify_full"] = max(rates[variant]["verify_full"], verify_rate(
                gen, caches[variant], prompt, rows=MEASURE_BATCH_ROWS))
    for variant, r in rates.items():
        log(f"[plan] {variant}: prefill {r['prefill']:.0f} tok/s at {len(prompt)} tokens, decode {r['decode']:.1f} tok/s "
            f"one row, {r['batch_decode']:.1f} tok/s {MEASURE_BATCH_ROWS} rows, verify runs {r['verify']:.1f} tok/s "
            f"of {MEASURE_VERIFY_TOKENS} tokens, {r['verify_long']:.1f} of {MEASURE_VERIFY_LONG_TOKENS}, "
            f"{r['verify_full']:.1f} of {MEASURE_BATCH_ROWS} rows x {MEASURE_VERIFY_TOKENS} (best of "
            f"{MEASURE_ROUNDS}, verify runs {MEASURE_VERIFY_ROUNDS})")
    del gens, caches
    decode = fastest(rates, "decode")
    verify = verify_choice(rates, decode, fastest(rates, "prefill"))
    plan = Plan(fastest(rates, "prefill"), decode, "measured", cpu_key(), rates, verify=verify,
                drafts=draft_choice(rates, verify))
    path = model_dir / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.setdefault("execution_plans", {})[plan.cpu] = {
        "prefill": plan.prefill, "decode": plan.decode, "batch_decode": fastest(rates, "batch_decode"),
        "verify": plan.verify, "drafts": plan.drafts, "rates": rates, "threads": threads, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write(path, json.dumps(manifest, indent=2))
    log(f"[plan] {plan.describe()}; for throughput (a full batch): decode {fastest(rates, 'batch_decode')}; "
        f"recorded in {path}")
    return plan


def verify_rate(gen, cache, prompt, n: int = MEASURE_VERIFY_TOKENS, rows: int = 1) -> float:
    """Tokens/s of MEASURE_DECODE_STEPS verify runs of `n` tokens per row after `cache`:
    one row (the plain graph), or `rows` rows sharing each run (a busy server's run, through
    the row-slots graph: write_rows_graphs first). 0 where the graph cannot verify (a folder
    from before short_run_logits) or, for several rows, the row-slots graph is missing."""
    from .generate import KVBatch

    if gen.verify_max_tokens < n or (rows > 1 and gen.rows_session is None):
        return 0.0
    k = cache[0].shape[2]
    batch = KVBatch(gen, verify=True)
    for _ in range(rows):
        batch.add(cache, k + MEASURE_DECODE_STEPS + n + 1)

    def run(i: int) -> None:  # every row keeps one token, as runs whose drafts all miss
        batch.verify_rows(list(range(rows)), [prompt[k + i:k + i + n]] * rows)
        for b in range(rows):
            batch.accept(b, 1)

    run(0)  # warm up
    t0 = time.perf_counter()
    for i in range(1, MEASURE_DECODE_STEPS + 1):
        run(i)
    return rows * n * MEASURE_DECODE_STEPS / (time.perf_counter() - t0)


def write_rows_graphs(model_dir: Path) -> None:
    """The row-slots copy of every built variant that can verify drafts (engine/export_lm.row_slots:
    speculating rows share verify runs), so that any plan or override finds its own."""
    from .export_lm import write_rows_graph
    from .generate import VARIANT_FILES

    model_dir = Path(model_dir)
    manifest = json.loads((model_dir / MANIFEST).read_text())
    if "short_run_logits" not in manifest.get("graph_passes", []):
        return
    for v in built_variants(model_dir):
        write_rows_graph(model_dir, VARIANT_FILES[v])


def main() -> None:
    from .config import DEFAULT_GEN_MODEL, DEFAULT_MODELS_DIR, default_threads

    ap = argparse.ArgumentParser(description="the generator's per-machine execution plan")
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODELS_DIR / DEFAULT_GEN_MODEL)
    ap.add_argument("--measure", action="store_true", help="measure here and record it (even if recorded)")
    ap.add_argument("--if-missing", action="store_true",
                    help="with --measure: only if this CPU has no plan yet, or one without a rate of every phase")
    ap.add_argument("--threads", type=int, default=default_threads())
    args = ap.parse_args()
    if args.measure:  # first: measure times full verify runs through them
        write_rows_graphs(args.model_dir)
    if args.measure and not (args.if_missing and measured(recorded(args.model_dir))):
        measure(args.model_dir, args.threads)
    for objective in PLAN_OBJECTIVES:
        print(resolve(args.model_dir, objective=objective).describe())


if __name__ == "__main__":
    main()
