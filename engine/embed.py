"""Text -> unit vectors with an ONNX encoder in onnxruntime (no torch on this path).

Tokenization uses the model's own `tokenizer.json` (Rust `tokenizers`, batched in
parallel) with padding turned off and truncation at the model's max length. Pooling (mean
with the attention mask, or CLS) and L2 normalisation follow the model's
sentence-transformers configuration, recorded in manifest.json by engine/export.py.

CPU: every text is its own onnxruntime call, and `threads` worker threads share one
single-threaded session, each running whole texts, longest first. Measured on 2 cores
against token-budget batches (256 to 4096 padded tokens, one session with 2 intra-op
threads): as fast or faster for chunks and queries alike, because there is no padding,
a call's activations stay in its core's L2, and no operator waits at a barrier for the
other core, so a busy neighbour (the generator, another process) slows one worker
instead of every operator. It also makes a text's vector independent of what else is
embedded with it: int8 dynamic quantization picks its activation scale per call, so a
shared batch would move a query's vector with the other queries in flight. A lone text
runs on one core; a search query takes a few milliseconds either way.

CUDA: texts are sorted by length and cut into batches bounded by `batch_max_tokens` padded
tokens and `max_batch` rows; we pad per batch ourselves and pass the real attention mask,
so pads are never pooled.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .config import DEFAULT_BATCH_MAX_TOKENS, DEFAULT_MAX_BATCH
from .errors import InvalidInput, Unavailable

MANIFEST = "manifest.json"
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model_int8.onnx"}
# Texts tokenized and sorted together by embed_iter; bounds memory for any corpus size.
STREAM_WINDOW = 2048
# onnxruntime's CPU SkipLayerNormalization kernel is ~5x slower than Add + LayerNormalization
# (measured on [512, 384]: 1.2 ms vs 0.26 ms), so the export leaves them unfused and the
# session must not fuse them back.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def make_providers(provider: str) -> list:
    """onnxruntime execution providers for `provider` ('cpu' or 'cuda'), or a clear error."""
    import onnxruntime as ort

    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Unavailable(
                "provider 'cuda' was requested but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {ort.get_available_providers()}); install onnxruntime-gpu "
                "(pip install '.[gpu]') on a machine with an NVIDIA driver, or use provider 'cpu'")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise InvalidInput(f"unknown provider {provider!r}; use 'cpu' or 'cuda'")


def make_session(path: Path, provider: str, threads: int, *, disabled_optimizers: Sequence[str] = (),
                 spinning: bool = True, stop_spinning: bool = False):
    """An onnxruntime InferenceSession with our thread and optimisation settings. `spinning`
    False: idle intra-op threads sleep instead of spinning (slower one-token steps, but
    another session's threads get the cores; benchmarks/prefill_overlap.py). `stop_spinning`:
    its threads spin within a run but stop when the run returns (session.force_spinning_stop),
    so they leave the cores to the next session's run (Generator: Config.stop_spinning)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if stop_spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=make_providers(provider),
                                disabled_optimizers=list(disabled_optimizers))


class Tokenizers:
    """A model's tokenizer.json, twice: for embedding and for the chunker (engine/chunk.py).

    Light enough for a worker that only chunks (engine/distributed.py): no onnxruntime.
    """

    def __init__(self, model_dir: str | Path, max_length: int | None = None) -> None:
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        if max_length is None:
            try:
                max_length = int(json.loads((model_dir / MANIFEST).read_text())["max_length"])
            except (OSError, ValueError, KeyError):
                raise Unavailable(f"embedding model not found at {model_dir}; build it with `make models`") from None
        self.max_length = max_length
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # The shipped tokenizer.json pads to a fixed 128 and truncates at 128: undo both.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        # The chunker's: no truncation, no special tokens.
        self.raw_tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.raw_tokenizer.no_padding()
        self.raw_tokenizer.no_truncation()
        # [CLS] ... [SEP]: tokens a single text costs beyond its own.
        self.special_tokens = len(self.tokenizer.encode("").ids)


