"""What the stage tests share: a recipient that records, a fake engine, jobs and their pieces, stages run in a task group."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import anyio

from engine.decode import DecodeBatch, SequenceRequest, TokenEvent
from engine.engine import Engine
from engine.images import ImageChunk, ImageRequest, ImageResult
from engine.registry import ServedModel
from engine.sampling import SamplingParams
from server.pipeline.jobs import Job, Outcome, Rpc
from server.pipeline.links import Link
from server.pipeline.stages import Batcher, ImageDone, ImageWork, Stage

WAIT = 5.0  # seconds: generous bound for anything that should happen "at once"


class RecordingRecipient:
    """A job recipient that records what each job emitted and every terminal outcome (exactly one is expected)."""

    def __init__(self) -> None:
        self.items: dict[str, list[Any]] = {}
        self.outcomes: dict[str, list[Outcome]] = {}
        self._changed = asyncio.Event()

    def emit(self, job: Job, item: ImageResult | TokenEvent) -> None:
        self.items.setdefault(job.id, []).append(item)
        self._changed.set()

    def finish(self, job: Job, outcome: Outcome) -> None:
        self.outcomes.setdefault(job.id, []).append(outcome)
        self._changed.set()

    async def until(self, condition: Callable[[], bool], timeout: float = WAIT) -> None:
        with anyio.fail_after(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def outcome(self, job: Job, timeout: float = WAIT) -> Outcome:
        await self.until(lambda: job.id in self.outcomes, timeout)
        return self.outcomes[job.id][0]


class FakeEngine:
    """Records each image batch (its chunks); optionally blocks on a gate or raises; else runs the real model."""

    def __init__(self, gate: asyncio.Event | None = None, failures: Sequence[BaseException] = ()) -> None:
        self.calls: list[list[ImageChunk]] = []
        self.active = 0
        self.max_active = 0
        self.gate = gate
        self.failures = list(failures)
        self.changed = asyncio.Event()

    @property
    def sizes(self) -> list[list[int]]:
        return [[c.n for c in call] for call in self.calls]

    def preferred_batch(self, served: ServedModel) -> int:
        assert served.images is not None
        return served.images.tile

    async def generate_images(self, served: ServedModel, chunks: Sequence[ImageChunk]) -> list[ImageResult]:
        self.calls.append(list(chunks))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.changed.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.failures:
                raise self.failures.pop(0)
            assert served.images is not None
            return served.images.run(list(chunks))
        finally:
            self.active -= 1
            self.changed.set()

    async def until(self, condition: Callable[[], bool], timeout: float = WAIT) -> None:
        with anyio.fail_after(timeout):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


def image_job(served: ServedModel, sink: RecordingRecipient, job_id: str, n: int, seed: int | None = 1, **kw: Any) -> Job:
    return Job(job_id, Rpc.GENERATE, served, sink, 0.0, image=ImageRequest(n=n, seed=seed, request_id=job_id, **kw))


def text_job(served: ServedModel, sink: RecordingRecipient, job_id: str, prompt: str, params: SamplingParams) -> Job:
    return Job(job_id, Rpc.GENERATE, served, sink, 0.0, text=SequenceRequest(prompt, params, job_id))


def pieces(job: Job, size: int | None = None) -> list[ImageWork]:
    """The job's prepared work, as a processor would make it."""
    assert job.image is not None and job.served.images is not None
    whole = job.served.images.prepare(job.image)
    job.seed = whole.seed
    job.chunks = whole.split(size) if size is not None else [whole]
    return [ImageWork(job, c) for c in job.chunks]


def make_batcher(engine: FakeEngine | Engine, inbox: Link[ImageWork], out: Link[ImageDone], **kw: Any) -> Batcher:
    settings: dict[str, Any] = {"batch_size": 8, "batch_timeout": 10.0, "concurrency": 1, **kw}
    return Batcher("digits", inbox, out, cast(Engine, engine), **settings)


async def take_n(link: Link[Any], n: int, timeout: float = WAIT) -> list[Any]:
    items: list[Any] = []
    with anyio.fail_after(timeout):
        while len(items) < n:
            items += await link.take(n - len(items))
    return items


async def settle(rounds: int = 100) -> None:
    """Let every ready task run until it blocks (no timers involved)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


@asynccontextmanager
async def running(*stages: Stage) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for stage in stages:
            await tg.start(stage.run)
        yield
        tg.cancel_scope.cancel()


def sync_text(served: ServedModel, prompt: str, params: SamplingParams) -> str:
    loop = DecodeBatch.from_loaded(served.model, max_batch=1)
    loop.add(SequenceRequest(prompt, params))
    return "".join(ev.text for ev in loop.run_until_idle())


def results_of(job: Job, size: int) -> list[ImageDone]:
    assert job.served.images is not None
    return [ImageDone(job, r) for r in job.served.images.run([w.chunk for w in pieces(job, size)])]
