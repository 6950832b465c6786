"""Failures -> gRPC statuses, in one place (as ``clients/_exceptions.py`` maps them back for the SDK).

A request that fails ends with exactly one status: ``status_of(exc)`` says which, for the engine's
errors (``engine/errors.py``) and the server's own refusals (``Refused``). What may be retried says
so in its message, and that wording is written once, in ``retryable``.
"""

from __future__ import annotations

import grpc

from engine.errors import EngineError, InvalidRequestError, ModelNotFound, QueueFullError

Status = tuple[grpc.StatusCode, str]


RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"  # gRFC A6: grpc core's retry policy waits this long before retrying


class Refused(Exception):
    """Raised when a request is refused before it runs; carries the gRPC status and, for overload, a retry hint."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The retry hint as trailing metadata: grpc core's retry policy honours it (gRFC A6)."""
        if self.retry_after_ms is None:
            return None
        return ((RETRY_PUSHBACK_KEY, str(self.retry_after_ms)),)


def retryable(reason: str) -> Status:
    """UNAVAILABLE: the server could not finish the request, but sending it again may work."""
    return grpc.StatusCode.UNAVAILABLE, f"{reason}; the request may be retried"


def status_of(exc: BaseException) -> Status:
    """The status a request that failed with ``exc`` ends with."""
    match exc:
        case Refused():
            return exc.code, exc.message
        case ModelNotFound():
            return grpc.StatusCode.NOT_FOUND, str(exc)
        case QueueFullError():
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        case EngineError():
            return retryable(str(exc))
        # InvalidRequestError, and any other ValueError: a request the model cannot take as sent
        # (admission checks first; this is the guard behind it)
        case InvalidRequestError() | ValueError():
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        case _:  # model code or a stage failed: nothing the client did
            return retryable(f"internal error ({type(exc).__name__})")
