"""A feeder: one model's stepped batch (a text model's decode batch, an iterative image model's step
batch) fed with new requests, and its events (tokens; previews and final samples) routed back."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from engine import Engine, ModelRegistry, StepEvent, TokenEvent
from engine.errors import EngineError, InvalidRequestError, ModelNotFound, QueueFullError
from server.pipeline.jobs import COMPLETE, Job, Outcome
from server.pipeline.links import Link
from server.pipeline.stages.base import Stage
from server.pipeline.stages.names import ModelStage
from server.pipeline.statuses import Code, status_of

_REASONS = {"length": "length", "stop": "stop"}


class Feeder(Stage):
    """Feeds one model's stepped batch (continuous batching, on an engine thread) with new requests,
    taking only as many as it has room for (``Engine.room``), and routes each event back: a text
    model's tokens, an iterative model's previews and final samples.

    Events come from the decode thread; they are queued here and routed on the event loop in one
    callback per burst, not one per event. Routing lives in the feeder object, not its task, so
    requests keep streaming while a crashed feeder restarts.
    """

    def __init__(
        self, model: str, stage: ModelStage, inbox: Link[Job], engine: Engine, registry: ModelRegistry, *, max_pending: int
    ) -> None:
        super().__init__(stage.stage_name(model))
        self.kind = stage.value
        self.model = model
        self.inbox = inbox
        self.engine = engine
        self.registry = registry
        self.max_pending = max_pending
        self._events: collections.deque[tuple[Job, TokenEvent | StepEvent | BaseException]] = collections.deque()
        self._starting: dict[Job, None] = {}  # submitted, no event yet (oldest first): what ``start_wait`` reads
        self._scheduled = False
        self._room = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._loop = asyncio.get_running_loop()
        task_status.started()
        while True:
            await self._wait_for_room()
            self.held = await self.inbox.take(self._room_left())
            self._submit_held()  # a method: its `job` local ends with it, not at the next take
            self.held = []

    def _submit_held(self) -> None:
        for job in self.held:
            if not job.done:
                self._submit(job)

    def _room_left(self) -> int:
        try:
            served = self.registry.get(self.model)
        except ModelNotFound:
            return 1
        return self.engine.room(served, self.max_pending)  # 0 while a failed decode thread is replaced

    async def _wait_for_room(self) -> None:
        while self._room_left() <= 0:
            self._room.clear()
            try:
                async with asyncio.timeout(0.05):  # room also appears when sequences start decoding
                    await self._room.wait()
            except TimeoutError:
                pass

    def _submit(self, job: Job) -> None:
        request = job.text if job.text is not None else job.image
        assert request is not None
        try:
            job.ticket = self.engine.submit(job.served, request, self._on_event(job))
        except (InvalidRequestError, QueueFullError, EngineError) as e:
            job.fail(*status_of(e))
            return
        job.seed = job.ticket.seed
        self._starting[job] = None
        if job.done:  # it ended (deadline, client gone) between take and submit
            job.ticket.cancel()

    def _on_event(self, job: Job) -> Callable[[TokenEvent | StepEvent | BaseException], None]:
        def on_event(event: TokenEvent | StepEvent | BaseException) -> None:  # on the decode thread
            self._events.append((job, event))
            if not self._scheduled:
                self._scheduled = True
                loop = self._loop
                if loop is not None:
                    with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening any more
                        loop.call_soon_threadsafe(self._route)

        return on_event

    def _route(self) -> None:
        self._scheduled = False
        events = self._events
        starting = self._starting
        while events:
            job, event = events.popleft()
            starting.pop(job, None)  # its first event: a token, a preview, an ending
            if isinstance(event, BaseException):
                job.fail(*status_of(event))  # the engine's EngineError, or what it was given
                self._room.set()
                continue
            if isinstance(event, StepEvent):
                self._route_images(job, event)
                continue
            if event.text:  # empty while a stop string is undecided
                job.sent = event.n_generated
                job.emit(event)
            if event.finish_reason is not None:
                self._room.set()
                reason = _REASONS.get(event.finish_reason)
                if reason == "length":
                    job.finish(Outcome(reason="length"))
                elif reason == "stop":
                    job.finish(Outcome(reason="stop"))
                else:
                    job.fail(Code.CANCELLED, "cancelled")

    def start_wait(self, now: float) -> float:
        """Seconds the oldest request still without its first event (a token, a preview) has waited since
        it was admitted, here or in this feeder's inbox; 0 when none waits. Admission refuses new text
        while it is over ``--text-wait-ms`` (server/pipeline/core.py)."""
        starting = self._starting
        while starting:
            job = next(iter(starting))
            if not job.done:
                return now - job.created
            del starting[job]  # ended without an event reaching it (its cancel event will find nothing)
        queued = self.inbox.oldest()
        return now - queued.created if queued is not None else 0.0

    def _route_images(self, job: Job, event: StepEvent) -> None:
        """An iterative model's event: a preview, the final samples (the job completes), or its cancellation."""
        result = event.result
        if result is None:
            self._room.set()
            job.fail(Code.CANCELLED, "cancelled")
            return
        job.emit(result)
        if event.finished:
            self._room.set()
            job.sent = len(result.pixels)
            job.finish(COMPLETE)
