"""``Session``: many requests multiplexed on one ``GenerateStream``, within the server's credits.

The protocol (proto/genserve/v1/generator.proto): the server's first message grants the initial
credit, and each later message's ``credits`` adds to it; every request sent spends one. So the
session never sends beyond its credit: requests wait in a local queue, and one writer task sends
everything queued that the credit allows in one ``StreamRequest``. One reader task takes the
results, puts image chunks in place and text pieces in order, and settles each request's future
on its ``Finish``.

A request refused for its id with RESOURCE_EXHAUSTED or UNAVAILABLE before any of its output
arrived is sent again after a jittered back-off (the client's ``RetryPolicy``), within its
deadline; when the refusal carries the server's hint (``Finish.retry_after_ms``, overload), the
wait is at least that long. Each request has a deadline: the server is told the time left when it is sent, and a
request still unfinished at its deadline fails with ``DeadlineExceeded`` here (and is cancelled
on the server). Cancelling a request's future cancels the request.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, Unpack, overload

import grpc

from clients._channel import DEFAULT_TIMEOUT, RetryPolicy
from clients._exceptions import RETRYABLE_CODES, DeadlineExceeded, GenserveError, Unavailable, from_rpc_error, from_status
from clients._protocol import UINT32_MAX, ImageAssembler, ImageOptions, TextAssembler, TextOptions, image_request, text_request
from clients._types import ImageResult, TextResult
from genserve.v1 import generator_pb2 as pb

MAX_PER_MESSAGE = 1024  # requests in one StreamRequest: keeps a message far below the size limits
CLOSE_GRACE_S = 5.0  # on close, how long the server may take to end the stream after we stop writing

Result = ImageResult | TextResult
_RETRYABLE = tuple(code.value[0] for code in RETRYABLE_CODES)  # as a Finish carries them
_CANCELLED = grpc.StatusCode.CANCELLED.value[0]


@dataclass(eq=False, slots=True)
class _Request:
    id: str
    message: pb.GenerateRequest
    future: asyncio.Future[Any]
    assembler: ImageAssembler | TextAssembler
    deadline: float | None  # loop time
    state: Literal["queued", "backoff", "sent"] = "queued"
    attempts: int = 0  # times sent
    expiry: asyncio.TimerHandle | None = None  # fails the future at the deadline
    retry: asyncio.TimerHandle | None = None  # queues it again after a back-off

    def fresh_assembler(self) -> None:
        self.assembler = ImageAssembler(self.assembler.n) if isinstance(self.assembler, ImageAssembler) else TextAssembler()


class Session:
    """Many requests on one stream; made by ``AsyncClient.session()``, used as ``async with``.

    ``submit_images`` and ``submit_text`` never block: they return an ``asyncio.Future`` at once
    and the request waits locally until the credit lets it go. Results come back in completion
    order, through the futures or ``results()``. Leaving the ``async with`` block normally waits
    for every submitted request; leaving it by an exception cancels what is left.
    """

    def __init__(
        self,
        open_stub: Callable[[], Awaitable[Any]],
        *,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        collect: bool = True,
    ) -> None:
        self._open_stub = open_stub
        self._metadata = tuple(metadata)
        self.timeout = timeout
        self.retry = retry
        self.collect = collect
        self.credit = 0  # requests the server will still take
        self._requests: dict[str, _Request] = {}  # every live request: queued, backing off or sent
        self._queue: collections.deque[_Request] = collections.deque()
        self._cancels: list[str] = []  # ids to cancel on the server, sent with the next message
        self._finished: collections.deque[asyncio.Future[Any]] = collections.deque()  # for results()
        self._pending = 0  # futures not yet done
        self._in_flight = 0  # requests sent and not finished by the server
        self._ids = itertools.count(1)
        self._wake_writer = asyncio.Event()
        self._changed = asyncio.Event()  # a future finished, or the stream ended
        self._ready = asyncio.Event()  # the first message (the initial credit) arrived
        self._call: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._error: GenserveError | None = None  # why the stream ended, once it has
        self._state: Literal["new", "open", "closed"] = "new"

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet finished by the server."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Requests waiting for credit (or for a retry)."""
        return len(self._requests) - self._in_flight

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError("Cannot open a session more than once.")
        self._state = "open"
        stub = await self._open_stub()
        self._call = stub.GenerateStream(metadata=self._metadata)
        self._tasks = [asyncio.create_task(self._read(), name="genserve-read"), asyncio.create_task(self._write(), name="genserve-write")]
        ready = asyncio.create_task(self._ready.wait())
        try:
            await asyncio.wait([ready, self._tasks[0]], timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
            if not self._ready.is_set():
                raise self._error or DeadlineExceeded(f"the server granted no credit within {self.timeout} s")
        except BaseException:
            await self.aclose()
            raise
        finally:
            ready.cancel()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                await self.drain()
        finally:
            await self.aclose()

    async def drain(self) -> None:
        """Wait until every request submitted so far has finished (or failed, or was cancelled)."""
        while self._pending:
            self._changed.clear()
            await self._changed.wait()

    async def aclose(self) -> None:
        """Cancel what is left and end the stream. Closing twice is harmless."""
        if self._state == "closed":
            return
        self._state = "closed"
        for request in list(self._requests.values()):
            request.future.cancel()
        call, tasks = self._call, self._tasks
        if call is not None and self._error is None:
            try:
                if not self._requests:  # nothing left on the server: end the stream politely
                    await call.done_writing()
                    await asyncio.wait_for(asyncio.shield(tasks[0]), CLOSE_GRACE_S)
            except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError):
                pass
            finally:
                call.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- submitting -------------------------------------------------------------------------------

    def submit_images(
        self,
        model: str,
        n: int,
        *,
        want_float: bool = False,
        id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[ImageOptions],
    ) -> asyncio.Future[ImageResult]:
        """Queue one image request; its future gives an ``ImageResult`` (``want_float`` adds ``floats``)."""
        rid = self._new_id(id)
        message = image_request(model, n, want_float=want_float, id=rid, **options)
        return self._submit(rid, message, ImageAssembler(n), timeout)

    def submit_text(
        self,
        model: str,
        prompt: str,
        *,
        id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[TextOptions],
    ) -> asyncio.Future[TextResult]:
        """Queue one text request; its future gives a ``TextResult`` (see ``AsyncClient.stream_text``)."""
        rid = self._new_id(id)
        message = text_request(model, prompt, id=rid, **options)
        return self._submit(rid, message, TextAssembler(), timeout)

    def cancel(self, request: str | asyncio.Future[Any]) -> bool:
        """Cancel a request by id or future; False when it had already finished."""
        if isinstance(request, str):
            live = self._requests.get(request)
            return live.future.cancel() if live is not None else False
        return request.cancel()

    def _new_id(self, id: str | None) -> str:
        if self._state != "open":
            raise RuntimeError("Cannot submit a request: the session is not open (use `async with client.session() as s`).")
        if self._error is not None:
            raise type(self._error)(self._error.details, code=self._error.code)
        if id is None:
            id = str(next(self._ids))
            while id in self._requests:
                id = str(next(self._ids))
        elif id in self._requests:
            raise ValueError(f"request id {id!r} is already in flight")
        return id

    def _submit(self, rid: str, message: pb.GenerateRequest, assembler: ImageAssembler | TextAssembler, timeout: float | None) -> Any:
        loop = asyncio.get_running_loop()
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else loop.time() + timeout
        request = _Request(rid, message, loop.create_future(), assembler, deadline)
        self._requests[rid] = request
        self._pending += 1
        request.future.add_done_callback(lambda _: self._settled(request))
        if deadline is not None:
            request.expiry = loop.call_at(deadline, self._expire, request)
        self._enqueue(request)
        return request.future

    def _enqueue(self, request: _Request) -> None:
        if request.future.done():
            return
        request.state = "queued"
        self._queue.append(request)
        self._wake_writer.set()

    # -- settling ---------------------------------------------------------------------------------

    def _settled(self, request: _Request) -> None:
        """A request's future is done (asyncio runs this soon after): forget it, or have the server cancel it."""
        self._pending -= 1
        if self._requests.get(request.id) is request:  # not finished by the server: cancelled, expired or malformed
            if request.state == "sent":
                self._cancels.append(request.id)  # stays tracked (its id and credit in use) until its Finish
                self._wake_writer.set()
            else:
                self._forget(request)  # the writer skips it in the queue
        if self.collect and not request.future.cancelled():
            self._finished.append(request.future)
        self._changed.set()

    def _forget(self, request: _Request) -> None:
        if self._requests.get(request.id) is request:
            del self._requests[request.id]
        for timer in (request.expiry, request.retry):
            if timer is not None:
                timer.cancel()

    def _expire(self, request: _Request) -> None:
        if not request.future.done():
            request.future.set_exception(DeadlineExceeded("the request did not finish within its deadline", request_id=request.id))

    def _finish(self, request: _Request, finish: pb.Finish) -> None:
        hint = finish.retry_after_ms / 1000  # the server's retry hint (overload): wait at least that long
        if finish.code in _RETRYABLE and self._may_retry(request, hint):
            assert self.retry is not None
            request.state = "backoff"
            request.fresh_assembler()
            wait = hint + random.uniform(0, self.retry.backoff(request.attempts))  # full jitter, as gRPC's own retries
            request.retry = asyncio.get_running_loop().call_later(wait, self._enqueue, request)
            return
        self._forget(request)
        future = request.future
        if future.done():
            return
        if finish.code == 0:
            try:
                future.set_result(request.assembler.result(finish, request.id))
            except GenserveError as e:
                e.request_id = request.id
                future.set_exception(e)
        else:
            future.set_exception(from_status(finish.code, finish.message, request_id=request.id))

    def _may_retry(self, request: _Request, hint: float = 0.0) -> bool:
        if request.future.done() or self.retry is None or request.attempts >= self.retry.max_attempts:
            return False
        if request.assembler.received:  # never replay a request whose output has begun to arrive
            return False
        backoff = hint + self.retry.backoff(request.attempts)
        return request.deadline is None or asyncio.get_running_loop().time() + backoff < request.deadline

    def _fail_all(self, error: GenserveError) -> None:
        self._error = error
        for request in list(self._requests.values()):
            self._forget(request)
            if not request.future.done():
                failure = type(error)(error.details, code=error.code, request_id=request.id)
                request.future.set_exception(failure)
        self._queue.clear()
        self._in_flight = 0
        self._changed.set()

    # -- the two tasks ----------------------------------------------------------------------------

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            batch: list[pb.GenerateRequest] = []
            now = loop.time()
            while self._queue and self.credit > 0 and len(batch) < MAX_PER_MESSAGE:
                request = self._queue.popleft()
                if request.future.done():  # cancelled or expired while queued
                    continue
                if request.deadline is not None:  # tell the server the time left
                    request.message.timeout_ms = min(UINT32_MAX, max(1, math.ceil((request.deadline - now) * 1000)))  # a uint32
                request.state = "sent"
                self._in_flight += 1
                request.attempts += 1
                self.credit -= 1
                batch.append(request.message)
            cancels, self._cancels = self._cancels, []
            if batch or cancels:
                try:
                    await self._call.write(pb.StreamRequest(requests=batch, cancel=cancels))
                except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                    return  # the stream ended: the reader reports why
                if self._queue and self.credit > 0:
                    self._wake_writer.set()

    async def _read(self) -> None:
        error: GenserveError | None = None
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    break
                if response.credits:
                    self.credit += response.credits
                    self._wake_writer.set()
                for result in response.results:
                    self._take(result)
                self._ready.set()
        except grpc.aio.AioRpcError as e:
            error = from_rpc_error(e)
        finally:
            if self._requests or error is not None or self._state == "open":
                n = len(self._requests)
                self._fail_all(error or Unavailable("the server ended the stream" + (f" with {n} request(s) unfinished" if n else "")))

    def _take(self, result: pb.GenerateResponse) -> None:
        request = self._requests.get(result.id)
        if request is None or request.state != "sent":
            return  # a request we no longer track (a late chunk of a cancelled one)
        which = result.WhichOneof("payload")
        try:
            if which == "images":
                if not isinstance(request.assembler, ImageAssembler):
                    raise GenserveError(f"images for text request {request.id!r}")
                request.assembler.add(result.images)
            elif which == "text":
                if not isinstance(request.assembler, TextAssembler):
                    raise GenserveError(f"text for image request {request.id!r}")
                request.assembler.add(result.text)
            elif which == "finish":
                self._in_flight -= 1
                self._finish(request, result.finish)
        except GenserveError as e:
            if not request.future.done():
                e.request_id = request.id
                request.future.set_exception(e)

    # -- results ----------------------------------------------------------------------------------

    @overload
    def results(self, *, return_exceptions: Literal[False] = False) -> AsyncIterator[Result]: ...
    @overload
    def results(self, *, return_exceptions: Literal[True]) -> AsyncIterator[Result | GenserveError]: ...

    async def results(self, *, return_exceptions: bool = False) -> AsyncIterator[Result | GenserveError]:
        """Each finished request's result, in completion order, until none is left unfinished.

        A failed request raises its ``GenserveError`` (its ``request_id`` says which), or is
        yielded as that exception with ``return_exceptions=True``. Cancelled requests are
        skipped. Iterating again goes on where the last iteration stopped.
        """
        if not self.collect:
            raise RuntimeError("results() needs a session opened with collect=True")
        while True:
            while self._finished:
                future = self._finished.popleft()
                error = future.exception()
                if error is None:
                    yield future.result()
                elif return_exceptions and isinstance(error, GenserveError):
                    yield error
                else:
                    raise error
            if not self._pending:
                return
            self._changed.clear()
            await self._changed.wait()
