"""One writer per collection, across processes: an exclusive `flock` on `writer.lock`.

Whoever opens a collection for writing (a server, a `rag ingest`, a Python Engine) takes
the lock and keeps it until the collection is closed. The OS drops it when its holder's
file is closed or the holder dies, SIGKILL included, so a lock is never stale. After taking
it the holder writes who it is (pid, what it runs, where it listens) into the file, so a
second writer is told at once, with a typed error, whom to talk to instead.

Readers never take it for long: a reader opening a collection that nobody writes takes it
only while it replays the write-ahead log (engine/collection.py). flock locks belong to
an open file, not a process, so two engines in one process exclude each other too.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import FailedPrecondition

LOCK_FILE = "writer.lock"


class WriterBusy(FailedPrecondition):
    """Another process (or another engine in this one) writes the collection."""

    def __init__(self, message: str, holder: dict) -> None:
        super().__init__(message)
        self.holder = holder


def default_owner() -> dict:
    """Who this process is, for the message another writer gets ("rag ingest", "pytest")."""
    argv = sys.argv or ["python"]
    return {"command": " ".join([Path(argv[0]).name or "python", *argv[1:2]])}


def describe_holder(name: str, holder: dict) -> str:
    """A one-line error for a writer that found `holder` holding collection `name`."""
    who = holder.get("command") or "another process"
    pid = holder.get("pid")
    since = holder.get("since")
    when = f", since {time.strftime('%H:%M:%S', time.localtime(since))}" if isinstance(since, (int, float)) else ""
    where = f" on host {holder['host']}" if holder.get("host") not in (None, socket.gethostname()) else ""
    head = (f"collection {name!r} is being written by {who}" + (f" (pid {pid}{where}{when})" if pid else "")
            + "; a collection has one writer at a time")
    if holder.get("address"):
        return f"{head}. Use the server's API at {holder['address']}: add --server {holder['address']} to " \
               "this rag command (ingest, delete, documents, search, ask, ...), or stop the server first"
    return f"{head}. Wait for it to finish or stop it first"


class WriterLock:
    """The held lock of one collection folder; `release` (or process exit) drops it."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def try_acquire(cls, folder: Path, owner: dict | None = None) -> "WriterLock | None":
        """The lock, or None (with nothing changed) if someone else holds it."""
        path = Path(folder) / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        info = {**(owner or default_owner()), "pid": os.getpid(), "host": socket.gethostname(),
                "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return cls(fd, path)

    @classmethod
    def acquire(cls, folder: Path, name: str, owner: dict | None = None) -> "WriterLock":
        """The lock, or WriterBusy naming its holder."""
        lock = cls.try_acquire(folder, owner)
        if lock is None:
            holder = read_holder(folder)
            raise WriterBusy(describe_holder(name, holder), holder)
        return lock

    def release(self) -> None:
        if self._fd >= 0:
            try:
                os.ftruncate(self._fd, 0)  # the next reader of the file sees no stale holder
            finally:
                os.close(self._fd)  # closing drops the flock
                self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0


def read_holder(folder: Path) -> dict:
    """What the current holder wrote about itself ({} if unknown: it may be writing it now)."""
    try:
        data = json.loads((Path(folder) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
