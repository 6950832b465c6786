"""The genserve.v1.Generator servicer: thin handlers that convert between protobuf and jobs at the edge.

- ``Generate``: one job; its chunks are yielded as they come; a refusal or failure ends the call
  with the job's gRPC status, a success with a ``Finish`` message.
- ``GenerateStream``: many jobs on one stream, tagged with the client's ids. The first message
  grants ``stream_credits``; each admitted request uses one credit and gives it back when it
  finishes (piggybacked on the next message). Requests beyond the credit are refused for their id
  with RESOURCE_EXHAUSTED. Results are coalesced: one message carries whatever is ready.

The parts: ``server/wire.py`` (parsing bad bytes, building messages), ``server/pipeline/requests.py``
(request -> checked job), ``outbox.py`` (a call's queue, a stream's outbox and its credits),
``server/pipeline/core.py`` (admission).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from engine.logs import get_logger
from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.config import ServerConfig
from server.grpc_edge.accept import Refusal, release_call
from server.grpc_edge.codes import GRPC_CODES, retry_metadata
from server.grpc_edge.outbox import MAX_BYTES_PER_MESSAGE, MAX_RESULTS_PER_MESSAGE, CallQueue, StreamOutbox
from server.metrics import Metrics
from server.pipeline.core import Pipeline
from server.pipeline.jobs import Outcome, Rpc
from server.pipeline.requests import MAX_ID_LENGTH, call_id, check_stream_id, timeout_of
from server.pipeline.statuses import Code, Refused
from server.wire import SERVICE, Malformed, finish_message, tolerant

log = get_logger("server.grpc_edge.service")

GENERATE_PATH = f"/{SERVICE}/Generate".encode()


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
    # Registered, not generic: grpc core matches each method's calls to its own requests, so the
    # accept path knows a call's method before any handler runs (server/grpc_edge/accept.py's ArrivalPolicy).
    server.add_registered_method_handlers(SERVICE, handlers)


class GeneratorService(pb_grpc.GeneratorServicer):
    def __init__(self, config: ServerConfig, pipeline: Pipeline, metrics: Metrics) -> None:
        self.config = config
        self.jobs = pipeline.jobs  # the core's request -> job builder, shared with every ingress
        self.pipeline = pipeline
        self.registry = pipeline.registry
        self.metrics = metrics
        self._refusals: dict[str, tuple[Refusal, Any]] = {}  # the accept path's refusals, ready made

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
                low, high = info.image.label_range or (None, None)  # unconditional: the range stays unset
                steps = info.image.steps
                entry.image.CopyFrom(
                    pb.ImageAccepts(
                        max_n=info.image.max_n,
                        image_size=info.image.image_size,
                        latent_dim=info.image.latent_dim,
                        conditional=info.image.conditional,
                        label_min=low,
                        label_max=high,
                        steps_min=steps.low if steps else 0,
                        steps_max=steps.high if steps else 0,
                        steps_default=steps.default if steps else 0,
                        guidance_default=steps.guidance if steps else 0.0,
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

    # -- the accept path's policy (server/grpc_edge/accept.py) -------------------------------------------

    def refusal_at_arrival(self, method: bytes | None, in_progress: int, queued_s: float) -> Refusal | None:
        """A Generate call is refused as it arrives, before its message is read or a handler runs, while
        the pipeline's queue stands; when the calls in progress (text calls leave the count once their
        handler knows them: ``release_call``) reach admission's CallLimit; or while the loop's queue is
        over target and calls still wait to start (``queued_s``: the oldest one's wait so far). A
        refusal here costs about half one from the handler (docs/design/accept-ahead.md). Anything
        else goes on."""
        if method != GENERATE_PATH:
            return None
        pipeline = self.pipeline
        admission = pipeline.admission
        if admission.codel.shedding:
            return self._refusal_now(None)
        if in_progress >= admission.calls.limit:
            return self._refusal_now("limit")
        if admission.arrival.sheds(queued_s):
            return self._refusal_now("arrival")
        return None

    def refusal_at_handover(self, method: bytes | None, waited_s: float) -> Refusal | None:
        """Every call's wait to start is admission's arrival signal; while that queue is overloaded, a
        Generate call that waited over twice the target is refused rather than served late (Facebook's
        adaptive CoDel: under overload, the oldest are the ones to drop)."""
        admission = self.pipeline.admission
        admission.observe_arrival(waited_s)
        arrival = admission.arrival
        if method != GENERATE_PATH or waited_s <= 2 * arrival.target or not arrival.shedding(admission.clock()):
            return None
        return self._refusal_now("arrival")

    def _refusal_now(self, fallback: str | None) -> Refusal | None:
        """The refusal admission gives now (counted as the handler's are), else the one for ``fallback``
        ("arrival" or "limit", counted), else None."""
        pipeline = self.pipeline
        reason = pipeline.refusal_reason()
        if reason is None:
            if fallback is None:
                return None
            pipeline.admission.on_refusal(fallback)
            reason = fallback
        known = self._refusals.get(reason)
        if known is None:  # a few distinct refusals: each built and its counter looked up once
            e = pipeline.refused(reason)
            known = self._refusals[reason] = (
                (GRPC_CODES[e.code], e.message, retry_metadata(e.retry_after_ms)),
                self.metrics.rejections.labels(Rpc.GENERATE, e.code.name),
            )
        refusal, counter = known
        counter.inc()
        return refusal

    def _refused(self, rpc: Rpc, code: Code) -> None:
        self.metrics.rejections.labels(rpc, code.name).inc()

    # -- Generate -----------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request does not parse: {request.error}")
        job_id = call_id(request)
        queue = CallQueue(self.config.stream_interval)
        try:  # a bad request hears what is wrong with it even from an overloaded server: validate, then admit
            job = self.jobs.build(request, Rpc.GENERATE, job_id, queue)
            if job.text is not None:
                release_call()  # a text call lasts as long as its tokens: not counted by the call limit
            self.pipeline.admit(job, timeout_of(request.timeout_ms, context.time_remaining()))
        except Refused as e:
            self._refused(Rpc.GENERATE, e.code)
            # No log line: under overload refusals are most calls, and each is counted in the metrics.
            _end_call(context, e.code, e.message, retry_metadata(e.retry_after_ms))
            return
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Outcome):
                    release_call()  # its work is done: what is left is sending, not the server's load
                    if item.ok:
                        yield finish_message(job_id, job, item)
                        return
                    log.debug("request_failed", request_id=job_id, rpc=Rpc.GENERATE, code=item.code.name, reason=item.message)
                    _end_call(context, item.code, item.message)
                    return
                yield item
        finally:
            if not job.done:  # the client went away or its deadline passed: its queued work is dropped
                job.fail(Code.CANCELLED, "the call ended before the request finished")

    # -- GenerateStream -------------------------------------------------------------------------

    async def GenerateStream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        budget = min(MAX_BYTES_PER_MESSAGE, (self.config.max_message_mb << 20) // 2)
        stream = StreamOutbox(
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
                job.fail(Code.CANCELLED, "the stream ended before the request finished")

    async def _read_stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], stream: StreamOutbox, context: grpc.aio.ServicerContext
    ) -> None:
        try:
            async for message in request_iterator:
                if isinstance(message, Malformed):
                    stream.malformed = message.error
                    return
                for job_id in message.cancel:
                    job = stream.jobs.get(job_id)
                    if job is not None:
                        job.fail(Code.CANCELLED, "cancelled by the client")
                for i, request in enumerate(message.requests):
                    if i % 64 == 0 and not stream.drained.is_set():  # the client is not reading: stop taking requests
                        await stream.drained.wait()
                    self._stream_request(request, stream, context)
        finally:
            stream.reader_done = True
            stream.ready.set()

    def _stream_request(self, request: pb.GenerateRequest, stream: StreamOutbox, context: grpc.aio.ServicerContext) -> None:
        job_id = request.id
        if stream.credit <= 0:
            self._refused(Rpc.GENERATE_STREAM, Code.RESOURCE_EXHAUSTED)
            outcome = Outcome.error(Code.RESOURCE_EXHAUSTED, "no credit left: wait for the server's credits before sending more")
            stream.answer(job_id[:MAX_ID_LENGTH], None, outcome, credit=False)
            return
        stream.credit -= 1
        try:
            check_stream_id(job_id, stream.jobs)
            job = self.jobs.build(request, Rpc.GENERATE_STREAM, job_id, stream)
            self.pipeline.admit(job, timeout_of(request.timeout_ms, context.time_remaining()))
        except Refused as e:
            self._refused(Rpc.GENERATE_STREAM, e.code)
            stream.answer(job_id[:MAX_ID_LENGTH], None, Outcome.error(e.code, e.message), retry_after_ms=e.retry_after_ms)
            return
        stream.jobs[job_id] = job


def _end_call(context: grpc.aio.ServicerContext, code: Code, message: str, trailing_metadata: tuple[tuple[str, str], ...] = ()) -> None:
    """End the call with this status once the handler returns. Not ``context.abort``: it raises an
    AbortError that grpc keeps in a reference cycle (the exception, its traceback, grpc's frame that
    holds it) with the handler's frame, so every failed or refused call left its job, queue and request
    for the cyclic collector (59 such cycles after a 6 s chaos run; none with this)."""
    context.set_code(GRPC_CODES[code])
    context.set_details(message)
    if trailing_metadata:  # the retry hint of a refusal (grpc-retry-pushback-ms)
        context.set_trailing_metadata(trailing_metadata)
