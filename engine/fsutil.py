"""Durable file operations: fsync of files and folders, and atomic replacement.

Every file the engine rewrites (the index snapshot and its metadata, the emptied
write-ahead log, model manifests) goes through `atomic_write` or `replace_file`: the new
content is written beside the old under a temporary name, synced, renamed over it, and the
folder synced, so a crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file (its data) or a folder (a rename or create inside it) by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_path  # the name callers use for folders


def temp_path(path: Path) -> Path:
    """Where the next content of `path` is written before it replaces `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def replace_file(tmp: Path, path: Path, *, fsync: bool = True) -> None:
    """Rename the finished `tmp` over `path` (synced first, and the folder after, if `fsync`)."""
    if fsync:
        fsync_path(tmp)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(Path(path).parent)


def atomic_write(path: Path, data: bytes | str, *, fsync: bool = True) -> None:
    """Replace `path` with `data` (str is written as UTF-8) atomically."""
    tmp = temp_path(path)
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    replace_file(tmp, path, fsync=fsync)
