"""Failures -> statuses, in one place (as ``clients/_exceptions.py`` maps them back for the SDK).

A request that fails ends with exactly one status: ``status_of(exc)`` says which, for the engine's
errors (``engine/errors.py``) and the server's own refusals (``Refused``). What may be retried says
so in its message, and that wording is written once, in ``retryable``.

``Code`` is the core's own copy of the gRPC status codes (same names and numbers), so the core
imports no transport: each ingress maps it to its own (server/grpc_edge/codes.py for gRPC; the
AMQP ingress writes the number into the reply's ``Finish``, as the gRPC edge does on a stream).
"""

from __future__ import annotations

import enum

from engine.errors import EngineError, InvalidRequestError, ModelNotFound, QueueFullError


class Code(enum.Enum):
    """The status a job ends with: gRPC's codes, by the same names and numbers."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


Status = tuple[Code, str]

# What a client may send again elsewhere or later: the SDK retries these (clients/_exceptions.py
# RETRYABLE_CODES holds the same names), and the AMQP ingress requeues them once.
RETRYABLE = frozenset({Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED})


class Refused(Exception):
    """Raised when a request is refused before it runs; carries the status and, for overload, a retry hint."""

    def __init__(self, code: Code, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


def retryable(reason: str) -> Status:
    """UNAVAILABLE: the server could not finish the request, but sending it again may work."""
    return Code.UNAVAILABLE, f"{reason}; the request may be retried"


# A draining server refuses new work: another server can take it.
SHUTTING_DOWN: Status = (Code.UNAVAILABLE, "server is shutting down; send the request to another server")


def overloaded(reason: str, retry_after_ms: int) -> Refused:
    """RESOURCE_EXHAUSTED with the retry hint: the server cannot take the request now, but will soon."""
    return Refused(Code.RESOURCE_EXHAUSTED, f"{reason}; retry after {retry_after_ms} ms", retry_after_ms)


def status_of(exc: BaseException) -> Status:
    """The status a request that failed with ``exc`` ends with."""
    match exc:
        case Refused():
            return exc.code, exc.message
        case ModelNotFound():
            return Code.NOT_FOUND, str(exc)
        case QueueFullError():
            return Code.RESOURCE_EXHAUSTED, str(exc)
        case EngineError():
            return retryable(str(exc))
        # InvalidRequestError, and any other ValueError: a request the model cannot take as sent
        # (admission checks first; this is the guard behind it)
        case InvalidRequestError() | ValueError():
            return Code.INVALID_ARGUMENT, str(exc)
        case _:  # model code or a stage failed: nothing the client did
            return retryable(f"internal error ({type(exc).__name__})")
