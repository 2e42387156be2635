"""Coverage-guided fuzzing (atheris) of what reads untrusted bytes: the document parsers,
the chunker's Numba kernels and the write-ahead log reader. The hypothesis tests in
tests/test_fuzz.py run the same properties on fixed examples in CI; this explores for as
long as you let it.

    make fuzz                                   # every target, FUZZ_SECONDS (60) each
    .venv/bin/python tests/fuzz_atheris.py parsers -max_total_time=300

A target fails (and atheris saves the input) if it raises anything but InvalidInput, or
breaks its property: chunk spans inside the text and covering it in order; a log keeps
exactly its whole records.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

import numpy as np

# Numba compiles kernels from their bytecode, so they are imported before instrumenting:
# atheris's coverage hooks would break that. Their coverage comes from the inputs alone.
from engine import chunk, kernels  # noqa: F401
from engine.errors import InvalidInput

with atheris.instrument_imports(include=["engine", "pypdf", "html", "json"]):
    from engine.documents import MEDIA_TYPES, Document, Failure, parse_bytes
    from engine.wal import FILE_MAGIC, WriteAheadLog


def parsers(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    media_type = MEDIA_TYPES[fdp.ConsumeIntInRange(0, len(MEDIA_TYPES) - 1)]
    try:
        for item in parse_bytes(fdp.ConsumeBytes(fdp.remaining_bytes()), media_type, "fuzz"):
            if not isinstance(item, (Document, Failure)):
                raise AssertionError(f"parser yielded {type(item)}")
            if isinstance(item, Document) and (not item.text.strip() or "\x00" in item.text):
                raise AssertionError("a document with no text or a NUL")
    except InvalidInput as e:
        if not str(e):
            raise AssertionError("an error without a message") from e


def chunk_kernels(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeIntInRange(1, 64)
    overlap = fdp.ConsumeIntInRange(0, target - 1)
    text = fdp.ConsumeUnicodeNoSurrogates(2000)
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    # whitespace-separated "tokens", as a tokenizer's offsets would give
    starts, ends, i = [], [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        j = i
        while j < len(text) and not text[j].isspace():
            j += 1
        starts.append(i)
        ends.append(j)
        i = j
    s = np.array(starts, dtype=np.int64)
    e = np.array(ends, dtype=np.int64)
    classes = kernels.gap_classes(cps, s, e)
    first, last = kernels.select_chunks(classes, target, overlap)
    for i, (a, b) in enumerate(zip(first.tolist(), last.tolist())):
        if not (0 <= a <= b < len(starts)) or b - a + 1 > target or (i and a <= first[i - 1]):
            raise AssertionError(f"bad token range {(a, b)} of {len(starts)} (target {target})")
        if i and a > last[i - 1] + 1:
            raise AssertionError(f"tokens {last[i - 1] + 1}..{a - 1} are in no chunk")
    if len(starts) and (not len(first) or first[0] != 0 or last[-1] != len(starts) - 1):
        raise AssertionError("chunks do not cover the text from start to end")


_WAL_DIR = Path(tempfile.mkdtemp(prefix="fuzz-wal-"))


def wal_reader(data: bytes) -> None:
    path = _WAL_DIR / "wal.log"
    path.write_bytes(FILE_MAGIC + data)
    wal = WriteAheadLog(path, fsync="off")
    seqs = [r.seq for r in wal.records()]
    if seqs != sorted(set(seqs)) or (seqs and seqs[-1] != wal.last_seq):
        raise AssertionError(f"records out of order: {seqs[:10]}")
    if path.stat().st_size != wal.size_bytes():
        raise AssertionError("the torn tail was not cut")
    wal.close()


TARGETS = {"parsers": parsers, "chunk_kernels": chunk_kernels, "wal_reader": wal_reader}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(TARGETS)}}} [libFuzzer options]")
    name = sys.argv.pop(1)
    atheris.Setup(sys.argv, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
