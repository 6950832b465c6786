"""``AsyncAmqpClient`` and ``AmqpClient``: requests through a RabbitMQ queue that genserve servers consume.

Each request is one message (a serialized ``GenerateRequest``, with a fresh ``correlation_id`` and
``reply_to`` this client's private reply queue); its answer is one ``StreamResponse`` message.
The guarantee is at-least-once: a server that dies before acknowledging a request makes the
broker hand it to another server, so a reply can come twice. The client keeps the first reply of
each correlation id and drops the rest (``duplicates`` counts them); generation is idempotent for
a given seed, so the first reply is as good as any. A reply to a request the caller gave up on (its
deadline passed, or its task was cancelled) is dropped too and counted apart, in ``late``: it is
not a second answer, only one nobody waits for any more.

A deadline becomes the message's ``expiration`` (a request still queued when it passes is
dead-lettered by the broker, never served late), its ``timeout_ms``, and a
``genserve-deadline-ms`` header, so a server that takes it late serves only the time left.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, Unpack

import numpy as np
import numpy.typing as npt

from clients._channel import DEFAULT_TIMEOUT
from clients._exceptions import DeadlineExceeded, ServerError, from_status
from clients._protocol import UINT32_MAX, ImageAssembler, ImageOptions, TextAssembler, TextOptions, image_request, text_request
from clients._sync import _Portal
from clients._types import ImageResult, TextResult
from genserve.v1 import generator_pb2 as pb
from genserve.v1.amqp import CONTENT_TYPE, DEADLINE_HEADER, DEFAULT_QUEUE, dead_letter_queue, queue_arguments

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel, AbstractRobustConnection

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
# How many given-up correlation ids are remembered, to tell a late reply from a duplicate: a
# bounded memory (an id is 32 characters), enough for every request of a long burst of timeouts.
REMEMBER_ABANDONED = 65536


class AsyncAmqpClient:
    """Publish requests to a genserve request queue and await their replies (asyncio).

    >>> async with AsyncAmqpClient("amqp://guest:guest@127.0.0.1:5672/") as client:
    ...     digits = await client.generate_images("vae", 16, seed=0)   # (16, 28, 28) uint8
    ...     text = await client.generate_text("transformer", "ROMEO:", max_new_tokens=50)

    url: the broker; queue: the servers' ``--amqp-queue``; timeout: each request's default
    deadline in seconds (None: no deadline, no expiration).
    """

    def __init__(self, url: str = DEFAULT_URL, *, queue: str = DEFAULT_QUEUE, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 or None, got {timeout}")
        if not queue:
            raise ValueError("queue is empty: name the servers' request queue")
        self.url = url
        self.queue = queue
        self.timeout = timeout
        self.duplicates = 0  # replies dropped because their request had its reply already
        self.late = 0  # replies dropped because their request was given up on (deadline, cancellation)
        self._abandoned: OrderedDict[str, bool] = OrderedDict()  # the last REMEMBER_ABANDONED given up on: late reply seen?
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._replies: AbstractQueue | None = None
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self._lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncAmqpClient(queue={self.queue!r}, {'closed' if self._closed else 'open' if self._channel else 'unopened'})"

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; requests still waiting fail with ``Unavailable``-like ServerError."""
        self._closed = True
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ServerError("the client was closed before the reply came"))
        self._waiting.clear()
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            await connection.close()

    async def _open(self) -> AbstractRobustChannel:
        if self._closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        async with self._lock:
            if self._channel is None:
                try:
                    import aio_pika
                except ImportError:  # pragma: no cover (a dependency of genserve)
                    raise RuntimeError("AmqpClient needs aio-pika: pip install aio-pika") from None
                self._connection = await aio_pika.connect_robust(self.url)
                # no publisher confirms: a request the broker lost ends at its deadline anyway, and a
                # confirm per request is a round trip
                channel = await self._connection.channel(publisher_confirms=False)
                # the request queue as the servers declare it: a request published before any server started waits in it
                await channel.declare_queue(dead_letter_queue(self.queue), durable=True)
                await channel.declare_queue(self.queue, durable=True, arguments=queue_arguments(self.queue))
                self._replies = await channel.declare_queue(exclusive=True, auto_delete=True)
                await self._replies.consume(self._on_reply, no_ack=True)
                self._channel = channel
            return self._channel

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        correlation_id = message.correlation_id or ""
        future = self._waiting.pop(correlation_id, None)
        if future is not None and not future.done():
            future.set_result(message.body)
            return
        # its caller stopped waiting: the future is cancelled at once, the id is remembered when the
        # caller's task next runs, and the reply can come in between
        if (future is not None and future.cancelled()) or self._abandoned.get(correlation_id) is False:
            self.late += 1
            self._remember(correlation_id, replied=True)  # a reply after this one is a duplicate
        else:  # a redelivered request's second reply
            self.duplicates += 1

    def _remember(self, correlation_id: str, *, replied: bool) -> None:
        """Note a request given up on (``replied``: its late reply came), forgetting the oldest past the bound."""
        self._abandoned[correlation_id] = replied or self._abandoned.get(correlation_id, False)
        if len(self._abandoned) > REMEMBER_ABANDONED:
            self._abandoned.popitem(last=False)

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def call(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> pb.StreamResponse:
        """Send one request; its reply: the chunks and the ``Finish``, all with the correlation id."""
        channel = await self._open()
        assert self._replies is not None
        import aio_pika

        timeout = self._deadline(timeout)
        correlation_id = uuid.uuid4().hex
        headers: dict[str, Any] = {}
        if timeout is not None:
            request = _with_timeout(request, timeout)
            headers[DEADLINE_HEADER] = int((time.time() + timeout) * 1000)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        message = aio_pika.Message(
            request.SerializeToString(),
            content_type=CONTENT_TYPE,
            correlation_id=correlation_id,
            reply_to=self._replies.name,
            expiration=timeout,
            headers=headers,
            type="genserve.v1.GenerateRequest",
        )
        try:
            await channel.default_exchange.publish(message, routing_key=self.queue)
            async with asyncio.timeout(timeout):
                body = await future
        except TimeoutError:
            raise DeadlineExceeded(f"no reply within {timeout:g} s", request_id=correlation_id) from None
        finally:
            # given up on (a timeout or a cancelled task cancels the future too): a reply that still comes is late
            if future.cancelled() or not future.done():
                self._remember(correlation_id, replied=False)
            self._waiting.pop(correlation_id, None)
        return pb.StreamResponse.FromString(body)

    async def result(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> ImageResult | TextResult:
        """Send one request; its assembled result, or the SDK's exception for its status."""
        response = await self.call(request, timeout=timeout)
        assembler: ImageAssembler | TextAssembler = ImageAssembler(request.image.n) if request.HasField("image") else TextAssembler()
        for r in response.results:
            which = r.WhichOneof("payload")
            if which == "finish":
                if r.finish.code != 0:
                    raise from_status(r.finish.code, r.finish.message, request_id=r.id)
                return assembler.result(r.finish, r.id)
            if which == "images" and isinstance(assembler, ImageAssembler):
                assembler.add(r.images)
            elif which == "text" and isinstance(assembler, TextAssembler):
                assembler.add(r.text)
        raise ServerError("the reply has no finish")

    async def generate_images(
        self, model: str, n: int, *, timeout: float | None = None, **options: Unpack[ImageOptions]
    ) -> npt.NDArray[np.uint8]:
        """``n`` samples of an image model as a (n, 28, 28) uint8 array (as ``AsyncClient.generate_images``)."""
        result = await self.result(image_request(model, n, **options), timeout=timeout)
        assert isinstance(result, ImageResult)
        return result.images

    async def generate_text(self, model: str, prompt: str, *, timeout: float | None = None, **options: Unpack[TextOptions]) -> str:
        """The text generated after ``prompt`` (as ``AsyncClient.generate_text``)."""
        request = text_request(model, prompt, **options)
        result = await self.result(request, timeout=timeout)
        assert isinstance(result, TextResult)
        return result.text


def _with_timeout(request: pb.GenerateRequest, timeout: float) -> pb.GenerateRequest:
    ms = min(UINT32_MAX, max(1, int(timeout * 1000)))  # timeout_ms is a uint32 (49 days)
    if request.timeout_ms and request.timeout_ms <= ms:
        return request
    copy = pb.GenerateRequest()
    copy.CopyFrom(request)
    copy.timeout_ms = ms
    return copy


class AmqpClient:
    """The blocking ``AsyncAmqpClient``: the same arguments and methods, driven on a private loop thread.

    >>> with AmqpClient() as client:
    ...     text = client.generate_text("transformer", "ROMEO:", max_new_tokens=50)
    """

    def __init__(self, url: str = DEFAULT_URL, *, queue: str = DEFAULT_QUEUE, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self._async = AsyncAmqpClient(url, queue=queue, timeout=timeout)
        self._portal = _Portal()

    def __repr__(self) -> str:
        return repr(self._async).replace("AsyncAmqpClient", "AmqpClient", 1)

    @property
    def duplicates(self) -> int:
        return self._async.duplicates

    @property
    def late(self) -> int:
        return self._async.late

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._portal.started:
            self._portal.run(self._async.aclose())
            self._portal.stop()

    def call(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> pb.StreamResponse:
        return self._portal.run(self._async.call(request, timeout=timeout))

    def result(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> ImageResult | TextResult:
        return self._portal.run(self._async.result(request, timeout=timeout))

    def generate_images(
        self, model: str, n: int, *, timeout: float | None = None, **options: Unpack[ImageOptions]
    ) -> npt.NDArray[np.uint8]:
        return self._portal.run(self._async.generate_images(model, n, timeout=timeout, **options))

    def generate_text(self, model: str, prompt: str, *, timeout: float | None = None, **options: Unpack[TextOptions]) -> str:
        """Keyword options as ``AsyncAmqpClient.generate_text``."""
        return self._portal.run(self._async.generate_text(model, prompt, timeout=timeout, **options))
