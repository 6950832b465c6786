"""What every stage is (``Stage``: run, holding, release) and the values that flow between them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import anyio
from anyio.abc import TaskStatus

from engine import ImageChunk, ImageResult
from server.pipeline.jobs import Job

PROCESSOR_DEMAND = 64  # jobs a processor asks for at once: amortises the hand-off, keeps latency low


# Not frozen: one of each is made per request, and a frozen dataclass sets each field through
# object.__setattr__.
@dataclass(slots=True)
class ImageWork:
    """One piece of an image job, at most a batch in size."""

    job: Job
    chunk: ImageChunk


@dataclass(slots=True)
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
