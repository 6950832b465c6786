"""The producer: admitted jobs from the ingress to the processors, dropping those that ended meanwhile."""

from __future__ import annotations

import anyio
import grpc
from anyio.abc import TaskStatus

from server.jobs import Job
from server.links import Link
from server.stages.base import PROCESSOR_DEMAND, Stage


class Producer(Stage):
    """Moves admitted jobs from the ingress on, dropping those that ended meanwhile: image jobs to
    the processors, text jobs straight to their model's text feeder (they need no preparing)."""

    kind = "producer"

    def __init__(self, ingress: Link[Job], out: Link[Job], text_links: dict[str, Link[Job]] | None = None) -> None:
        super().__init__("producer")
        self.ingress = ingress
        self.out = out
        self.text_links = text_links or {}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self.held = await self.ingress.take(PROCESSOR_DEMAND)
            while self.held:  # no `job` local: it would keep the last job (and what it holds) while waiting
                if not self.held[0].done:
                    await self._forward(self.held[0])
                self.held.pop(0)

    async def _forward(self, job: Job) -> None:
        if job.text is None:
            await self.out.put(job)
            return
        link = self.text_links.get(job.served.name)
        if link is None:
            job.fail(grpc.StatusCode.UNAVAILABLE, f"model {job.served.name!r} is not being served")
            return
        await link.put(job)
