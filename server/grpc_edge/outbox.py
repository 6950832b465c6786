"""Where a job's results go (its ``Recipient``): the queue of one ``Generate`` call, or the outbox of
one ``GenerateStream``, which coalesces results into messages and gives credits back."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from engine import ImageResult, TokenEvent
from genserve.v1 import generator_pb2 as pb
from server.pipeline.jobs import Job, Outcome
from server.wire import append_token, chunk_message, fill_chunk, fill_finish, payload_size

MAX_RESULTS_PER_MESSAGE = 1024  # results coalesced into one StreamResponse
MAX_BYTES_PER_MESSAGE = 1 << 20  # ... and at most this many payload bytes (a quarter of grpc's default receive limit)
MESSAGE_OVERHEAD = 64  # bytes of framing per result, on top of its payload


class CallQueue:
    """The queue of one Generate call: chunks and the outcome, in order, for the handler to yield.

    A deque and a future made only when the handler has to wait, not an asyncio.Queue: every call
    makes one, and this is cheaper to make, fill and read. Only the event loop's thread puts (the
    router, the text feeder's routing callback, the deadline sweep); one handler reads.

    Text tokens join the text chunk at the end of the queue while the handler has not taken it (the
    protocol's ``Text`` carries "the new characters", its ids, the count so far). The first token
    goes at once; after it, a chunk goes once it holds ``stream_interval`` tokens, or when the
    outcome comes behind it (the last chunk: what is left). With ``stream_interval`` 1 that is a
    message a token unless the handler is behind. More trades smoothness for tokens/s: each message
    costs the event loop (grpc.aio) time the decode thread could use (docs/serving.md, "Text
    messages under load").
    """

    __slots__ = ("__weakref__", "_chunk_from", "_items", "_open_ready", "_open_text", "_waiter", "stream_interval")  # weakref: tests

    def __init__(self, stream_interval: int = 1) -> None:
        self._items: collections.deque[pb.GenerateResponse | Outcome] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._open_text: pb.Text | None = None  # the text chunk at the end of the queue, while the handler has not taken it
        self._chunk_from = 0  # n_generated of the open chunk's first token (0: no text sent yet)
        self._open_ready = False  # the open chunk may go: the call's first, or ``stream_interval`` tokens
        self.stream_interval = stream_interval

    def _put(self, item: pb.GenerateResponse | Outcome) -> None:
        self._open_text = None
        self._items.append(item)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # cancelled with its handler: nobody is waiting any more
                waiter.set_result(None)

    async def get(self) -> pb.GenerateResponse | Outcome:
        """The next item, waiting for it."""
        while not self._items or (self._open_text is not None and not self._open_ready and len(self._items) == 1):
            self._waiter = asyncio.get_running_loop().create_future()  # nothing, or a text chunk short of the interval
            await self._waiter
        item = self._items.popleft()
        if not self._items:
            self._open_text = None  # the handler has it now: it is not to change any more
        return item

    def emit(self, job: Job, item: ImageResult | TokenEvent) -> None:
        if not isinstance(item, TokenEvent):
            self._put(chunk_message(job.id, item))
            return
        first = not self._chunk_from  # the call's first text: never held back
        if self._open_text is None:
            message = chunk_message(job.id, item)
            self._items.append(message)
            self._open_text, self._chunk_from, self._open_ready = message.text, item.n_generated, False
        else:
            append_token(self._open_text, item)
        if first or item.n_generated - self._chunk_from + 1 >= self.stream_interval:
            self._open_ready = True
            self._wake()

    def finish(self, job: Job, outcome: Outcome) -> None:
        self._put(outcome)


class StreamOutbox:
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
