"""The wire: genserve.v1 messages in and out. Bytes that do not parse become ``Malformed`` (so the
handler answers INVALID_ARGUMENT, not grpc's UNKNOWN); results and outcomes are written straight
into response messages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine import ImageResult, TokenEvent
from genserve.v1 import generator_pb2 as pb
from server.pipeline.jobs import Job, Outcome

SERVICE = pb.DESCRIPTOR.services_by_name["Generator"].full_name

_REASONS = {
    "complete": pb.FINISH_REASON_COMPLETE,
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "error": pb.FINISH_REASON_ERROR,
}


def fill_chunk(message: pb.GenerateResponse, item: ImageResult | TokenEvent) -> None:
    """Write one chunk into ``message`` (in place: no copy into the stream's response later);
    ``payload_size`` says how big it is, before it is written."""
    if isinstance(item, TokenEvent):
        append_token(message.text, item)
        return
    pixels = item.pixels
    images = message.images
    images.offset = item.offset
    images.count, images.height, images.width = pixels.shape
    images.pixels = pixels.tobytes()
    if item.labels is not None:
        images.labels.extend(item.labels.tolist())
    if item.floats is not None:
        images.floats = item.floats.astype("<f4", copy=False).tobytes()
    if item.step:  # iterative models
        images.step = item.step
        images.preview = item.preview


def append_token(text: pb.Text, item: TokenEvent) -> None:
    """Add one token to a text chunk: its characters, its id, the count so far (a chunk may carry several)."""
    text.text += item.text
    if item.token_id is not None:
        text.token_ids.append(item.token_id)
    text.n_generated = item.n_generated


def fill_finish(finish: pb.Finish, job: Job | None, outcome: Outcome) -> None:
    finish.reason = _REASONS[outcome.reason]
    if not outcome.ok:
        finish.code = outcome.code.value
        finish.message = outcome.message
    if job is not None:
        finish.seed = job.seed
        finish.model = job.served.name
        finish.version = job.served.version
        finish.n_generated = job.sent


def chunk_message(job_id: str, item: ImageResult | TokenEvent) -> pb.GenerateResponse:
    message = pb.GenerateResponse(id=job_id)
    fill_chunk(message, item)
    return message


def finish_message(job_id: str, job: Job | None, outcome: Outcome) -> pb.GenerateResponse:
    message = pb.GenerateResponse(id=job_id)
    fill_finish(message.finish, job, outcome)
    return message


def payload_size(item: ImageResult | TokenEvent) -> int:
    if isinstance(item, TokenEvent):
        return len(item.text) * 4 + 8
    size = item.pixels.nbytes + 4 * len(item.pixels)  # + a label each
    return size if item.floats is None else size + item.floats.size * 4


class Malformed:
    """What a request message that does not parse deserializes to: the handler refuses it with
    INVALID_ARGUMENT (grpc's own deserializer failure would be UNKNOWN)."""

    def __init__(self, error: str) -> None:
        self.error = error


def tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as e:  # DecodeError, or a UnicodeDecodeError in a string field
            return Malformed(f"{type(e).__name__}: {e}"[:200])

    return deserialize
