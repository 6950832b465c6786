"""The processor: has the engine check and prepare each image request (its seed, its pieces); latents are drawn in the batch."""

from __future__ import annotations

import collections
from collections.abc import Iterable

import anyio
from anyio.abc import TaskStatus

from engine import Engine
from engine.errors import InvalidRequestError
from server.pipeline.jobs import Job
from server.pipeline.links import Link
from server.pipeline.stages.base import PROCESSOR_DEMAND, ImageWork, Stage
from server.pipeline.statuses import retryable, status_of


class Processor(Stage):
    """Prepares image inputs through ``Engine.prepare``: each request checked, its seed picked, split
    into pieces of at most ``max_chunk`` samples (the engine draws its latents later, in the batch).
    Text jobs go from the producer straight to their feeder: there is nothing to prepare."""

    kind = "processor"

    def __init__(
        self,
        index: int,
        inbox: Link[Job],
        image_links: dict[str, Link[ImageWork]],
        engine: Engine,
        *,
        max_chunk: int,
    ) -> None:
        super().__init__(f"processor-{index}")
        self.max_chunk = max_chunk  # the batch size: a bigger request is split into pieces of at most this
        self.inbox = inbox
        self.engine = engine
        self.image_links = image_links
        self.pending: dict[Link[ImageWork], collections.deque[ImageWork]] = {}  # prepared, not yet in the batcher's link

    def holding(self) -> Iterable[Job]:
        return [*self.held, *(w.job for works in self.pending.values() for w in works)]

    def release(self) -> list[Job]:
        jobs = super().release()
        self.pending.clear()
        return jobs

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self.held = await self.inbox.take(PROCESSOR_DEMAND)
            self._prepare_held()
            # One group per model's link. A restart fails what is still pending, so no piece is left
            # behind unnoticed (put_from takes a piece out of ``pending`` only as it enters the link).
            while self.pending:
                link = next(iter(self.pending))
                await link.put_from(self.pending[link])
                del self.pending[link]

    def _prepare_held(self) -> None:
        """Prepare every job taken (no waiting in between: a group is prepared in one go), into ``pending``."""
        for job in self.held:
            if not job.done:
                self._prepare(job)
        self.held = []

    def _prepare(self, job: Job) -> None:
        name = job.served.name
        link = self.image_links.get(name)
        if link is None or job.image is None:
            job.fail(*retryable(f"model {name!r} is not being served (as an image model)"))
            return
        try:  # checked at admission too (requests.py)
            pieces = self.engine.prepare(job.served, job.image, self.max_chunk)
        except InvalidRequestError as e:
            job.fail(*status_of(e))
            return
        job.seed = pieces[0].seed
        job.chunks = pieces
        works = self.pending.get(link)
        if works is None:
            works = self.pending[link] = collections.deque()
        works.extend(ImageWork(job, c) for c in pieces)
