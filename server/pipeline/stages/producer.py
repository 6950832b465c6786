"""The producer: admitted jobs from the ingress to the processors, dropping those that ended meanwhile."""

from __future__ import annotations

import collections
from collections.abc import Iterable

import anyio
from anyio.abc import TaskStatus

from server.pipeline.jobs import Job
from server.pipeline.links import Link
from server.pipeline.stages.base import PROCESSOR_DEMAND, Stage
from server.pipeline.statuses import retryable


class Producer(Stage):
    """Moves admitted jobs from the ingress on, dropping those that ended meanwhile: image jobs to
    the processors, text jobs straight to their model's text feeder (they need no preparing)."""

    kind = "producer"

    def __init__(self, ingress: Link[Job], out: Link[Job], feeder_links: dict[str, Link[Job]] | None = None) -> None:
        super().__init__("producer")
        self.ingress = ingress
        self.out = out
        self.feeder_links = feeder_links or {}
        self.images: collections.deque[Job] = collections.deque()  # image jobs taken, not yet handed to the processors

    def holding(self) -> Iterable[Job]:
        return [*self.held, *self.images]

    def release(self) -> list[Job]:
        jobs = super().release()
        self.images.clear()
        return jobs

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self.held = await self.ingress.take(PROCESSOR_DEMAND)
            self._sort()
            while self.held:  # text jobs, one by one; no `job` local across the wait: it would keep the last job
                if not self.held[0].done:
                    await self._forward_text(self.held[0])
                self.held.pop(0)
            await self.out.put_from(self.images)

    def _sort(self) -> None:
        """Image jobs to ``images``, to go on as one group (``Link.put_from``); ``held`` keeps the text
        jobs. A method: its locals end with it, not across the waits that follow."""
        held = self.held
        self.images.extend(job for job in held if not job.done and job.served.images is not None)  # one-shot image jobs
        self.held = [job for job in held if job.served.images is None]  # text and iterative jobs: to their feeders

    async def _forward_text(self, job: Job) -> None:
        link = self.feeder_links.get(job.served.name)
        if link is None:
            job.fail(*retryable(f"model {job.served.name!r} is not being served"))
            return
        await link.put(job)
