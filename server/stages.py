"""The pipeline's stages: producer -> processors -> batchers (images) / text feeders -> router.

Each stage is a long-running task that takes work from its input link only by asking for it
(``Link.take(demand)``) and hands it on through a bounded link, so a slow stage holds back the
ones before it, and in the end the ingress, which then refuses new requests (RESOURCE_EXHAUSTED).

User-level errors (a bad request) become the job's status; they never raise out of a stage. A
stage that does fail (a bug, an injected fault, a cancelled task) is restarted by the supervisor,
which first fails the jobs in ``holding()`` with UNAVAILABLE: nothing a stage held is lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import anyio
import grpc
from anyio.abc import TaskStatus

from engine.decode import TokenEvent
from engine.engine import Engine, generation_failed
from engine.errors import EngineError, InvalidImageRequest, InvalidRequestError, ModelNotFound, QueueFullError
from engine.images import ImageChunk, ImageResult
from engine.logs import get_logger
from engine.registry import ModelRegistry
from server.jobs import Job, Outcome
from server.links import Link
from server.statuses import status_of

log = get_logger("server.stages")

PROCESSOR_DEMAND = 64  # jobs a processor asks for at once: amortises the hand-off, keeps latency low


@dataclass(frozen=True, slots=True)
class ImageWork:
    """One piece of an image job, at most a batch in size."""

    job: Job
    chunk: ImageChunk


@dataclass(frozen=True, slots=True)
class ImageDone:
    job: Job
    result: ImageResult


class Stage:
    """A supervised stage: ``run`` loops until cancelled; ``holding`` names the jobs it holds."""

    kind = "stage"

    def __init__(self, name: str) -> None:
        self.name = name
        self.held: list[Job] = []

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    def holding(self) -> Iterable[Job]:
        return self.held

    def release(self) -> list[Job]:
        """Forget what the stage held (the supervisor fails it) before a restart."""
        jobs = [j for j in self.holding() if not j.done]
        self.held = []
        return jobs


class Producer(Stage):
    """Moves admitted jobs from the ingress to the processors, dropping those that ended meanwhile."""

    kind = "producer"

    def __init__(self, ingress: Link[Job], out: Link[Job]) -> None:
        super().__init__("producer")
        self.ingress = ingress
        self.out = out

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self.held = await self.ingress.take(PROCESSOR_DEMAND)
            while self.held:
                job = self.held[0]
                if not job.done:
                    await self.out.put(job)
                self.held.pop(0)


class Processor(Stage):
    """Prepares inputs: draws each image request's latents from its seed, splits big requests."""

    kind = "processor"

    def __init__(
        self,
        index: int,
        inbox: Link[Job],
        image_links: dict[str, Link[ImageWork]],
        text_links: dict[str, Link[Job]],
        *,
        max_chunk: int,
    ) -> None:
        super().__init__(f"processor-{index}")
        self.max_chunk = max_chunk  # the batch size: a bigger request is split into pieces of at most this
        self.inbox = inbox
        self.image_links = image_links
        self.text_links = text_links
        self.pending: collections.deque[tuple[Link[ImageWork], ImageWork]] = collections.deque()

    def holding(self) -> Iterable[Job]:
        return [*self.held, *(w.job for _, w in self.pending)]

    def release(self) -> list[Job]:
        jobs = super().release()
        self.pending.clear()
        return jobs

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self.held = await self.inbox.take(PROCESSOR_DEMAND)
            while self.held:
                job = self.held[0]
                if not job.done:
                    await self._process(job)
                self.held.pop(0)

    async def _process(self, job: Job) -> None:
        name = job.served.name
        if job.image is not None:
            link = self.image_links.get(name)
            images = job.served.images
            if link is None or images is None:
                job.fail(grpc.StatusCode.UNAVAILABLE, f"model {name!r} is not being served")
                return
            try:
                whole = images.prepare(job.image)
            except InvalidImageRequest as e:
                job.fail(*status_of(e))
                return
            job.seed = whole.seed
            size = min(images.limits.max_batch, self.max_chunk)
            pieces = whole.split(size) if whole.n > size else [whole]
            job.chunks = pieces
            self.pending.extend((link, ImageWork(job, c)) for c in pieces)
            while self.pending:  # a restart fails the job, so no piece is left behind unnoticed
                target, work = self.pending[0]
                await target.put(work)
                self.pending.popleft()
        else:
            text_link = self.text_links.get(name)
            if text_link is None:
                job.fail(grpc.StatusCode.UNAVAILABLE, f"model {name!r} is not being served")
                return
            await text_link.put(job)


