r"""The pipeline: admission (the producer's front door), deadlines and metrics, around the topology
that ``server/pipeline/stages/topology.py`` builds from the config.

Admission (``admit``) runs in the ingress's handler, synchronously, on a job ``requests.py`` has
already checked: the policy in ``admission.py`` or a full ingress refuses at once
(RESOURCE_EXHAUSTED, with a retry hint); otherwise the job's deadline is filed in a timing wheel
and it enters the ingress. Nothing is parked without bound: every link holds at most
``queue_size`` items.

Models come and go at run time (server/runtime/model_watch.py): ``add_model`` gives a new model name its
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

from engine import Engine, ModelRegistry, ServedModel
from server.config import ServerConfig
from server.metrics import Metrics
from server.pipeline.admission import Admission
from server.pipeline.jobs import Job, Rpc
from server.pipeline.requests import JobBuilder
from server.pipeline.stages.base import ImageWork
from server.pipeline.stages.names import ModelStage
from server.pipeline.stages.topology import Topology
from server.pipeline.statuses import SHUTTING_DOWN, Code, Refused, overloaded, retryable

if TYPE_CHECKING:
    from server.pipeline.supervisor import Supervisor

DEADLINE_TICK = 0.01  # seconds: deadlines are enforced to within one tick


class Pipeline:
    def __init__(self, config: ServerConfig, registry: ModelRegistry, engine: Engine, metrics: Metrics) -> None:
        self.config = config
        self.registry = registry
        self.engine = engine
        self.metrics = metrics
        self.jobs = JobBuilder(config, registry, engine)  # requests -> checked jobs, for every ingress
        self.inflight: set[Job] = set()
        self._wheel: dict[int, set[Job]] = {}  # deadline tick -> jobs due then
        self._swept = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._tokens: dict[str, Any] = {}  # tokens counter children per model
        self.accepting = True
        # one child per reason, looked up once: under overload every refusal counts
        overload_refusals = {reason: metrics.overload_refusals.labels(reason) for reason in ("delay", "arrival", "count", "limit", "start")}
        self._start_refusals = overload_refusals["start"]
        self.admission = Admission(
            config.max_inflight,
            target_s=config.admission_target_ms / 1000,
            interval_s=config.admission_interval_ms / 1000,
            on_refusal=lambda reason: overload_refusals[reason].inc(),
            call_floor=max(16, config.batch_size * 3 // 4),  # room to nearly fill a batch while another computes
        )
        metrics.queue_delay.set_function(lambda: self.admission.codel.delay)
        self._service_s: dict[str, float] = {}  # model -> its latest batch's compute time
        self._idle = asyncio.Event()
        self._idle.set()
        self._retiring: dict[ServedModel, tuple[set[Job], asyncio.Event]] = {}  # drain_version's waits
        # Generate calls accepted and not yet finished (the accept path's count, set by the app): with the
        # jobs in flight, what a batcher may still wait for before its window ends (Batcher._alone).
        self.calls_in_progress: Callable[[], int] = lambda: 0
        topology = self.topology = Topology(
            config, registry, engine, observe_batch=self._observe_batch,
            inflight=lambda: max(len(self.inflight), self.calls_in_progress()),
        )  # fmt: skip
        self.ingress = topology.ingress
        self.work = topology.work
        self.results = topology.results
        self.image_links = topology.image_links
        self.feeder_links = topology.feeder_links
        self.stages = topology.stages
        for name, depth in topology.depth_readers().items():
            metrics.track_depth(name, depth)
        metrics.inflight.set_function(lambda: len(self.inflight))

    # -- models at run time (server/runtime/model_watch.py) -------------------------------------------------

    async def add_model(self, served: ServedModel, supervisor: Supervisor) -> bool:
        """Make the pipeline ready for ``served`` before it is published: its name's link and stage,
        started under ``supervisor``. True when a stage was added (False: the name had one)."""
        stage = self.topology.model_stage(served)
        if stage is None:
            return False
        self.metrics.track_depth(stage.name, self.topology.depth_readers()[stage.name])
        try:
            await supervisor.add(stage)
        except BaseException:
            self._drop_link(ModelStage.of(served), served.name)
            raise
        return True

    async def remove_model(self, name: str, supervisor: Supervisor) -> list[str]:
        """Stop the stages of ``name`` that no served version needs (all of them once no version is
        left); returns their names. Call after ``drain_version``: whatever is still queued for
        them is failed with UNAVAILABLE."""
        versions = [e for e in self.registry.served() if e.name == name]
        needed = {ModelStage.of(e) for e in versions}
        removed = []
        for kind in ModelStage:
            stage_name = kind.stage_name(name)
            if kind in needed or stage_name not in supervisor.stages:
                continue
            await supervisor.remove(stage_name)
            self._drop_link(kind, name)
            removed.append(stage_name)
        return removed

    def _drop_link(self, kind: ModelStage, model: str) -> None:
        links: dict[str, Any] = self.image_links if kind is ModelStage.BATCHER else self.feeder_links  # text and steps: feeders
        link = links.pop(model, None)
        if kind is ModelStage.BATCHER:
            self.topology.batchers.pop(model, None)
        else:
            self.topology.feeders.pop(model, None)
        if link is None:
            return
        for item in link.take_nowait(link.capacity):
            job = item.job if isinstance(item, ImageWork) else item
            job.fail(*retryable(f"model {job.served.name!r} stopped being served"))
        self.metrics.queue_depth.remove(kind.stage_name(model))

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
                *retryable(f"model {entry.name} version {entry.version} was retired (its file changed or went) before the request finished")
            )
        return total - len(late), len(late)

    def _observe_batch(self, model: str, n: int, seconds: float) -> None:
        self._service_s[model] = seconds
        self.metrics.batch_size.labels(model).observe(n)
        self.metrics.batch_seconds.labels(model).observe(seconds)
        self.metrics.samples.labels(model).inc(n)

    def check_room(self, *, by_delay: bool = True) -> None:
        """Raise Refused if a new request would be refused now (shutting down, or overloaded)."""
        reason = self.refusal_reason(by_delay=by_delay)
        if reason is not None:
            raise self.refused(reason)

    def refusal_reason(self, *, by_delay: bool = True) -> str | None:
        """``check_room`` without raising: why a new request is refused now ("shutting_down", or
        admission's reason, counted), or None."""
        if not self.accepting:
            return "shutting_down"
        return self.admission.overloaded(len(self.inflight), by_delay=by_delay)

    def refused(self, reason: str) -> Refused:
        """The refusal for a ``refusal_reason`` (or admission's "arrival")."""
        if reason == "shutting_down":
            return Refused(*SHUTTING_DOWN)
        return self.admission.refused(reason)

    def admit(self, job: Job, timeout: float | None) -> None:
        """Accept ``job`` into the pipeline or raise Refused; ``timeout`` in seconds (None: the default)."""
        self.check_room(by_delay=job.rpc is not Rpc.GENERATE_STREAM)  # a stream's requests are admitted by its credit
        if job.text is not None:
            self._check_text_start(job)
        if not self.ingress.offer(job):
            raise overloaded("server queue is full", self.admission.retry_after_ms)
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

    def _check_text_start(self, job: Job) -> None:
        """Refuse a text request while its model's oldest waiting one has waited over ``--text-wait-ms`` for
        its first token: past its ceiling a decode loop would otherwise queue text for seconds (issue 35)."""
        limit_ms = self.config.text_wait_ms
        feeder = self.topology.feeders.get(job.served.name)
        if not limit_ms or feeder is None or feeder.start_wait(time.perf_counter()) * 1000 <= limit_ms:
            return
        self._start_refusals.inc()
        message = f"model {job.served.name!r} is overloaded: text requests wait over {limit_ms:g} ms for their first token"
        raise overloaded(message, self.admission.retry_after_ms)

    def _sweep(self) -> None:
        """Fail the jobs whose deadline tick has passed; runs every tick while jobs are in flight.

        A timing wheel instead of one loop timer per job: a set add and discard per request cost far
        less than a timer started and cancelled. Deadlines are enforced within one tick (10 ms). A
        loop callback, not a stage: no stage failure can stop deadlines from being enforced.
        """
        loop = asyncio.get_running_loop()
        now = math.floor(loop.time() / DEADLINE_TICK)
        for tick in range(self._swept + 1, now + 1):
            bucket = self._wheel.pop(tick, None)
            for job in list(bucket or ()):
                job.fail(Code.DEADLINE_EXCEEDED, "deadline passed before the request finished")
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
        if job.rpc is Rpc.GENERATE and job.image is not None:  # the rate the call limit follows
            self.admission.calls.finished(self.admission.clock())
        outcome = job.outcome
        code = outcome.code if outcome is not None else Code.UNKNOWN
        name = job.served.name
        if job.image is not None and code is Code.OK and job.served.images is None:  # an iterative model's samples
            self.metrics.samples.labels(name).inc(job.sent)  # (one-shot batches count theirs as they run)
        elif job.image is not None and code is Code.OK:  # the delay signal (admission.py), one-shot models only: an
            # iterative request's time is its steps, as a text request's is its tokens, not a queue's delay
            # What batching itself costs is not queueing: the window in force (a saturated loop
            # stretches it), the job's own batches, and one batch ahead of it (one computes while the next fills).
            batches = -(-job.image.n // self.config.batch_size) + 1
            batcher = self.topology.batchers.get(name)
            window = batcher.window.current_s if batcher is not None else self.config.batch_timeout_ms / 1000
            allowance = window + batches * self._service_s.get(name, 0.0)
            self.admission.observe_job(job.created, allowance)
        self.metrics.requests.finished(name, job.rpc, code.name, time.perf_counter() - job.created)
        if job.text is not None and job.sent:
            tokens = self._tokens.get(name)
            if tokens is None:  # label lookups cost microseconds: keep the child per model
                tokens = self._tokens[name] = self.metrics.tokens.labels(name)
            tokens.inc(job.sent)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def fail_all(self, code: Code, message: str) -> int:
        """End every unfinished job (the end of a drain); returns how many there were."""
        jobs = list(self.inflight)
        for job in jobs:
            job.fail(code, message)
        return len(jobs)
