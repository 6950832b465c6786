r"""The pipeline: admission (the producer's front door), deadlines and metrics, around the topology
that ``server/stages/topology.py`` builds from the config.

Admission (``admit``) runs in the RPC handler, synchronously, on a job ``server/requests.py`` has
already checked: it checks the server's room, files the job's deadline, and offers it to the
ingress. A full ingress, or more than ``max_inflight`` unfinished jobs, refuses at once
(RESOURCE_EXHAUSTED); nothing is parked without bound. Every link holds at most ``queue_size`` items.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import grpc

from engine.engine import Engine
from engine.registry import ModelRegistry
from server.config import ServerConfig
from server.jobs import Job
from server.metrics import Metrics
from server.stages.topology import build_topology
from server.statuses import Refused

DEADLINE_TICK = 0.01  # seconds: deadlines are enforced to within one tick


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
        self.on_admit: Callable[[Job], None] | None = None  # an observer of admissions (tests/chaos notes when); None in the product
        self._idle = asyncio.Event()
        self._idle.set()
        topology = build_topology(config, registry, engine, observe_batch=self._observe_batch)
        self.ingress = topology.ingress
        self.work = topology.work
        self.results = topology.results
        self.image_links = topology.image_links
        self.text_links = topology.text_links
        self.stages = topology.stages
        self._depths = topology.depth_readers()
        for name, depth in self._depths.items():
            metrics.track_depth(name, depth)
        metrics.inflight.set_function(lambda: len(self.inflight))

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
        if self.on_admit is not None:
            self.on_admit(job)

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

    def link_depths(self) -> dict[str, int]:
        return {name: read() for name, read in self._depths.items()}
