"""genserve.v1 over AMQP 0-9-1 (RabbitMQ): the names both sides agree on. Hand-written, not generated.

The message format is documented beside the messages, in proto/genserve/v1/generator.proto:
a request is a serialized ``GenerateRequest`` published to the request queue with ``reply_to``
and ``correlation_id``; its reply is one serialized ``StreamResponse`` published to ``reply_to``.

Servers and clients both declare the request queue (whoever comes first creates it), so both
must pass the same arguments, or RabbitMQ refuses the second declaration (PRECONDITION_FAILED).
"""

from __future__ import annotations

CONTENT_TYPE = "application/x-protobuf"
DEFAULT_QUEUE = "genserve.requests"
DEADLINE_HEADER = "genserve-deadline-ms"  # optional: the request's deadline, Unix time in milliseconds


def dead_letter_queue(queue: str) -> str:
    """Where a request queue's malformed and expired messages go."""
    return f"{queue}.dead"


def queue_arguments(queue: str) -> dict[str, str]:
    """Declaration arguments of a request queue: rejected and expired messages are dead-lettered
    (through the default exchange) to ``dead_letter_queue(queue)``, never redelivered forever."""
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead_letter_queue(queue)}
