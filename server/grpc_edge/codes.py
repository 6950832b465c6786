"""The core's statuses as gRPC's: its ``Code`` to ``grpc.StatusCode``, and the retry hint as trailing metadata."""

from __future__ import annotations

import grpc

from server.pipeline.statuses import Code

GRPC_CODES: dict[Code, grpc.StatusCode] = {code: grpc.StatusCode[code.name] for code in Code}
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"  # gRFC A6: grpc core's retry policy waits this long before retrying


def retry_metadata(retry_after_ms: int | None) -> tuple[tuple[str, str], ...]:
    """The retry hint of a refusal as trailing metadata (empty without one): grpc core's retry policy honours it."""
    if retry_after_ms is None:
        return ()
    return ((RETRY_PUSHBACK_KEY, str(retry_after_ms)),)