class Batcher(Stage):
    """Collects one model's image work into batches: a batch closes at ``batch_size`` samples, or
    ``batch_timeout`` seconds after its first piece; up to ``concurrency`` batches run at once, so
    the next batch fills while one computes."""

    kind = "batcher"

    def __init__(
        self,
        model: str,
        inbox: Link[ImageWork],
        out: Link[ImageDone],
        engine: Engine,
        *,
        batch_size: int,
        batch_timeout: float,
        concurrency: int,
        observe_batch: Callable[[str, int, float], None] = lambda model, n, seconds: None,
    ) -> None:
        super().__init__(f"batcher-{model}")
        self.model = model
        self.inbox = inbox
        self.out = out
        self.engine = engine
        self.batch_size = batch_size
        self.batch_timeout = batch_timeout
        self.concurrency = concurrency
        self.observe_batch = observe_batch
        self.pending: list[ImageWork] = []  # the batch being filled
        self.carry: list[ImageWork] = []  # taken, but did not fit: opens the next batch
        self.running: dict[int, list[ImageWork]] = {}
        self._batch_ids = 0

    def holding(self) -> Iterable[Job]:
        batches = [self.pending, self.carry, *self.running.values()]
        return [w.job for batch in batches for w in batch]

    def release(self) -> list[Job]:
        jobs = super().release()
        self.pending, self.carry, self.running = [], [], {}
        return jobs

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        async with anyio.create_task_group() as tg:
            task_status.started()
            while True:
                await self._fill()
                await slots.acquire()  # every slot busy: stop taking, and let the link fill up
                batch, self.pending = self.pending, []
                self._batch_ids += 1
                self.running[self._batch_ids] = batch
                tg.start_soon(self._run_batch, self._batch_ids, batch, slots)

    def _add(self, items: list[ImageWork], size: int) -> int:
        for i, work in enumerate(items):
            if size + work.chunk.n > self.batch_size and self.pending:  # does not fit: it and the rest open the next batch
                self.carry.extend(items[i:])
                return size
            self.pending.append(work)
            size += work.chunk.n
        return size

    async def _fill(self) -> None:
        """Fill ``pending`` until it is full or its timeout, counted from its first piece, passes."""
        loop = asyncio.get_running_loop()
        carry, self.carry = self.carry, []
        size = self._add(carry, 0)
        if not self.pending:
            self.pending = await self.inbox.take(1)
            size = self.pending[0].chunk.n
        deadline = loop.time() + self.batch_timeout
        while size < self.batch_size and not self.carry:
            more = self.inbox.take_nowait(self.batch_size - size)
            if not more:
                try:
                    async with asyncio.timeout_at(deadline):
                        more = await self.inbox.take(self.batch_size - size)
                except TimeoutError:
                    return
            size = self._add(more, size)

    async def _run_batch(self, batch_id: int, batch: list[ImageWork], slots: asyncio.Semaphore) -> None:
        try:
            live = [w for w in batch if not w.job.done]  # cancelled or expired while queued: no model time
            groups: dict[int, list[ImageWork]] = {}
            for w in live:  # after a hot swap a batch can hold two versions: one forward pass each
                groups.setdefault(id(w.job.served), []).append(w)
            for group in groups.values():
                await self._run_group(group)
        except BaseException:
            slots.release()
            raise  # the batch stays in `running`, so the supervisor fails its jobs (UNAVAILABLE)
        self.running.pop(batch_id, None)
        slots.release()

    async def _run_group(self, group: list[ImageWork]) -> None:
        served = group[0].job.served
        started = time.perf_counter()
        try:
            results = await self.engine.generate_images(served, [w.chunk for w in group])
        except (EngineError, ValueError) as e:  # ValueError: a request the model cannot take (admission checks first)
            status = status_of(e)
            for w in group:
                w.job.fail(*status)
            return
        self.observe_batch(self.model, sum(w.chunk.n for w in group), time.perf_counter() - started)
        for w, result in zip(group, results, strict=True):
            await self.out.put(ImageDone(w.job, result))


