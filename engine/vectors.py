"""The exact float32 vectors of one collection: `vectors.f32`, row number = chunk key.

Rows are written with pwrite past the store's committed row count before the SQLite
transaction that makes them visible commits (engine/store.py), and read back as one
read-only memory map (what the rescoring and fusion kernels read). Rows of replaced or
deleted chunks are never reused: a snapshot frees their disk blocks (`reclaim`), and a
search still holding an old key reads zeros there while the store no longer has its chunk.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

VECTORS_FILE = "vectors.f32"
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_BLOCK = 4096


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks of a file range (Linux fallocate); reads of it give zeros.
    False where the OS or file system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    return fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0


class VectorFile:
    """Fixed-width float32 rows of `dim` in one file. `read_only` opens it for reading only."""

    def __init__(self, folder: Path, dim: int, *, read_only: bool = False) -> None:
        self.path = Path(folder) / VECTORS_FILE
        self.dim = int(dim)
        self.read_only = read_only
        self._fd = os.open(self.path, os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT, 0o644)
        self._mapped: np.ndarray | None = None
        self._lock = threading.Lock()

    @staticmethod
    def create(folder: Path) -> None:
        (Path(folder) / VECTORS_FILE).touch()

    def write(self, first_row: int, vectors: np.ndarray) -> None:
        """Write rows first_row, first_row + 1, ... (invisible until the store commits them)."""
        data = np.ascontiguousarray(vectors, dtype=np.float32).tobytes()
        written = os.pwrite(self._fd, data, first_row * self.dim * 4)
        if written != len(data):
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")

    def rows(self, n: int) -> np.ndarray:
        """The first `n` rows as a read-only (n, dim) array (one memory map, grown as needed)."""
        with self._lock:
            if n == 0:
                return np.empty((0, self.dim), dtype=np.float32)
            if self._mapped is None or self._mapped.shape[0] < n:
                self._mapped = np.asarray(np.memmap(self.path, dtype=np.float32, mode="r", shape=(n, self.dim)))
            return self._mapped[:n]

    def reclaim(self, n: int, live_keys: np.ndarray) -> int:
        """Free the disk blocks of rows below `n` that no live key uses; returns bytes freed.
        Keys never move, so searches running meanwhile stay correct (see the module docstring)."""
        dead = np.ones(n + 1, dtype=bool)
        dead[live_keys] = False
        dead[n] = False  # sentinel: every run ends
        row = self.dim * 4
        edges = np.flatnonzero(np.diff(np.concatenate([[False], dead]).astype(np.int8)))
        freed = 0
        for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist()):
            start = -(-a * row // _BLOCK) * _BLOCK
            end = b * row // _BLOCK * _BLOCK
            if end > start:
                if not punch_hole(self._fd, start, end - start):
                    return freed
                freed += end - start
        return freed

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            self._mapped = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
