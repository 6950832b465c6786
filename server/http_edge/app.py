"""The HTTP edge: OpenAI-compatible endpoints over the pipeline core, on Starlette in the server's
own event loop (uvicorn, httptools).

    GET  /v1/models               every served model (OpenAI's list; our kind and limits beside)
    POST /v1/completions          text after a prompt; "stream": true for Server-Sent Events
    POST /v1/chat/completions     messages rendered as the plays' turns (openai_api.chat_prompt)
    POST /v1/images/generations   PNG digits as b64_json
    GET  /health, /ready          liveness; readiness as the gRPC health service says it
    GET  /                        the playground: one page of plain HTML and JS over the endpoints above

A request goes through the same builder, admission and limits as a gRPC one (``Rpc.HTTP``); a
refusal is OpenAI's error shape with the matching status (429 with Retry-After, 503 while
draining) and is counted in ``genserve_rejections_total``. A stream whose client goes away ends
its job, and its sequence leaves the decode batch at the next step.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import math
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine import ImageResult, ServedModel, TokenEvent
from engine.errors import ModelNotFound
from engine.logs import get_logger
from genserve.v1 import generator_pb2 as pb
from server.http_edge.openai_api import (
    HTTP_STATUS,
    BadRequest,
    TextCall,
    chat_request,
    completion_body,
    completion_chunk,
    completion_request,
    error_body,
    image_request,
    param_of,
    png_b64,
    renamed,
)
from server.metrics import Metrics
from server.pipeline.core import Pipeline
from server.pipeline.jobs import Job, Outcome, Rpc
from server.pipeline.statuses import Code, Refused

log = get_logger("server.http_edge")

MAX_BODY_BYTES = 1 << 20  # a request body over this is refused, 413
PLAYGROUND = Path(__file__).with_name("playground.html")
PNGS_ON_THE_LOOP = 16  # more samples than this are encoded on a worker thread


class JobEvents:
    """A job's results for one HTTP request: chunks, then its one outcome, for the handler to read.
    Only the event loop's thread puts; one handler reads."""

    def __init__(self) -> None:
        self.items: collections.deque[ImageResult | TokenEvent | Outcome] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def emit(self, job: Job, item: ImageResult | TokenEvent) -> None:
        self._put(item)

    def finish(self, job: Job, outcome: Outcome) -> None:
        self._put(outcome)

    def _put(self, item: ImageResult | TokenEvent | Outcome) -> None:
        self.items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> ImageResult | TokenEvent | Outcome:
        while not self.items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self.items.popleft()


def error_response(status: int, message: str, kind: str, param: str | None = None, retry_after_ms: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_ms / 1000)))} if retry_after_ms is not None else None
    return JSONResponse(error_body(message, kind, param), status_code=status, headers=headers)


def outcome_response(code: Code, message: str, retry_after_ms: int | None = None) -> JSONResponse:
    status, kind = HTTP_STATUS.get(code, (503, "service_unavailable"))
    message = renamed(message)
    param = param_of(message) if status == 400 else "model" if code is Code.NOT_FOUND else None
    return error_response(status, message, kind, param, retry_after_ms)


