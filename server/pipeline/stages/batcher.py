"""The batcher: one image model's work into batches (size or timeout), a few running at once.

Why the window closes early, stretches, and runs where it does: docs/design/batch-window.md
"""

from __future__ import annotations

import asyncio
import collections
import time
import traceback
from collections.abc import Callable, Iterable

import anyio
from anyio.abc import TaskStatus

from engine import Engine
from engine.errors import EngineError
from server.pipeline.jobs import Job
from server.pipeline.links import Link
from server.pipeline.stages.base import ImageDone, ImageWork, Stage
from server.pipeline.stages.names import ModelStage
from server.pipeline.statuses import status_of

# How far the batch window stretches while the event loop is saturated, and where stretching
# starts and ends (the loop thread's busy fraction). Under a saturated loop calls wait in grpc
# core, not in the pipeline, so only a longer window lets a batch gather more; a loop with time to
# spare keeps the configured window (docs/design/batch-window.md).
STRETCH_MAX = 4.0
BUSY_FROM = 0.75  # below: the configured window
BUSY_FULL = 0.95  # at and above: STRETCH_MAX times it
MIN_SPAN_S = 0.001  # the busy fraction is read over at least this much wall time


class BatchWindow:
    """The batch timeout in force: ``base_s`` while the event loop has time to spare, stretched up
    to ``STRETCH_MAX`` times as the loop thread's busy fraction (its CPU time over wall time since
    the last reading, smoothed) goes from ``BUSY_FROM`` to ``BUSY_FULL``. ``next`` must be called
    on the loop thread (``cpu`` is that thread's CPU clock)."""

    def __init__(
        self,
        base_s: float,
        *,
        cpu: Callable[[], float] = time.thread_time,
        wall: Callable[[], float] = time.perf_counter,
        stretch: float = STRETCH_MAX,
    ) -> None:
        self.base_s = base_s
        self.stretch = stretch
        self.cpu = cpu
        self.wall = wall
        self.busy = 0.0
        self._cpu, self._wall = cpu(), wall()
        self.current_s = base_s

    def next(self) -> float:
        """The window for the batch that opens now."""
        cpu, wall = self.cpu(), self.wall()
        span = wall - self._wall
        if span >= MIN_SPAN_S:
            sample = min(1.0, max(0.0, (cpu - self._cpu) / span))
            self.busy = 0.5 * self.busy + 0.5 * sample
            self._cpu, self._wall = cpu, wall
        over = min(1.0, max(0.0, (self.busy - BUSY_FROM) / (BUSY_FULL - BUSY_FROM)))
        self.current_s = self.base_s * (1.0 + (self.stretch - 1.0) * over)
        return self.current_s


