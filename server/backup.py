"""Backup files: a collection exported to one file, and read back (`rag export` / `rag import`).

A backup file is ExportCollection's messages (proto/rag/v1/rag.proto:
ExportCollectionResponse: the settings first, the documents with their chunks and stored
vectors, the document count last), each preceded by its size as a varint, the way
protobuf's writeDelimitedTo / parseDelimitedFrom write and read messages in every language,
after an 11-byte header, MAGIC. A name ending in .gz is gzip-compressed. A file is written
under a temporary name and renamed when complete; a file cut short is refused on import (its
count message is missing), as a stream cut short is.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from engine.errors import AlreadyExists, InvalidInput
from engine.fsutil import fsync_dir

from .convert import export_settings, message_records
from .stubs import pb

MAGIC = b"RAGEXPORT1\n"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # a size past this is a corrupt file, not a message


def _open(path: Path, mode: str, gz: bool) -> BinaryIO:
    return gzip.open(path, mode) if gz else open(path, mode)  # noqa: SIM115


def write(path: str | Path, messages: Iterable["pb.ExportCollectionResponse"]) -> int:
    """Write an export's messages to a new file at `path`; returns its size in bytes.
    AlreadyExists if there is one: a backup is never written over."""
    path = Path(path)
    if path.exists():
        raise AlreadyExists(f"{path} already exists; remove it or choose another name")
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with _open(tmp, "wb", path.suffix == ".gz") as f:
            f.write(MAGIC)
            for m in messages:
                data = m.SerializeToString()
                f.write(varint(len(data)))
                f.write(data)
            f.flush()
            if hasattr(f, "fileobj"):  # gzip: its underlying file
                f.fileobj.flush()
        with open(tmp, "rb+") as raw:
            os.fsync(raw.fileno())
        if path.exists():
            raise AlreadyExists(f"{path} already exists; remove it or choose another name")
        tmp.rename(path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def messages(path: str | Path) -> Iterator["pb.ExportCollectionResponse"]:
    """The export messages of the backup file at `path`, one at a time."""
    path = Path(path)
    try:
        f = _open(path, "rb", path.suffix == ".gz")
    except OSError as e:
        raise InvalidInput(f"cannot read {path} ({e.strerror})") from None
    with contextlib.closing(f):
        try:
            head = f.read(len(MAGIC))
        except (OSError, EOFError) as e:
            raise InvalidInput(f"{path} is not a backup file `rag export` wrote ({e})") from None
        if head != MAGIC:
            raise InvalidInput(f"{path} is not a backup file `rag export` wrote (it does not start with "
                               f"{MAGIC.strip().decode()})")
        while True:
            offset = f.tell()
            try:
                size = _read_varint(f)
                if size is None:
                    return
                data = f.read(size) if size <= MAX_MESSAGE_BYTES else b""
            except (OSError, EOFError) as e:  # gzip: a damaged or cut-short stream
                raise InvalidInput(f"{path} is damaged at byte {offset} ({e})") from None
            if len(data) != size:
                raise InvalidInput(f"{path} is cut short or damaged at byte {offset}: a message of {size} bytes "
                                   f"{'is past any size' if size > MAX_MESSAGE_BYTES else 'ends early'}")
            try:
                yield pb.ExportCollectionResponse.FromString(data)
            except Exception:  # noqa: BLE001 - protobuf's DecodeError
                raise InvalidInput(f"{path} is damaged at byte {offset}: not an export message") from None


def varint(n: int) -> bytes:
    """`n` as a protobuf varint: 7 bits a byte, low bits first, the high bit set on all but the last."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(f: BinaryIO) -> int | None:
    """The next varint of `f`; None at the end of the file."""
    n = shift = 0
    while True:
        b = f.read(1)
        if not b:
            if shift:
                raise EOFError("the file ends inside a message's size")
            return None
        n |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return n
        shift += 7
        if shift > 63:
            raise EOFError("a message's size is not a varint")


def opened(path: str | Path) -> tuple[dict, Iterator["pb.ExportCollectionResponse"]]:
    """The settings of the backup file at `path` (read first, so a file that is not one
    fails before anything is sent or made) and all its messages, the first included."""
    stream = messages(path)
    first = next(stream, None)
    if first is None:
        raise InvalidInput(f"{path} holds no export (it is empty after its header)")
    return export_settings(first), itertools.chain([first], stream)


def read(path: str | Path) -> tuple[dict, Iterator[list]]:
    """The settings and the batches of DocumentRecords of the backup file at `path` (for
    Engine.import_collection / Collections.receive, which check every record)."""
    settings, stream = opened(path)
    return settings, message_records(stream, settings.get("dim"))
