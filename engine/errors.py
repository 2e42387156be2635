"""Typed engine errors.

The engine raises only these; the gRPC server maps each class to one status code in a
single table (server/errors.py), so every caller sees the same meaning for the same failure.
"""


class RagError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidInput(RagError, ValueError):
    """The request itself is wrong (empty text, k <= 0, unsupported dtype, ...)."""


class NotFound(RagError, KeyError):
    """A named thing (collection, document) does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class AlreadyExists(RagError):
    """A create call named something that already exists."""


class Unavailable(RagError):
    """A required resource is missing (model files not built, CUDA asked for but absent)."""


class Overloaded(RagError):
    """The engine is at its concurrency limit; retry later."""


class FailedPrecondition(RagError):
    """The request is well-formed but the state does not allow it (e.g. answering from an
    empty collection)."""


class Unauthenticated(RagError):
    """Missing or wrong credentials (raised by the server's auth check)."""
