"""The RabbitMQ ingress: a second producer beside gRPC (the seed's Broadway producer), on aio-pika.

    request queue --(prefetch)--> AmqpIngress --admit--> pipeline --finish--> reply to reply_to --> ack
         '--(rejected, expired)--> <queue>.dead

The wire format is in proto/genserve/v1/generator.proto (section "AMQP"), the shared names in
genserve/v1/amqp.py. What it promises, and why:

- Demand reaches the broker: ``basic_qos(prefetch_count)`` is what the pipeline has room for
  (``min(max_inflight, queue_size)``: one link's worth, so a server never sits on more
  unacknowledged requests than it can start on, and several servers share a queue's backlog).
- A request is acknowledged only after its reply is published (on the same channel, so the
  broker has the reply before it sees the ack). If the server dies first, the broker redelivers
  the request to another consumer: at-least-once, and a client may see a reply twice (the SDK
  drops the second by correlation id).
- A refused or failed request gets an error reply (its ``Finish`` carries the code). A server that
  is full or draining (RESOURCE_EXHAUSTED, UNAVAILABLE) puts the request back for another server,
  once: a request that was already redelivered gets the error instead, so a request that crashes
  servers cannot circle forever.
- A message that does not parse, or lacks ``reply_to`` or ``correlation_id``, is rejected without
  requeue: the queue dead-letters it to ``<queue>.dead``, as the broker does with a message whose
  per-message TTL (``expiration``) passed while it waited. Neither is served late or looped.
- ``connect_robust`` reconnects (every RECONNECT_S) and restores the channel, its prefetch and the
  consumer; gRPC serves meanwhile, and health's "genserve.amqp" (and "") says whether we consume.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel, AbstractRobustConnection
from prometheus_client import Gauge
from yarl import URL

from engine import ImageResult, TokenEvent
from engine.logs import get_logger
from genserve.v1 import generator_pb2 as pb
from genserve.v1.amqp import CONTENT_TYPE, DEADLINE_HEADER, dead_letter_queue, queue_arguments
from server.config import ServerConfig
from server.metrics import Metrics
from server.pipeline.core import Pipeline
from server.pipeline.jobs import Job, Outcome, Rpc
from server.pipeline.statuses import RETRYABLE, Code, Refused
from server.wire import fill_chunk, fill_finish

log = get_logger("server.amqp_ingress")

RPC = Rpc.AMQP  # the rpc label of AMQP requests in metrics and logs
RECONNECT_S = 1.0  # between reconnection attempts; aio-pika's default is 5 s
REQUEUE_DELAY_S = 0.05  # a full server holds a refused request this long before putting it back (no hot loop)
MAX_PREFETCH = 65535  # AMQP's prefetch-count is a short
MAX_CORRELATION_ID = 255  # an AMQP short string
CLOSE_S = 5.0  # on close, how long the last replies may take to publish


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


async def declare_queues(channel: Any, queue: str) -> AbstractQueue:
    """The request queue and its dead-letter queue (durable: they outlive servers and clients)."""
    await channel.declare_queue(dead_letter_queue(queue), durable=True)
    declared: AbstractQueue = await channel.declare_queue(queue, durable=True, arguments=queue_arguments(queue))
    return declared


class AmqpReply:
    """The sink of one AMQP request: its chunks and its Finish, gathered into one StreamResponse."""

    __slots__ = ("id", "ingress", "message", "response")

    def __init__(self, ingress: AmqpIngress, message: AbstractIncomingMessage, correlation_id: str) -> None:
        self.ingress = ingress
        self.message = message
        self.id = correlation_id
        self.response = pb.StreamResponse()

    def emit(self, job: Job, item: ImageResult | TokenEvent) -> None:
        results = self.response.results
        if isinstance(item, TokenEvent) and results and results[-1].WhichOneof("payload") == "text":
            text = results[-1].text  # one Text for the whole answer: a message per token would only cost
            text.text += item.text
            if item.token_id is not None:
                text.token_ids.append(item.token_id)
            text.n_generated = item.n_generated
            return
        fill_chunk(results.add(id=self.id), item)

    def finish(self, job: Job, outcome: Outcome) -> None:
        self.ingress.settle(self, job, outcome)


class AmqpIngress:
    def __init__(self, config: ServerConfig, pipeline: Pipeline, metrics: Metrics) -> None:
        self.url = config.amqp_url
        self.queue_name = config.amqp_queue
        self.prefetch = min(config.max_inflight, config.queue_size, MAX_PREFETCH)
        self.pipeline = pipeline
        self.metrics = metrics
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractRobustChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._consuming = False
        self._linked = False  # the connection is up (close and reconnect callbacks keep it)
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        Gauge("genserve_amqp_up", "1 while the AMQP ingress consumes its queue", registry=metrics.registry).set_function(
            lambda: 1 if self.up else 0
        )

    @property
    def up(self) -> bool:
        channel = self.channel
        return self._consuming and self._linked and channel is not None and not channel.is_closed

    async def start(self) -> None:
        """Connect in the background: gRPC serves while the broker is away, readiness says so."""
        self._task = asyncio.create_task(self._connect(), name="amqp-ingress")

    async def _connect(self) -> None:
        log.info("amqp_connecting", url=redact(self.url), queue=self.queue_name, prefetch=self.prefetch)
        try:
            name: dict[str, Any] = {"connection_name": f"genserve {self.queue_name}"}
            connection = await aio_pika.connect_robust(self.url, fail_fast=False, reconnect_interval=RECONNECT_S, client_properties=name)
            self.connection = connection
            connection.close_callbacks.add(self._on_lost)
            connection.reconnect_callbacks.add(self._on_back)
            self._linked = True
            # No publisher confirms: a reply and then its request's ack go out on this one channel,
            # which the broker handles in order, so the ack cannot overtake the reply; a confirm
            # per reply would be one more round trip for no further guarantee.
            channel = self.channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=self.prefetch)
            self._queue = await declare_queues(channel, self.queue_name)
            self._consumer_tag = await self._queue.consume(self._on_message)
            self._consuming = True
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("amqp_failed", url=redact(self.url), error=f"{type(e).__name__}: {e}", hint="gRPC keeps serving; fix and restart")
            return
        log.info("amqp_consuming", queue=self.queue_name, dead_letters=dead_letter_queue(self.queue_name))

    def _on_lost(self, *args: Any) -> None:
        if self._linked and self._consuming:
            log.warning("amqp_connection_lost", reason=str(args[-1]) if args else "", action=f"reconnecting every {RECONNECT_S:g} s")
        self._linked = False

    def _on_back(self, *args: Any) -> None:
        self._linked = True
        self.reconnects += 1
        log.info("amqp_reconnected", queue=self.queue_name)

    # -- requests --------------------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if not self._consuming:  # draining: back to the queue, for another server
            await message.nack(requeue=True)
            return
        parsed = self._parse(message)
        if isinstance(parsed, str):
            log.warning("amqp_dead_lettered", reason=parsed, queue=dead_letter_queue(self.queue_name), message_id=message.message_id)
            self.metrics.rejections.labels(RPC, "INVALID_ARGUMENT").inc()
            await message.reject(requeue=False)
            return
        request, correlation_id = parsed
        reply = AmqpReply(self, message, correlation_id)
        budget = request.timeout_ms / 1000 if request.timeout_ms else None
        deadline = (message.headers or {}).get(DEADLINE_HEADER)
        if isinstance(deadline, int) and not isinstance(deadline, bool):
            left = deadline / 1000 - time.time()
            budget = left if budget is None else min(budget, left)
        try:
            if budget is not None and budget <= 0:
                raise Refused(Code.DEADLINE_EXCEEDED, "deadline passed before the request was taken from the queue")
            job = self.pipeline.jobs.build(request, RPC, correlation_id, reply)
            self.pipeline.admit(job, budget)
        except Refused as e:
            self.metrics.rejections.labels(RPC, e.code.name).inc()
            if e.code in RETRYABLE and not message.redelivered:
                await asyncio.sleep(REQUEUE_DELAY_S)
                await message.nack(requeue=True)
                return
            self.settle(reply, None, Outcome.error(e.code, e.message))

    def _parse(self, message: AbstractIncomingMessage) -> tuple[pb.GenerateRequest, str] | str:
        """The request and its correlation id, or why the message is dead-lettered."""
        if not message.reply_to:
            return "no reply_to: nowhere to send the reply"
        correlation_id = message.correlation_id
        if not correlation_id:
            return "no correlation_id: the reply could not be matched to its request"
        if len(correlation_id) > MAX_CORRELATION_ID:
            return f"correlation_id has {len(correlation_id)} characters; the limit is {MAX_CORRELATION_ID}"
        if message.content_type and message.content_type != CONTENT_TYPE:
            return f"content_type {message.content_type[:60]!r}: expected {CONTENT_TYPE}"
        try:
            request = pb.GenerateRequest.FromString(message.body)
        except Exception as e:  # DecodeError, or a UnicodeDecodeError in a string field
            return f"body is not a genserve.v1.GenerateRequest: {type(e).__name__}: {e}"[:200]
        return request, correlation_id

    def settle(self, reply: AmqpReply, job: Job | None, outcome: Outcome) -> None:
        """A request's end: its reply published, then the request acknowledged (or put back)."""
        if outcome.code in RETRYABLE and not reply.message.redelivered:
            work = reply.message.nack(requeue=True)
        else:
            fill_finish(reply.response.results.add(id=reply.id).finish, job, outcome)
            work = self._reply(reply)
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # the connection went: the broker redelivers the request, and the client drops a second reply
            log.warning("amqp_settle_failed", error=f"{type(task.exception()).__name__}: {task.exception()}")

    async def _reply(self, reply: AmqpReply) -> None:
        channel = self.channel
        assert channel is not None, "a message came without a channel"
        message = aio_pika.Message(
            reply.response.SerializeToString(), correlation_id=reply.id, content_type=CONTENT_TYPE, type="genserve.v1.StreamResponse"
        )
        await channel.default_exchange.publish(message, routing_key=reply.message.reply_to or "", mandatory=False)  # a gone client: drop
        await reply.message.ack()

    # -- drain -------------------------------------------------------------------------------------

    async def stop_consuming(self) -> None:
        """Take no more requests; those the broker sends meanwhile go back to the queue."""
        self._consuming = False
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):  # a lost connection has no consumer to cancel
                await self._queue.cancel(self._consumer_tag)

    async def close(self) -> None:
        """After the drain: publish the last replies, then close the connection."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=CLOSE_S)
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()
