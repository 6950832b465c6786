r"""The pipeline: its links, its stages, and admission (the producer's front door).

    ingress -> Producer -> work -> Processor xN -> images/<model> -> Batcher -> results -> Router
                                               \-> text/<model>   -> TextFeeder -> decode loop (engine thread)

Admission (``admit``) runs in the RPC handler, synchronously: it checks the model, the request's
limits and the server's room, files the job's deadline, and offers it to the ingress. A
full ingress, or more than ``max_inflight`` unfinished jobs, refuses at once (RESOURCE_EXHAUSTED);
nothing is parked without bound. Every link holds at most ``queue_size`` items.

Models come and go at run time (server/model_watch.py): ``add_model`` gives a new model name its
link and stage and starts the stage under the supervisor before the model is published;
``drain_version`` waits for the requests on a retired version; ``remove_model`` stops the stages
that no served version needs any more.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from engine.engine import Engine
from engine.registry import ModelRegistry, ServedModel
from server.config import ServerConfig
from server.jobs import Job
from server.links import Link
from server.metrics import Metrics
from server.stages import Batcher, ImageDone, ImageWork, Processor, Producer, Router, Stage, TextFeeder

if TYPE_CHECKING:
    from server.supervisor import Supervisor

DEADLINE_TICK = 0.01  # seconds: deadlines are enforced to within one tick


class Refused(Exception):
    """Raised when admission refuses a request; carries the gRPC status for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Pipeline:
    def __init__(self, config: ServerConfig, registry: ModelRegistry, engine: Engine, metrics: Metrics) -> None:
        self.config = config
        self.registry = registry
        self.engine = engine
        self.metrics = metrics
        self.inflight: set[Job] = set()
        self._wheel: dict[int, set[Job]] = {}  # deadline tick -> jobs due then
        self._swept = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._children: dict[tuple[str, str, grpc.StatusCode], tuple[Any, Any, Any]] = {}
        self.accepting = True
        self._idle = asyncio.Event()
        self._idle.set()
        self._retiring: dict[ServedModel, tuple[set[Job], asyncio.Event]] = {}  # drain_version's waits
        size = config.queue_size
        # The ingress holds max_inflight (plus slack for jobs that ended while queued, which the
        # producer drops): admission's limit is the number of unfinished requests, so a burst the
        # credits allowed is not refused for queue room. The links behind are bounded by queue_size.
        self.ingress: Link[Job] = Link("producer", config.max_inflight + size)
        self.work: Link[Job] = Link("processor", size)
        self.results: Link[ImageDone] = Link("router", size)
        # shared with the processors (the same dicts): a link added here is routed to at once
        self.image_links: dict[str, Link[ImageWork]] = {}
        self.text_links: dict[str, Link[Job]] = {}
        models: list[Stage] = []
        for served in registry.served():
            stage = self._model_stage(served)
            if stage is not None:
                models.append(stage)
        self.stages: list[Stage] = self._build_stages(models)
        for name, depth in self._depth_readers().items():
            metrics.track_depth(name, depth)
        metrics.inflight.set_function(lambda: len(self.inflight))

    def _build_stages(self, models: list[Stage]) -> list[Stage]:
        c = self.config
        stages: list[Stage] = [Producer(self.ingress, self.work)]
        stages += [Processor(i, self.work, self.image_links, self.text_links, max_chunk=c.batch_size) for i in range(c.processors)]
        stages += models
        stages.append(Router(self.results))
        return stages

    def _model_stage(self, served: ServedModel) -> Stage | None:
        """The link and stage ``served``'s model name needs (a batcher for images, a text feeder for
        text), registered in the routing dicts; None when the name has them already."""
        c, name = self.config, served.name
        if served.images is not None:
            if name in self.image_links:
                return None
            link: Link[ImageWork] = Link(f"batcher-{name}", c.queue_size)
            self.image_links[name] = link
            self.metrics.track_depth(link.name, link.__len__)
            return Batcher(
                name,
                link,
                self.results,
                self.engine,
                batch_size=c.batch_size,
                batch_timeout=c.batch_timeout_ms / 1000,
                concurrency=c.batch_concurrency,
                observe_batch=self._observe_batch,
            )
        if name in self.text_links:
            return None
        text_link: Link[Job] = Link(f"text-{name}", c.queue_size)
        self.text_links[name] = text_link
        self.metrics.track_depth(text_link.name, text_link.__len__)
        return TextFeeder(name, text_link, self.engine, self.registry, max_pending=c.decode_pending)

    # -- models at run time (server/model_watch.py) -------------------------------------------------

    async def add_model(self, served: ServedModel, supervisor: Supervisor) -> bool:
        """Make the pipeline ready for ``served`` before it is published: its name's link and stage,
        started under ``supervisor``. True when a stage was added (False: the name had one)."""
        stage = self._model_stage(served)
        if stage is None:
            return False
        try:
            await supervisor.add(stage)
        except BaseException:
            self._drop_link(stage.name)
            raise
        return True

    async def remove_model(self, name: str, supervisor: Supervisor) -> list[str]:
        """Stop the stages of ``name`` that no served version needs (all of them once no version is
        left); returns their names. Call after ``drain_version``: whatever is still queued for
        them is failed with UNAVAILABLE."""
        versions = [e for e in self.registry.served() if e.name == name]
        needed = {f"batcher-{name}" if e.images is not None else f"text-{name}" for e in versions}
        removed = []
        for link_name in (f"batcher-{name}", f"text-{name}"):
            if link_name in needed or link_name not in supervisor.stages:
                continue
            await supervisor.remove(link_name)
            self._drop_link(link_name)
            removed.append(link_name)
        return removed

    def _drop_link(self, link_name: str) -> None:
        links: dict[str, Any] = self.image_links if link_name.startswith("batcher-") else self.text_links
        link = links.pop(link_name.split("-", 1)[1], None)
        if link is None:
            return
        for item in link.take_nowait(link.capacity):
            job = item.job if isinstance(item, ImageWork) else item
            job.fail(grpc.StatusCode.UNAVAILABLE, f"model {job.served.name!r} stopped being served; retry")
        self.metrics.queue_depth.remove(link_name)

    async def drain_version(self, entry: ServedModel, grace: float) -> tuple[int, int]:
        """Wait for the requests that hold ``entry`` (a version no longer published) to finish, for
        up to ``grace`` seconds; fail the rest with UNAVAILABLE. Returns (finished, failed)."""
        holders = {job for job in self.inflight if job.served is entry}
        total = len(holders)
        if not holders:
            return 0, 0
        done = asyncio.Event()
        self._retiring[entry] = (holders, done)
        try:
            async with asyncio.timeout(grace):
                await done.wait()
        except TimeoutError:
            pass
        finally:
            del self._retiring[entry]
        late = [job for job in holders if not job.done]
        for job in late:
            job.fail(
                grpc.StatusCode.UNAVAILABLE,
                f"model {entry.name} version {entry.version} was retired (its file changed or went) before the request finished; retry",
            )
        return total - len(late), len(late)

    def _observe_batch(self, model: str, n: int, seconds: float) -> None:
        self.metrics.batch_size.labels(model).observe(n)
        self.metrics.batch_seconds.labels(model).observe(seconds)
        self.metrics.samples.labels(model).inc(n)

    def admit(self, job: Job, timeout: float | None) -> None:
        """Accept ``job`` into the pipeline or raise Refused; ``timeout`` in seconds (None: the default)."""
        if not self.accepting:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "server is shutting down; send the request to another server")
        if len(self.inflight) >= self.config.max_inflight:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server is at its limit of {self.config.max_inflight} requests in flight")
        if not self.ingress.offer(job):
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "server queue is full; retry with back-off")
        loop = asyncio.get_running_loop()
        budget = self.config.request_timeout_s if timeout is None else min(timeout, self.config.request_timeout_s)
        job.deadline = loop.time() + budget
        job.tick = math.ceil(job.deadline / DEADLINE_TICK)
        bucket = self._wheel.get(job.tick)
        if bucket is None:
            bucket = self._wheel[job.tick] = set()
        bucket.add(job)
        if self._sweeper is None:
            self._swept = math.floor(loop.time() / DEADLINE_TICK)
            self._sweeper = loop.call_later(DEADLINE_TICK, self._sweep)
        job.on_finish = self._finished
        self.inflight.add(job)
        self._idle.clear()

    def _sweep(self) -> None:
        """Fail the jobs whose deadline tick has passed; runs every tick while jobs are in flight.

        A timing wheel instead of one loop timer per job: a timer costs ~4 us to start and cancel
        (15% of the throughput of one-image requests), a set add/discard well under 1 us. Deadlines
        are enforced within one tick (10 ms). A loop callback, not a stage: no stage failure can
        stop deadlines from being enforced.
        """
        loop = asyncio.get_running_loop()
        now = math.floor(loop.time() / DEADLINE_TICK)
        for tick in range(self._swept + 1, now + 1):
            bucket = self._wheel.pop(tick, None)
            for job in list(bucket or ()):
                job.fail(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the request finished")
        self._swept = max(self._swept, now)
        self._sweeper = loop.call_later(DEADLINE_TICK, self._sweep) if self.inflight else None

    def _finished(self, job: Job) -> None:
        bucket = self._wheel.get(job.tick)
        if bucket is not None:
            bucket.discard(job)
        self.inflight.discard(job)
        if not self.inflight:
            self._idle.set()
        if self._retiring:  # a version is being retired: is this one of its last requests?
            waiting = self._retiring.get(job.served)
            if waiting is not None:
                waiting[0].discard(job)
                if not waiting[0]:
                    waiting[1].set()
        outcome = job.outcome
        code = outcome.code if outcome is not None else grpc.StatusCode.UNKNOWN
        name = job.served.name
        counters = self._children.get((name, job.rpc, code))
        if counters is None:  # label lookups cost microseconds: keep the children per label set
            m = self.metrics
            counters = (m.requests.labels(name, job.rpc, code.name), m.latency.labels(name, job.rpc), m.tokens.labels(name))
            self._children[(name, job.rpc, code)] = counters
        requests, latency, tokens = counters
        requests.inc()
        latency.observe(time.perf_counter() - job.created)
        if job.text is not None and job.sent:
            tokens.inc(job.sent)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def fail_all(self, code: grpc.StatusCode, message: str) -> int:
        """End every unfinished job (the end of a drain); returns how many there were."""
        jobs = list(self.inflight)
        for job in jobs:
            job.fail(code, message)
        return len(jobs)

    def lookup(self, name: str, version: int) -> ServedModel:
        return self.registry.get(name, version or None)

    def _depth_readers(self) -> dict[str, Callable[[], int]]:
        readers: dict[str, Callable[[], int]] = {self.ingress.name: self.ingress.__len__, self.work.name: self.work.__len__}
        readers[self.results.name] = self.results.__len__
        readers.update({link.name: link.__len__ for link in self.image_links.values()})
        readers.update({link.name: link.__len__ for link in self.text_links.values()})
        return readers

    def link_depths(self) -> dict[str, int]:
        return {name: read() for name, read in self._depth_readers().items()}