class Batcher(Stage):
    """Collects one model's image work into batches: a batch closes at ``batch_size`` samples,
    ``batch_timeout`` seconds after its first piece (up to STRETCH_MAX times that while the event
    loop is saturated: ``BatchWindow``), or at once when no other request can join (``_alone``);
    up to ``concurrency`` batches run at once, so the next batch fills while one computes."""

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
        inflight: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(ModelStage.BATCHER.stage_name(model))
        self.model = model
        self.inbox = inbox
        self.out = out
        self.engine = engine
        self.batch_size = batch_size
        self.batch_timeout = batch_timeout
        self.window = BatchWindow(batch_timeout)  # the timeout in force: longer while the loop is saturated
        self.concurrency = concurrency
        self.observe_batch = observe_batch
        self.inflight = inflight  # unfinished requests in the whole pipeline (None: always wait out the window)
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
                self._batch_ids += 1
                self.running[self._batch_ids], self.pending = self.pending, []  # no local: it would keep the latents
                tg.start_soon(self._run_batch, self._batch_ids, slots)

    def _add(self, items: list[ImageWork], size: int) -> int:
        for i, work in enumerate(items):
            if size + work.chunk.n > self.batch_size and self.pending:  # does not fit: it and the rest open the next batch
                self.carry.extend(items[i:])
                return size
            self.pending.append(work)
            size += work.chunk.n
        return size

    async def _fill(self) -> None:
        """Fill ``pending`` until it is full or its timeout, counted from its first piece, passes;
        a batch still smaller than one of the model's tiles then waits on, up to the stretched
        window (``BatchWindow``), for a tile's worth: a smaller batch costs the model a whole tile
        anyway (engine/images.py), and one that holds a tile has nothing to gain by waiting."""
        loop = asyncio.get_running_loop()
        carry, self.carry = self.carry, []
        size = self._add(carry, 0)
        if not self.pending:
            self.pending = await self.inbox.take(1)
            size = self.pending[0].chunk.n
        if self._alone():  # nobody else to wait for: what is here already goes now
            self._add(self.inbox.take_nowait(self.batch_size - size), size)
            return
        start = loop.time()
        stretched = start + self.window.next()
        size = await self._fill_until(start + self.batch_timeout, self.batch_size, size)
        tile = self.engine.preferred_batch(self.pending[0].job.served)
        if size < min(tile, self.batch_size) and not self.carry and stretched > loop.time() and not self._alone():
            await self._fill_until(stretched, min(tile, self.batch_size), size)

    def _alone(self) -> bool:
        """Every unfinished request of the server is in this batch or in one that runs: no other can
        join it but one not yet sent, so waiting out the window is only latency. Asked as a batch
        opens and as each piece joins it: cheap while requests are elsewhere (two lengths and a
        sum), the set only when they may all be here."""
        if self.inflight is None:
            return False
        unfinished = self.inflight()
        batches = (self.pending, self.carry, *self.running.values())
        if unfinished > sum(len(batch) for batch in batches):  # more requests than pieces here: some are elsewhere
            return False
        return unfinished <= len({id(w.job) for batch in batches for w in batch})

    async def _fill_until(self, deadline: float, goal: int, size: int) -> int:
        """Add pieces to ``pending`` until it holds ``goal`` samples, a piece does not fit, or ``deadline``."""
        # One timeout for the whole fill, not one per wait: pieces of one-image calls arrive one by
        # one, and a timer armed and cancelled per arrival was most of the fill's cost.
        # Link.take is cancellation-safe (nothing is lost when the timeout cancels it) and
        # ``_add`` does not wait, so a timeout can only end the fill between pieces.
        try:
            async with asyncio.timeout_at(deadline):
                while size < goal and not self.carry:
                    more = self.inbox.take_nowait(goal - size) or await self.inbox.take(goal - size)
                    size = self._add(more, size)
                    if self._alone():
                        # The last of the server's unfinished requests has joined: the rest of the window
                        # would only be latency, which a closed loop of k clients paid every round.
                        break
        except TimeoutError:
            pass
        return size

    async def _run_batch(self, batch_id: int, slots: asyncio.Semaphore) -> None:
        # the batch is read from `running`, not passed in: this frame cannot be cleared (below) while it runs
        try:
            await self._run_groups(self.running[batch_id])
        except BaseException as e:
            slots.release()
            # The batch stays in `running`, so the supervisor fails its jobs (UNAVAILABLE). A killed
            # batch's CancelledError sits in a reference cycle (anyio's task_done keeps it in a local
            # of a frame in its own traceback), and the frames below this one hold the batch's
            # latents: clear their locals (the traceback still prints), so the latents go with the batch.
            traceback.clear_frames(e.__traceback__)
            raise
        self.running.pop(batch_id, None)
        slots.release()

    async def _run_groups(self, batch: list[ImageWork]) -> None:
        live = [w for w in batch if not w.job.done]  # cancelled or expired while queued: no model time
        groups: dict[int, list[ImageWork]] = {}
        for w in live:  # after a hot swap a batch can hold two versions: one forward pass each
            groups.setdefault(id(w.job.served), []).append(w)
        for group in groups.values():
            await self._run_group(group)

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
        await self.out.put_from(collections.deque(ImageDone(w.job, result) for w, result in zip(group, results, strict=True)))
