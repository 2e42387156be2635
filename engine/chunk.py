"""Text -> token-aware chunks with overlap, ending at paragraph > sentence > word gaps.

Sizes are counted in the embedding model's own tokens (offsets from `tokenizers`), so a
chunk never exceeds the model's window and is never silently truncated. The boundary
choice runs in the Numba kernels of engine/kernels.py; this module only tokenizes and
turns token ranges back into character spans.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from . import kernels
from .errors import InvalidInput


@dataclasses.dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of a document: text[start:end] of the source, `n_tokens` model tokens."""

    doc_id: str
    ordinal: int
    start: int
    end: int
    n_tokens: int
    text: str


def codepoints(text: str) -> np.ndarray:
    """The text as uint32 code points, indexable by the char offsets tokenizers returns."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def offsets_array(encoding) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) char offsets of an Encoding's tokens as int64 arrays."""
    offs = encoding.offsets
    flat = np.fromiter(itertools.chain.from_iterable(offs), dtype=np.int64, count=2 * len(offs))
    return flat[0::2], flat[1::2]


def token_ranges(text: str, starts: np.ndarray, ends: np.ndarray, target: int,
                 overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk token ranges (first, last) for a text with the given token offsets."""
    if starts.shape[0] == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    classes = kernels.gap_classes(codepoints(text), starts, ends)
    return kernels.select_chunks(classes, target, overlap)


class Chunker:
    """Splits texts into chunks of at most `target` model tokens with `overlap` tokens shared."""

    def __init__(self, tokenizer, *, target: int, overlap: int, window: int | None = None) -> None:
        """`tokenizer`: a tokenizers.Tokenizer with padding and truncation off.

        `window` is the most tokens the model takes without its special tokens; the target
        is capped by it so every chunk embeds whole.
        """
        if window is not None:
            target = min(target, window)
        if target < 1:
            raise InvalidInput(f"chunk size must be >= 1 token, got {target}")
        if not 0 <= overlap < target:
            raise InvalidInput(f"chunk overlap must be in [0, {target}), got {overlap}")
        self.tokenizer = tokenizer
        self.target = target
        self.overlap = overlap

    def chunk(self, doc_id: str, text: str) -> list[Chunk]:
        return self.chunk_many([(doc_id, text)])[0]

    def chunk_many(self, docs: Sequence[tuple[str, str]]) -> list[list[Chunk]]:
        """Chunks of each (doc_id, text); tokenizes all texts in one parallel batch."""
        encodings = self.tokenizer.encode_batch([t for _, t in docs], add_special_tokens=False)
        out = []
        for (doc_id, text), enc in zip(docs, encodings):
            starts, ends = offsets_array(enc)
            first, last = token_ranges(text, starts, ends, self.target, self.overlap)
            chunks = []
            for i, (a, b) in enumerate(zip(first.tolist(), last.tolist())):
                s, e = int(starts[a]), int(ends[b])
                chunks.append(Chunk(doc_id, i, s, e, b - a + 1, text[s:e]))
            out.append(chunks)
        return out