class Embedder:
    """Embeds texts into L2-normalised float32 vectors with an exported ONNX encoder."""

    def __init__(self, model_dir: str | Path, *, variant: str = "int8", provider: str = "cpu",
                 threads: int = 1, batch_max_tokens: int = DEFAULT_BATCH_MAX_TOKENS,
                 max_batch: int = DEFAULT_MAX_BATCH) -> None:
        """`threads`: CPU cores to use (worker threads). `batch_max_tokens` and `max_batch`
        bound the padded batches of the CUDA provider; on CPU every text runs alone."""
        model_dir = Path(model_dir)
        manifest_path = model_dir / MANIFEST
        if variant not in VARIANT_FILES:
            raise InvalidInput(f"embedding variant must be one of {sorted(VARIANT_FILES)}, got {variant!r}")
        onnx_path = model_dir / VARIANT_FILES[variant]
        if not manifest_path.exists() or not onnx_path.exists():
            raise Unavailable(f"embedding model not found at {onnx_path}; build it with `make models` "
                              "(or python -m engine.export --hf-dir YOUR_MODEL --out DIR)")
        self.manifest = json.loads(manifest_path.read_text())
        self.name: str = self.manifest["name"]
        self.variant = variant
        self.dim: int = int(self.manifest["dim"])
        self.max_length: int = int(self.manifest["max_length"])
        self.pooling: str = self.manifest["pooling"]
        self.normalize: bool = bool(self.manifest.get("normalize", True))
        self.batch_max_tokens = max(batch_max_tokens, self.max_length)
        self.max_batch = max(1, max_batch)

        toks = Tokenizers(model_dir, self.max_length)
        self.tokenizer, self.raw_tokenizer, self.special_tokens = toks.tokenizer, toks.raw_tokenizer, toks.special_tokens
        pad = self.tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad

        # CPU: one single-threaded session run by `threads` workers (see the module docstring).
        # CUDA: one stream does the work; a second caller would only queue behind it.
        self.provider = provider
        self.workers = max(1, threads) if provider == "cpu" else 1
        self.session = make_session(onnx_path, provider, 1 if provider == "cpu" else threads,
                                    disabled_optimizers=CPU_DISABLED_OPTIMIZERS if provider == "cpu" else ())
        self.input_names = {i.name for i in self.session.get_inputs()}
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="embed") if self.workers > 1 else None

    # ------------------------------------------------------------------ batching
    def _batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Indices into `lengths`, longest first: one text per batch on CPU (see the module
        docstring), else grouped so batch * max_len <= batch_max_tokens."""
        order = np.argsort(-lengths, kind="stable")
        if self.provider == "cpu":
            return [order[i:i + 1] for i in range(len(order))]
        out = []
        start, n = 0, len(order)
        while start < n:
            longest = int(lengths[order[start]])
            size = max(1, min(self.max_batch, self.batch_max_tokens // max(longest, 1)))
            out.append(order[start:start + size])
            start += size
        return out

    def _run(self, ids: list[list[int]]) -> np.ndarray:
        """One ONNX call on already-tokenized, equal-ish length sequences."""
        b = len(ids)
        width = max(len(x) for x in ids)
        input_ids = np.full((b, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((b, width), dtype=np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        hidden = self.session.run(None, feeds)[0]  # (b, width, dim)
        if self.pooling == "cls":
            pooled = np.array(hidden[:, 0, :], dtype=np.float32)
        else:
            m = mask.astype(np.float32)
            pooled = np.matmul(m[:, None, :], hidden)[:, 0, :] / np.maximum(m.sum(1, keepdims=True), 1.0)
            pooled = np.ascontiguousarray(pooled, dtype=np.float32)
        if self.normalize:
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled

    # ------------------------------------------------------------------ public
    def check_texts(self, texts: Sequence[str]) -> None:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInput(f"text {i} is {type(t).__name__}, expected str")
            if not t.strip():
                raise InvalidInput(f"text {i} is empty or whitespace only; nothing to embed")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for `texts` in input order, shape (len(texts), dim), float32, unit norm."""
        texts = list(texts)
        self.check_texts(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        ids = [e.ids for e in encodings]
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        batches = self._batches(lengths)

        if self._pool is None or len(batches) == 1:
            for batch in batches:
                out[batch] = self._run([ids[i] for i in batch])
            return out
        # Each worker takes the next batch when it is free; longest go first, so the workers
        # finish together.
        queue = iter(batches)
        lock = threading.Lock()

        def drain() -> None:
            while True:
                with lock:
                    batch = next(queue, None)
                if batch is None:
                    return
                out[batch] = self._run([ids[i] for i in batch])

        for future in [self._pool.submit(drain) for _ in range(min(self.workers, len(batches)))]:
            future.result()
        return out

    def embed_iter(self, texts: Iterable[str], window: int = STREAM_WINDOW) -> Iterator[np.ndarray]:
        """Stream: yields (m, dim) blocks in input order; holds at most `window` texts."""
        it = iter(texts)
        while True:
            block = list(itertools.islice(it, window))
            if not block:
                return
            yield self.embed(block)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Model tokens per text including special tokens, after truncation."""
        return [len(e.ids) for e in self.tokenizer.encode_batch(list(texts))]

    def warmup(self) -> None:
        self.embed(["warm up the session"] * self.workers)
