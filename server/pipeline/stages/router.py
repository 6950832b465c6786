"""The router: finished image pieces to their callers; a job completes with its last sample."""

from __future__ import annotations

from collections.abc import Iterable

import anyio
from anyio.abc import TaskStatus

from server.pipeline.jobs import COMPLETE, Job
from server.pipeline.links import Link
from server.pipeline.stages.base import ImageDone, Stage


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
            self._deliver()  # a method: its locals (the last result's pixels) end with it, not at the next take
            self.items = []

    def _deliver(self) -> None:
        for done in self.items:
            job = done.job
            if job.done:
                continue
            job.emit(done.result)
            job.sent += done.result.pixels.shape[0]
            if job.image is not None and job.sent >= job.image.n:
                job.finish(COMPLETE)