class Router(Stage):
    """Routes finished image pieces to their callers; a job completes when its last sample is sent."""

    kind = "router"

    def __init__(self, inbox: Link[ImageDone]) -> None:
        super().__init__("router")
        self.inbox = inbox
        self.items: list[ImageDone] = []

    def holding(self) -> Iterable[Job]:
        return [d.job for d in self.items]

    def release(self) -> list[Job]:
        jobs = super().release()
        self.items = []
        return jobs

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self.items = await self.inbox.take(256)
            for done in self.items:
                job = done.job
                if job.done:
                    continue
                job.emit(done.result)
                job.sent += done.result.pixels.shape[0]
                if job.image is not None and job.sent >= job.image.n:
                    job.finish(Outcome())
            self.items = []


_REASONS = {"length": "length", "stop": "stop"}


class TextFeeder(Stage):
    """Feeds one text model's decode loop (continuous batching, on an engine thread) with new
    sequences, taking only as many as the loop has room for, and routes each token back.

    Tokens come from the decode thread; they are queued here and routed on the event loop in one
    callback per burst, not one per token. Routing lives in the feeder object, not its task, so
    sequences keep streaming while a crashed feeder restarts.
    """

    kind = "text"

    def __init__(self, model: str, inbox: Link[Job], engine: Engine, registry: ModelRegistry, *, max_pending: int) -> None:
        super().__init__(f"text-{model}")
        self.model = model
        self.inbox = inbox
        self.engine = engine
        self.registry = registry
        self.max_pending = max_pending
        self._events: collections.deque[tuple[Job, TokenEvent | BaseException]] = collections.deque()
        self._scheduled = False
        self._room = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._loop = asyncio.get_running_loop()
        task_status.started()
        while True:
            await self._wait_for_room()
            self.held = await self.inbox.take(self._room_left())
            for job in self.held:
                if not job.done:
                    self._submit(job)
            self.held = []

    def _room_left(self) -> int:
        try:
            served = self.registry.get(self.model)
        except ModelNotFound:
            return 1
        worker = self.engine.text_worker(served)
        return max(0, self.max_pending - worker.loop.pending_count)

    async def _wait_for_room(self) -> None:
        while self._room_left() <= 0:
            self._room.clear()
            try:
                async with asyncio.timeout(0.05):  # room also appears when sequences start decoding
                    await self._room.wait()
            except TimeoutError:
                pass

    def _submit(self, job: Job) -> None:
        assert job.text is not None
        try:
            job.worker, job.handle = self.engine.submit_text(job.served, job.text, self._on_event(job))
        except (InvalidRequestError, QueueFullError, EngineError) as e:
            job.fail(*status_of(e))
            return
        job.seed = job.handle.seed
        if job.done:  # it ended (deadline, client gone) between take and submit
            job.worker.cancel(job.handle)

    def _on_event(self, job: Job) -> Callable[[TokenEvent | BaseException], None]:
        def on_event(event: TokenEvent | BaseException) -> None:  # on the decode thread
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
        while events:
            job, event = events.popleft()
            if isinstance(event, BaseException):
                job.fail(*status_of(generation_failed(job.served, event)))
                self._room.set()
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
                    job.fail(grpc.StatusCode.CANCELLED, "cancelled")
