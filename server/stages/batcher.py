"""The batcher: one image model's work into batches (size or timeout), a few running at once."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable, Iterable

import anyio
from anyio.abc import TaskStatus

from engine.engine import Engine
from engine.errors import EngineError
from server.jobs import Job
from server.links import Link
from server.stages.base import ImageDone, ImageWork, Stage
from server.statuses import status_of


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
        """Fill ``pending`` until it is full or its timeout, counted from its first piece, passes."""
        loop = asyncio.get_running_loop()
        carry, self.carry = self.carry, []
        size = self._add(carry, 0)
        if not self.pending:
            self.pending = await self.inbox.take(1)
            size = self.pending[0].chunk.n
        # One timeout for the whole fill, not one per wait: pieces of one-image calls arrive one by
        # one, and a Timeout per arrival (its timer armed and cancelled) was 1.5% of the server's
        # samples under 64 Generate calls in flight (py-spy), of the 1.8% the whole fill took.
        # Link.take is cancellation-safe (nothing is lost when the timeout cancels it) and
        # ``_add`` does not wait, so a timeout can only end the fill between pieces.
        try:
            async with asyncio.timeout_at(loop.time() + self.batch_timeout):
                while size < self.batch_size and not self.carry:
                    more = self.inbox.take_nowait(self.batch_size - size) or await self.inbox.take(self.batch_size - size)
                    size = self._add(more, size)
        except TimeoutError:
            return

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
        for w, result in zip(group, results, strict=True):
            await self.out.put(ImageDone(w.job, result))