class HttpEdge:
    """The routes, over one server's pipeline; ``ready`` says whether the server admits work."""

    def __init__(self, pipeline: Pipeline, metrics: Metrics, *, tokens: Iterable[str] = (), public_health: bool = True,
                 ready: Callable[[], bool] = lambda: True) -> None:  # fmt: skip
        self.pipeline = pipeline
        self.metrics = metrics
        self.tokens = tuple(t.encode() for t in tokens)
        self.public_health = public_health or not self.tokens
        self.ready = ready
        self._ids = 0
        self.app = Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/images/generations", self.images, methods=["POST"]),
                Route("/", self.playground, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/ready", self.readiness, methods=["GET"]),
            ],
        )

    # -- plumbing ---------------------------------------------------------------------------

    def _refused(self, code: Code) -> None:
        self.metrics.rejections.labels(Rpc.HTTP, code.name).inc()

    def _authorized(self, request: Request) -> bool:
        if not self.tokens:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        return scheme.lower() == "bearer" and any(hmac.compare_digest(given, t) for t in self.tokens)

    async def _body(self, request: Request) -> dict[str, Any]:
        if not self._authorized(request):
            self._refused(Code.UNAUTHENTICATED)
            raise BadRequest("missing or wrong bearer token: send 'Authorization: Bearer <token>'", status=401, code="invalid_api_key")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise BadRequest(f"request body is over {MAX_BODY_BYTES} bytes", status=413)
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > MAX_BODY_BYTES:
                raise BadRequest(f"request body is over {MAX_BODY_BYTES} bytes", status=413)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest(f"body must be a JSON object, got {type(body).__name__}")
        return body

    def _admit(self, request: pb.GenerateRequest, events: JobEvents, headers: Mapping[str, str]) -> Job:
        """Build and admit the job, or raise Refused (counted). A ``timeout`` header (seconds) is its
        deadline, capped by the server's --request-timeout-s as for gRPC."""
        timeout = _timeout(headers.get("timeout"))
        self._ids += 1
        try:
            job = self.pipeline.jobs.build(request, Rpc.HTTP, f"http-{os.getpid()}-{self._ids}", events)
            self.pipeline.admit(job, timeout)
        except Refused as e:
            self._refused(e.code)
            raise
        return job

    @staticmethod
    def _bad(e: BadRequest) -> JSONResponse:
        kinds = {401: "authentication_error", 413: "invalid_request_error"}
        return JSONResponse(error_body(e.message, kinds.get(e.status, "invalid_request_error"), e.param, e.code), status_code=e.status)

    # -- endpoints --------------------------------------------------------------------------

    def _closed(self, request: Request) -> Response | None:
        """With --no-public-health, the health endpoints and the page need a token too: the 401."""
        if self.public_health or self._authorized(request):
            return None
        self._refused(Code.UNAUTHENTICATED)
        return self._bad(BadRequest("missing or wrong bearer token: send 'Authorization: Bearer <token>'", status=401))

    async def playground(self, request: Request) -> Response:
        """One page, shipped in the package: pick a model, draw digits, stream text (the public endpoints only)."""
        return self._closed(request) or HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    async def health(self, request: Request) -> Response:
        return self._closed(request) or JSONResponse({"status": "ok"})

    async def readiness(self, request: Request) -> Response:
        closed = self._closed(request)
        if closed is not None:
            return closed
        ready = self.ready()
        return JSONResponse({"status": "ready" if ready else "not ready"}, status_code=200 if ready else 503)

    async def models(self, request: Request) -> Response:
        if not self._authorized(request):
            self._refused(Code.UNAUTHENTICATED)
            return self._bad(BadRequest("missing or wrong bearer token: send 'Authorization: Bearer <token>'", status=401))
        data = []
        for info in self.pipeline.registry.list_models():
            if not info.latest:
                continue
            accepts: dict[str, Any] = {}
            if info.image is not None:
                accepts = {"images": {"size": f"{info.image.image_size}x{info.image.image_size}", "max_n": info.image.max_n}}
                if info.image.label_range is not None:
                    accepts["images"]["labels"] = list(info.image.label_range)
                if info.image.steps is not None:  # iterative models
                    s = info.image.steps
                    accepts["images"]["steps"] = {"min": s.low, "max": s.high, "default": s.default}
                    accepts["images"]["guidance"] = s.guidance
            elif info.text is not None:
                accepts = {"text": {"context_window": info.text.context_window, "max_tokens": self.pipeline.jobs.max_new_tokens}}
            data.append({"id": info.name, "object": "model", "created": 0, "owned_by": "genserve", "kind": info.kind,
                         "version": info.version, "accepts": accepts})  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: Request) -> Response:
        return await self._text(request, completion_request)

    async def chat_completions(self, request: Request) -> Response:
        return await self._text(request, chat_request)

    async def _text(self, request: Request, parse: Callable[[dict[str, Any]], TextCall]) -> Response:
        try:
            call = parse(await self._body(request))
            events = JobEvents()
            job = self._admit(call.request, events, request.headers)
        except BadRequest as e:
            return self._bad(e)
        except ValueError as e:  # a value protobuf cannot carry
            return self._bad(BadRequest(str(e)))
        except Refused as e:
            return outcome_response(e.code, e.message, e.retry_after_ms)
        name = job.served.name
        if call.stream:
            return StreamingResponse(self._sse(job, events, name, call.chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        pieces: list[str] = []
        try:
            while True:
                item = await events.get()
                if isinstance(item, Outcome):
                    if not item.ok:
                        return outcome_response(item.code, item.message)
                    body = completion_body(job.id, name, "".join(pieces), item.reason, len(call.request.text.prompt), job.sent,
                                           chat=call.chat)  # fmt: skip
                    return JSONResponse(body)
                if isinstance(item, TokenEvent):
                    pieces.append(item.text)
        finally:
            if not job.done:  # the client went away
                job.fail(Code.CANCELLED, "the HTTP request ended before the job finished")

    async def _sse(self, job: Job, events: JobEvents, model: str, chat: bool) -> AsyncIterator[bytes]:
        first = True
        try:
            if chat:  # the role first, as OpenAI's streams do
                yield _event(completion_chunk(job.id, model, "", None, chat=True, first=True))
                first = False
            while True:
                item = await events.get()
                if isinstance(item, Outcome):
                    if item.ok:
                        yield _event(completion_chunk(job.id, model, "", item.reason, chat=chat))
                    else:
                        status, kind = HTTP_STATUS.get(item.code, (503, "service_unavailable"))
                        yield _event(error_body(renamed(item.message), kind, code=str(status)))
                    yield b"data: [DONE]\n\n"
                    return
                if isinstance(item, TokenEvent) and item.text:
                    yield _event(completion_chunk(job.id, model, item.text, None, chat=chat, first=first))
                    first = False
        finally:
            if not job.done:  # the client disconnected: the sequence leaves the batch at the next step
                job.fail(Code.CANCELLED, "the HTTP client went away")

    async def images(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            model = body.get("model")
            served = self._served(model)
            size = served.info.image.image_size if served is not None and served.info.image is not None else None
            parsed = image_request(body, size)
            events = JobEvents()
            job = self._admit(parsed, events, request.headers)
        except BadRequest as e:
            return self._bad(e)
        except ValueError as e:
            return self._bad(BadRequest(str(e)))
        except Refused as e:
            return outcome_response(e.code, e.message, e.retry_after_ms)
        results: list[ImageResult] = []
        try:
            while True:
                item = await events.get()
                if isinstance(item, Outcome):
                    if not item.ok:
                        return outcome_response(item.code, item.message)
                    break
                if isinstance(item, ImageResult):
                    results.append(item)
        finally:
            if not job.done:
                job.fail(Code.CANCELLED, "the HTTP request ended before the job finished")
        results.sort(key=lambda r: r.offset)
        samples = [sample for r in results for sample in r.pixels]
        if len(samples) <= PNGS_ON_THE_LOOP:
            data = [{"b64_json": png_b64(sample)} for sample in samples]
        else:  # ~50 us a PNG: many would hold the event loop
            data = await asyncio.to_thread(lambda: [{"b64_json": png_b64(sample)} for sample in samples])
        return JSONResponse({"created": int(job.created), "data": data, "seed": job.seed})

    def _served(self, model: object) -> ServedModel | None:
        try:
            return self.pipeline.registry.get(model)
        except ModelNotFound:  # the builder refuses it, naming what is served
            return None


def _timeout(header: str | None) -> float | None:
    if header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise BadRequest(f"the timeout header must be a number of seconds > 0, got {header[:40]!r}", "timeout")
    return seconds


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
