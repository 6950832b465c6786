"""The genserve.v1.Generator servicer: converts between protobuf and jobs at the edge.

- ``Generate``: one job; its chunks are yielded as they come; a refusal or failure ends the call
  with the job's gRPC status, a success with a ``Finish`` message.
- ``GenerateStream``: many jobs on one stream, tagged with the client's ids. The first message
  grants ``stream_credits``; each admitted request uses one credit and gives it back when it
  finishes (piggybacked on the next message). Requests beyond the credit are refused for their id
  with RESOURCE_EXHAUSTED. Results are coalesced: one message carries whatever is ready.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from engine.decode import SequenceRequest, TokenEvent
from engine.images import ImageRequest, ImageResult
from engine.logs import get_logger
from engine.registry import ModelNotFound, ServedModel
from engine.sampling import InvalidRequestError, SamplingParams, check_max_new_tokens
from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.config import ServerConfig
from server.jobs import Job, Outcome
from server.metrics import Metrics
from server.pipeline import Pipeline, Refused

log = get_logger("server.service")

MAX_ID_LENGTH = 128  # characters of a client's request id
MAX_RESULTS_PER_MESSAGE = 1024  # results coalesced into one StreamResponse
MAX_BYTES_PER_MESSAGE = 1 << 20  # ... and at most this many payload bytes (a quarter of grpc's default receive limit)
MESSAGE_OVERHEAD = 64  # bytes of framing per result, on top of its payload
DEFAULT_MAX_NEW_TOKENS = 256
_ID_PREFIX = os.urandom(4).hex()  # ids of Generate calls that bring none: unique per process, cheap
_ids = itertools.count(1)

SERVICE = pb.DESCRIPTOR.services_by_name["Generator"].full_name

_REASONS = {
    "complete": pb.FINISH_REASON_COMPLETE,
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "error": pb.FINISH_REASON_ERROR,
}


def _brief(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def fill_chunk(message: pb.GenerateResponse, item: ImageResult | TokenEvent) -> None:
    """Write one chunk into ``message`` (in place: no copy into the stream's response later);
    ``payload_size`` says how big it is, before it is written."""
    if isinstance(item, TokenEvent):
        text = message.text
        text.text = item.text
        if item.token_id is not None:
            text.token_ids.append(item.token_id)
        text.n_generated = item.n_generated
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


def fill_finish(finish: pb.Finish, job: Job | None, outcome: Outcome) -> None:
    finish.reason = _REASONS[outcome.reason]
    if not outcome.ok:
        finish.code = outcome.code.value[0]
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


class CallSink:
    """The sink of one Generate call: chunks and the outcome, in order, for the handler to yield."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[pb.GenerateResponse | Outcome] = asyncio.Queue()

    def emit(self, job: Job, item: ImageResult | TokenEvent) -> None:
        self.queue.put_nowait(chunk_message(job.id, item))

    def finish(self, job: Job, outcome: Outcome) -> None:
        self.queue.put_nowait(outcome)


class StreamSink:
    """The outbox of one GenerateStream: results written straight into the next response
    message (no copies), credits to give back; full messages wait in ``full``."""

    def __init__(
        self,
        credits: int,
        max_bytes: int = MAX_BYTES_PER_MESSAGE,
        max_pending: int = 4096,
        grant: Callable[[int, int], int] = lambda full, outstanding: full - outstanding,
    ) -> None:
        self.full_credit = credits
        self.credit = credits  # announced credits the client may still spend
        self.credit_back = 0  # finished requests whose credit has not been given back yet
        self.grant = grant  # (full credit, in flight + unspent) -> credits to announce: Admission.stream_grant
        self.jobs: dict[str, Job] = {}
        self.full: collections.deque[pb.StreamResponse] = collections.deque()
        self.current = pb.StreamResponse()
        self.count = 0  # results in ``current``
        self.size = 0  # bytes in ``current``
        self.max_bytes = max_bytes  # a message never grows past this (unless one result alone is bigger)
        self.pending = 0  # results not yet handed to grpc
        self.max_pending = max_pending  # beyond it the reader stops taking requests: the client is not reading
        self.ready = asyncio.Event()
        self.drained = asyncio.Event()
        self.drained.set()
        self.reader_done = False
        self.malformed: str | None = None  # a request message that did not parse ends the stream

    @property
    def empty(self) -> bool:
        return not self.full and not self.count

    def _result(self, job_id: str, size: int) -> pb.GenerateResponse:
        size += MESSAGE_OVERHEAD + len(job_id)
        if self.count and (self.count >= MAX_RESULTS_PER_MESSAGE or self.size + size > self.max_bytes):
            self.full.append(self.current)
            self.current = pb.StreamResponse()
            self.count = self.size = 0
        self.count += 1
        self.size += size
        self.pending += 1
        if self.pending > self.max_pending:
            self.drained.clear()
        self.ready.set()
        return self.current.results.add(id=job_id)

    def emit(self, job: Job, item: ImageResult | TokenEvent) -> None:
        fill_chunk(self._result(job.id, payload_size(item)), item)

    def finish(self, job: Job, outcome: Outcome) -> None:
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
        self.answer(job.id, job, outcome)

    def answer(self, job_id: str, job: Job | None, outcome: Outcome, *, credit: bool = True, retry_after_ms: int | None = None) -> None:
        """A terminal message for ``job_id``; ``credit``: the request had used a credit, give it back."""
        finish = self._result(job_id, len(outcome.message)).finish
        fill_finish(finish, job, outcome)
        if retry_after_ms:
            finish.retry_after_ms = retry_after_ms
        if credit:
            self.credit_back += 1

    def next_message(self) -> pb.StreamResponse | None:
        if self.full:
            message = self.full.popleft()
        elif self.count or self.credit_back:
            message, self.current = self.current, pb.StreamResponse()
            self.count = self.size = 0
        else:
            message = None
        if message is not None:
            self.pending -= len(message.results)
            if self.pending <= self.max_pending:
                self.drained.set()
            if self.credit_back:
                granted = self.grant(self.full_credit, self.credit + len(self.jobs))
                self.credit += granted
                message.credits = granted
                self.credit_back = 0
        if self.empty:
            self.ready.clear()
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


def register(service: GeneratorService, server: grpc.aio.Server) -> None:
    """Add the servicer to ``server``, with deserializers that turn bad bytes into INVALID_ARGUMENT."""
    handlers = {
        "ListModels": grpc.unary_unary_rpc_method_handler(
            service.ListModels,
            request_deserializer=tolerant(pb.ListModelsRequest.FromString),
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate,
            request_deserializer=tolerant(pb.GenerateRequest.FromString),
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "GenerateStream": grpc.stream_stream_rpc_method_handler(
            service.GenerateStream,
            request_deserializer=tolerant(pb.StreamRequest.FromString),
            response_serializer=pb.StreamResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class GeneratorService(pb_grpc.GeneratorServicer):
    def __init__(self, config: ServerConfig, pipeline: Pipeline, metrics: Metrics) -> None:
        self.config = config
        self.pipeline = pipeline
        self.registry = pipeline.registry
        self.metrics = metrics

    # -- ListModels -------------------------------------------------------------------------

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request does not parse: {request.error}")
        response = pb.ListModelsResponse()
        for info in self.registry.list_models():
            entry = pb.ModelInfo(
                name=info.name,
                version=info.version,
                kind=info.kind,
                summary=info.summary,
                parameters=info.parameters,
                device=info.device,
                latest=info.latest,
            )
            if info.image is not None:
                low, high = info.image.label_range or (0, -1)
                entry.image.CopyFrom(
                    pb.ImageAccepts(
                        max_n=info.image.max_n,
                        image_size=info.image.image_size,
                        latent_dim=info.image.latent_dim,
                        conditional=info.image.conditional,
                        label_min=low,
                        label_max=high,
                    )
                )
            elif info.text is not None:
                entry.text.CopyFrom(
                    pb.TextAccepts(
                        vocab=info.text.vocab, context_window=info.text.context_window, max_new_tokens=self.config.max_new_tokens
                    )
                )
            response.models.append(entry)
        return response

    # -- requests -> jobs --------------------------------------------------------------------

    def _served(self, request: pb.GenerateRequest) -> ServedModel:
        try:
            return self.registry.get(request.model, request.version or None)
        except ModelNotFound as e:
            raise Refused(grpc.StatusCode.NOT_FOUND, str(e)) from None

    def build_job(self, request: pb.GenerateRequest, rpc: str, job_id: str, sink: CallSink | StreamSink) -> Job:
        """A job for ``request``, or Refused (INVALID_ARGUMENT, NOT_FOUND) with a precise reason."""
        which = request.WhichOneof("params")
        if which is None:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "request has no params: set image (for image models) or text (for text models)")
        served = self._served(request)
        if which == "image":
            images = served.images
            if images is None:
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT, f"model {served.name!r} is a {served.kind} model: send text params, not image"
                )
            p = request.image
            max_n = images.limits.max_n
            if not 1 <= p.n <= max_n:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"n must be from 1 to {max_n}, got {p.n}")
            if len(p.labels) > p.n:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"labels: give n ({p.n}) labels or one for all, got {len(p.labels)}")
            image = ImageRequest(
                n=p.n,
                seed=p.seed if p.HasField("seed") else None,
                labels=list(p.labels) or None,
                want_float=p.want_float,
                request_id=job_id,
            )
            return Job(job_id, rpc, served, sink, 0.0, image=image)
        if served.info.text is None:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"model {served.name!r} is a {served.kind} model: send image params, not text")
        t = request.text
        try:
            max_new = t.max_new_tokens if t.HasField("max_new_tokens") else min(DEFAULT_MAX_NEW_TOKENS, self.config.max_new_tokens)
            check_max_new_tokens(max_new, self.config.max_new_tokens)
            params = SamplingParams(
                temperature=t.temperature if t.HasField("temperature") else 1.0,
                top_k=t.top_k if t.HasField("top_k") else 0,
                top_p=t.top_p if t.HasField("top_p") else 1.0,
                seed=t.seed if t.HasField("seed") else None,
                max_new_tokens=max_new,
                stop=tuple(t.stop),
            )
        except InvalidRequestError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if not t.prompt:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, 'prompt is empty: send at least one character (e.g. "\\n")')
        return Job(job_id, rpc, served, sink, 0.0, text=SequenceRequest(t.prompt, params, job_id))

    def _refused(self, rpc: str, code: grpc.StatusCode) -> None:
        self.metrics.rejections.labels(rpc, code.name).inc()

    # -- Generate -----------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request does not parse: {request.error}")
        job_id = request.id[:MAX_ID_LENGTH] or f"{_ID_PREFIX}-{next(_ids)}"
        sink = CallSink()
        try:  # a bad request hears what is wrong with it even from an overloaded server: validate, then admit
            job = self.build_job(request, "Generate", job_id, sink)
            self.pipeline.admit(job, _timeout(request.timeout_ms, context.time_remaining()))
        except Refused as e:
            self._refused("Generate", e.code)
            # No log line: under overload refusals are most calls, and each is counted in the metrics.
            await context.abort(e.code, e.message, e.trailing_metadata or ())
        try:
            while True:
                item = await sink.queue.get()
                if isinstance(item, Outcome):
                    if item.ok:
                        yield finish_message(job_id, job, item)
                        return
                    log.debug("request_failed", request_id=job_id, rpc="Generate", code=item.code.name, reason=item.message)
                    await context.abort(item.code, item.message)
                    return
                yield item
        finally:
            if not job.done:  # the client went away or its deadline passed: its queued work is dropped
                job.fail(grpc.StatusCode.CANCELLED, "the call ended before the request finished")

    # -- GenerateStream -------------------------------------------------------------------------

    async def GenerateStream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        budget = min(MAX_BYTES_PER_MESSAGE, (self.config.max_message_mb << 20) // 2)
        stream = StreamSink(
            self.config.stream_credits,
            budget,
            max_pending=2 * self.config.stream_credits + MAX_RESULTS_PER_MESSAGE,
            grant=self.pipeline.admission.stream_grant,
        )
        reader = asyncio.create_task(self._read_stream(request_iterator, stream, context))
        try:
            yield pb.StreamResponse(credits=stream.credit)
            while True:
                await stream.ready.wait()
                message = stream.next_message()
                if message is not None:
                    yield message
                if stream.malformed is not None:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"stream message does not parse: {stream.malformed}")
                if stream.reader_done and not stream.jobs and stream.empty:
                    if reader.done() and not reader.cancelled() and reader.exception() is not None:
                        raise reader.exception()  # type: ignore[misc]
                    return
        finally:
            reader.cancel()
            for job in list(stream.jobs.values()):
                job.fail(grpc.StatusCode.CANCELLED, "the stream ended before the request finished")

    async def _read_stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], stream: StreamSink, context: grpc.aio.ServicerContext
    ) -> None:
        try:
            async for message in request_iterator:
                if isinstance(message, Malformed):
                    stream.malformed = message.error
                    return
                for job_id in message.cancel:
                    job = stream.jobs.get(job_id)
                    if job is not None:
                        job.fail(grpc.StatusCode.CANCELLED, "cancelled by the client")
                for i, request in enumerate(message.requests):
                    if i % 64 == 0 and not stream.drained.is_set():  # the client is not reading: stop taking requests
                        await stream.drained.wait()
                    self._stream_request(request, stream, context)
        finally:
            stream.reader_done = True
            stream.ready.set()

    def _stream_request(self, request: pb.GenerateRequest, stream: StreamSink, context: grpc.aio.ServicerContext) -> None:
        job_id = request.id
        if stream.credit <= 0:
            self._refused("GenerateStream", grpc.StatusCode.RESOURCE_EXHAUSTED)
            outcome = Outcome.error(grpc.StatusCode.RESOURCE_EXHAUSTED, "no credit left: wait for the server's credits before sending more")
            stream.answer(job_id[:MAX_ID_LENGTH], None, outcome, credit=False)
            return
        stream.credit -= 1
        try:
            if not job_id:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "id is empty: tag each request with an id unique among your in-flight ones")
            if len(job_id) > MAX_ID_LENGTH:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"id has {len(job_id)} characters; the limit is {MAX_ID_LENGTH}")
            if job_id in stream.jobs:
                raise Refused(grpc.StatusCode.ALREADY_EXISTS, f"id {_brief(job_id)} is already in flight on this stream")
            job = self.build_job(request, "GenerateStream", job_id, stream)
            self.pipeline.admit(job, _timeout(request.timeout_ms, context.time_remaining()))
        except Refused as e:
            self._refused("GenerateStream", e.code)
            stream.answer(job_id[:MAX_ID_LENGTH], None, Outcome.error(e.code, e.message), retry_after_ms=e.retry_after_ms)
            return
        stream.jobs[job_id] = job


def _timeout(timeout_ms: int, remaining: float | None) -> float | None:
    """The request's own timeout, capped by the call's deadline; None when neither is set."""
    own = timeout_ms / 1000 if timeout_ms else None
    if remaining is None:
        return own
    return remaining if own is None else min(own, remaining)
