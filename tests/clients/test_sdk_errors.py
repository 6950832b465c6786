"""The SDK's errors (clients/_exceptions.py): each gRPC status maps to one exception, naming its request."""

from __future__ import annotations

import grpc
import pytest

from clients import (
    DeadlineExceeded,
    GenserveError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from clients._exceptions import from_status


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest),
        (grpc.StatusCode.OUT_OF_RANGE, InvalidRequest),
        (grpc.StatusCode.ALREADY_EXISTS, InvalidRequest),
        (grpc.StatusCode.NOT_FOUND, ModelNotFound),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Overloaded),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, Unauthenticated),
        (grpc.StatusCode.INTERNAL, ServerError),
        (grpc.StatusCode.UNIMPLEMENTED, ServerError),
        (grpc.StatusCode.CANCELLED, ServerError),
    ],
)
def test_status_codes_map_to_the_exception_tree(code: grpc.StatusCode, cls: type[GenserveError]) -> None:
    for given in (code, code.value[0]):  # a StatusCode, or the number a Finish carries
        error = from_status(given, "why")
        assert type(error) is cls
        assert isinstance(error, GenserveError)
        assert error.code is code
        assert str(error) == "why"


def test_errors_name_their_request_and_status() -> None:
    assert isinstance(ModelNotFound("x"), InvalidRequest)
    assert str(from_status(grpc.StatusCode.NOT_FOUND, "no model 'x'", request_id="7")) == "request '7': no model 'x'"
    assert str(from_status(grpc.StatusCode.UNAVAILABLE)) == "UNAVAILABLE"
    assert from_status(99).code is grpc.StatusCode.UNKNOWN
    with pytest.raises(ValueError, match="OK is not an error"):
        from_status(0)
