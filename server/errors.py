"""The one table that maps engine errors to gRPC status codes."""

from __future__ import annotations

import logging

import grpc

from engine import errors

log = logging.getLogger("rag.server")

# Most specific first: the first matching class decides.
STATUS_OF: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """End the call with the status for `exc`; unexpected errors are logged once, with traceback."""
    if context.code() is not None:
        # context.abort() already chose the status (e.g. the deadline passed while queued) and
        # raised a bare Exception to unwind the handler: keep that status, do not call it INTERNAL.
        raise exc
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=exc)
        context.abort(code, f"internal error ({type(exc).__name__}); the server log has details")
    context.abort(code, str(exc))
