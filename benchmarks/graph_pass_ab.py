"""What does a default graph pass buy? The built decoder against the same export without it.

    .venv/bin/python benchmarks/graph_pass_ab.py [--without gqa_attention] [--variant int8] [--rounds 3]

Re-exports the HF folder `make models` produced (.cache/hf) into a temporary folder with
every default pass except `--without`, quantizes it like the build does, and times both
graphs, interleaved for `--rounds` rounds in one process: single-stream decode at an
850-token prompt (24 steps after the first token). Prints the medians and the ratio, and
appends one JSON line to bench-results/graph_pass_ab.jsonl, with the CPU. One stream only:
there the right-padded cache the generator keeps is the plain cache, so a graph without
gqa_attention runs unchanged (a batch would need the left-padded layout it no longer has).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import cpu_name, log_jsonl  # noqa: E402

from engine.config import Config  # noqa: E402
from engine.export_lm import FP32_FILE, GRAPH_PASSES, QUANTIZED, SIDE_FILES, apply_graph_passes, quantize_weights  # noqa: E402
from engine.generate import VARIANT_FILES, Generator, SamplingParams  # noqa: E402


def export_without(hf_dir: Path, out: Path, without: str, variant: str) -> None:
    from optimum.exporters.onnx import main_export

    main_export(str(hf_dir), output=str(out), task="text-generation-with-past", device="cpu",
                do_validation=False, no_post_process=False)
    for f in SIDE_FILES:
        if (hf_dir / f).exists() and not (out / f).exists():
            shutil.copy(hf_dir / f, out / f)
    apply_graph_passes(out / FP32_FILE, tuple(p for p in GRAPH_PASSES if p != without))
    if VARIANT_FILES[variant] in QUANTIZED:
        bits, block = QUANTIZED[VARIANT_FILES[variant]]
        quantize_weights(out / FP32_FILE, out / VARIANT_FILES[variant], bits, block)


def decode_rate(gen: Generator, prompt: list[int]) -> float:
    stamps = []
    for _ in gen.stream_ids(prompt, SamplingParams(max_new_tokens=26, ignore_eos=True)):
        stamps.append(time.perf_counter())
    return 24 / (stamps[-2] - stamps[0])  # the last event is the Completion


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--without", default="gqa_attention", choices=GRAPH_PASSES)
    ap.add_argument("--variant", default="int8", choices=sorted(VARIANT_FILES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cfg = Config()
    hf_dir = REPO / ".cache" / "hf" / cfg.gen_model
    if not hf_dir.exists():
        raise SystemExit(f"{hf_dir} not found: run `make models` first")
    prompt = [int(x) for x in np.random.default_rng(0).integers(1000, 20000, 850)]
    with tempfile.TemporaryDirectory(prefix="graph-pass-ab-") as tmp:
        base_dir = Path(tmp)
        print(f"CPU: {cpu_name()}; exporting {cfg.gen_model} without {args.without} (a few minutes)", flush=True)
        export_without(hf_dir, base_dir, args.without, args.variant)
        shutil.copy(cfg.gen_model_dir / "manifest.json", base_dir / "manifest.json")
        systems = {"built": Generator(cfg.gen_model_dir, variant=args.variant, threads=args.threads),
                   f"without {args.without}": Generator(base_dir, variant=args.variant, threads=args.threads)}
        rates: dict[str, list[float]] = {name: [] for name in systems}
        for name, gen in systems.items():
            decode_rate(gen, prompt[:64])  # warm up
        for _ in range(args.rounds):
            for name, gen in systems.items():
                rates[name].append(decode_rate(gen, prompt))
    med = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in rates.items():
        print(f"{name:28s} decode at 850 tokens: median {med[name]:.1f} tok/s ({', '.join(f'{x:.1f}' for x in r)})")
    base = f"without {args.without}"
    print(f"built / {base}: x{med['built'] / med[base]:.2f}")
    log_jsonl("graph_pass_ab", {"without": args.without, "variant": args.variant, "rounds": args.rounds,
                                "built_tok_per_s": med["built"], "baseline_tok_per_s": med[base],
                                "ratio": med["built"] / med[base]})


if __name__ == "__main__":
    main()
