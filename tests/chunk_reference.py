"""Plain-Python reference of the chunker (engine/kernels.py + engine/chunk.py).

Written independently of the kernels, from the rules in their docstrings, so the tests can
check that both give identical chunks. benchmarks/chunk_throughput.py times it as the
baseline.
"""

from __future__ import annotations

SPACES = frozenset([*range(9, 14), 32, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029,
                    0x202F, 0x205F, 0x3000])
SENTENCE_END = frozenset(".!?\u3002\uff01\uff1f")
NONE, WORD, SENTENCE, PARAGRAPH, END = range(5)


def gap_class(text: str, a: int, b: int) -> int:
    """Class of the gap text[a:b] between two tokens; a is the first token's end."""
    gap = text[a:b]
    if gap.count("\n") >= 2:
        return PARAGRAPH
    has_space = any(ord(ch) in SPACES for ch in gap)
    if not has_space:
        return NONE
    if "\n" in gap or (a > 0 and text[a - 1] in SENTENCE_END):
        return SENTENCE
    return WORD


def reference_ranges(text: str, offsets: list[tuple[int, int]], target: int, overlap: int):
    """[(first_token, last_token)] of each chunk."""
    n = len(offsets)
    classes = [gap_class(text, offsets[i][1], offsets[i + 1][0]) for i in range(n - 1)] + [END] * (n > 0)
    return reference_select(classes, target, overlap)


def reference_select(classes: list[int], target: int, overlap: int):
    """[(first_token, last_token)] of each chunk, given the class of the gap after each token."""
    n = len(classes)
    ranges = []
    start = 0
    while start < n:
        if n - start <= target:
            end = n - 1
        else:
            window = range(start + target // 2, start + target)
            # strongest gap; among equals the latest one
            end = max(window, key=lambda j: (classes[j], j))
        ranges.append((start, end))
        if end == n - 1:
            break
        nxt = max(end + 1 - overlap, start + 1)
        while nxt <= end and classes[nxt - 1] == NONE:
            nxt += 1
        start = nxt
    return ranges


def reference_chunks(text: str, offsets: list[tuple[int, int]], target: int, overlap: int):
    """[(start_char, end_char, n_tokens, chunk_text)] of each chunk."""
    out = []
    for first, last in reference_ranges(text, offsets, target, overlap):
        s, e = offsets[first][0], offsets[last][1]
        out.append((s, e, last - first + 1, text[s:e]))
    return out
