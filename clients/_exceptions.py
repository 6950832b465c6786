"""The SDK's exceptions, and the one place that maps gRPC status codes to them.

Exception tree::

    GenserveError                  every failure the SDK raises for a call or a request
    ├── InvalidRequest             INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION, ALREADY_EXISTS (a session id in use)
    │   └── ModelNotFound          NOT_FOUND
    ├── Overloaded                 RESOURCE_EXHAUSTED   (retried, then raised)
    ├── Unavailable                UNAVAILABLE          (retried, then raised)
    ├── DeadlineExceeded           DEADLINE_EXCEEDED
    ├── Unauthenticated            UNAUTHENTICATED, PERMISSION_DENIED
    └── ServerError                any other status (INTERNAL, UNKNOWN, UNIMPLEMENTED, CANCELLED by the server, ...)

Each carries the gRPC ``code`` and the server's ``details`` (the SDK's own, for an InvalidRequest
raised before sending); a request of a session also carries its ``request_id``. A call or request
the *caller* cancels raises ``asyncio.CancelledError`` (``concurrent.futures.CancelledError`` from
the sync client), never one of these.
"""

from __future__ import annotations

import grpc

__all__ = [
    "DeadlineExceeded",
    "GenserveError",
    "InvalidRequest",
    "ModelNotFound",
    "Overloaded",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
    "from_status",
]


class GenserveError(Exception):
    """Raised when a call or a request fails; the base of every SDK error."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", *, code: grpc.StatusCode | None = None, request_id: str | None = None) -> None:
        if code is not None:
            self.code = code
        self.details = details
        self.request_id = request_id
        super().__init__(details or self.code.name)

    def __str__(self) -> str:
        text = self.details or self.code.name
        return f"request {self.request_id!r}: {text}" if self.request_id else text


class InvalidRequest(GenserveError):
    """Raised when the server refuses a request as malformed (a bad n, label, prompt character, ...),
    or before anything is sent for a value no request can carry (a seed of -1, a NaN temperature,
    more labels than samples): the message names the field and the range it takes."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(InvalidRequest):
    """Raised when no served model (or version) has the requested name."""

    code = grpc.StatusCode.NOT_FOUND


class Overloaded(GenserveError):
    """Raised when the server refused a request for lack of capacity, after the retries ran out."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(GenserveError):
    """Raised when no server could be reached, or one was shutting down, after the retries ran out."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(GenserveError):
    """Raised when a call or request did not finish within its timeout."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(GenserveError):
    """Raised when the server refused the credentials (a missing or wrong bearer token)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ServerError(GenserveError):
    """Raised for any other status: a failure inside the server, or a method it does not implement."""

    code = grpc.StatusCode.INTERNAL


# The statuses the SDK retries (calls by grpc's retry policy, stream requests by the session): one list.
RETRYABLE_CODES = (Unavailable.code, Overloaded.code)

_BY_CODE: dict[grpc.StatusCode, type[GenserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequest,
    grpc.StatusCode.ALREADY_EXISTS: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
}

_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def from_status(code: grpc.StatusCode | int, details: str = "", *, request_id: str | None = None) -> GenserveError:
    """The exception for a non-OK status; ``code`` may be a ``grpc.StatusCode`` or its number (``Finish.code``)."""
    if isinstance(code, int):
        code = _BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    if code is grpc.StatusCode.OK:
        raise ValueError("OK is not an error")
    return _BY_CODE.get(code, ServerError)(details, code=code, request_id=request_id)


def from_rpc_error(error: grpc.RpcError) -> GenserveError:
    """The exception for a failed call (``grpc.aio.AioRpcError`` or a sync ``grpc.RpcError``)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return from_status(code or grpc.StatusCode.UNKNOWN, (details or "").replace("\n", " "))
