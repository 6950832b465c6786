"""A one_for_one supervisor for the pipeline's stages, on an anyio task group.

Each stage is started with ``TaskGroup.start`` (its readiness is ``task_status.started()``). When
a stage raises, returns, or is cancelled by anyone but the supervisor, the jobs it held are failed
with UNAVAILABLE (a retryable status: the client may send them again) and the stage is started
again, on the same links, so queued work carries on. Past ``intensity`` restarts within ``period``
seconds (OTP's max_restarts / max_seconds) the supervisor gives up: it calls ``on_give_up``,
which drains the server and makes it exit non-zero, so a process manager can take over.

Stages can join and leave while it runs (a model file added to or removed from the models
folder): ``add`` starts a stage in the same task group and returns once it is ready; ``remove``
cancels one stage through its own cancel scope, which ends it without a restart and without
touching the others.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable, Sequence

import anyio
from anyio.abc import TaskGroup, TaskStatus

from engine.logs import get_logger
from server.pipeline.stages import Stage
from server.pipeline.statuses import retryable

log = get_logger("server.pipeline.supervisor")


class Supervisor:
    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        intensity: int = 3,
        period: float = 5.0,
        on_give_up: Callable[[str], None] = lambda reason: None,
        on_restart: Callable[[Stage], None] = lambda stage: None,
        clock: Callable[[], float] = time.monotonic,  # seconds; tests pass a clock they move by hand
    ) -> None:
        self.stages = {s.name: s for s in stages}
        if len(self.stages) != len(stages):
            raise ValueError("stage names must be unique")
        self.intensity = intensity
        self.period = period
        self.on_give_up = on_give_up
        self.on_restart = on_restart
        self.clock = clock
        self.restarts: collections.deque[float] = collections.deque()
        self.restart_count: dict[str, int] = dict.fromkeys(self.stages, 0)
        self.gave_up = False
        self._stopping = False
        self._tasks: dict[str, asyncio.Task[object] | None] = {}
        self._scopes: dict[str, anyio.CancelScope] = {}  # each stage's own: remove() cancels one stage alone
        self._ended: dict[str, asyncio.Event] = {}  # set when a stage's supervision loop has returned
        self._tg: TaskGroup | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every stage, report ready, and keep them running until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for stage in list(self.stages.values()):
                    await tg.start(self._supervise, stage)
                log.info("stages_started", stages=list(self.stages))
                task_status.started()
        finally:
            self._stopping = True
            self._tg = None

    async def add(self, stage: Stage) -> None:
        """Start ``stage`` under supervision while the others run; returns once it is ready."""
        if self._tg is None or self._stopping or self.gave_up:
            raise RuntimeError(f"cannot add stage {stage.name}: the supervisor is not running")
        if stage.name in self.stages:
            raise ValueError(f"a stage named {stage.name!r} is already supervised")
        self.stages[stage.name] = stage
        self.restart_count[stage.name] = 0
        try:
            await self._tg.start(self._supervise, stage)
        except BaseException:
            self._forget(stage.name)
            raise
        log.info("stage_added", stage=stage.name)

    async def remove(self, name: str) -> Stage:
        """Stop one stage for good (no restart) and wait for it to end; jobs it still held are
        failed with UNAVAILABLE, as after a crash. Raises KeyError for an unknown name."""
        stage = self.stages.get(name)
        if stage is None:
            raise KeyError(f"no stage named {name!r}; stages: {', '.join(self.stages)}")
        scope, ended = self._scopes.get(name), self._ended.get(name)
        self._forget(name)  # first: the supervision loop reads it as "removed", not as a fault
        if scope is not None:
            scope.cancel()
        if ended is not None:
            await ended.wait()
        self._fail_held(stage, "removed")
        log.info("stage_removed", stage=name)
        return stage

    def _forget(self, name: str) -> None:
        self.stages.pop(name, None)
        self.restart_count.pop(name, None)
        self._scopes.pop(name, None)
        self._tasks.pop(name, None)

    def stop(self) -> None:
        """Stop restarting (shutdown): stages end when the enclosing task group is cancelled."""
        self._stopping = True

    def kill(self, name: str) -> None:
        """Cancel one stage's task, as a fault would (chaos tests); it will be restarted."""
        task = self._tasks.get(name)
        if task is None:
            raise KeyError(f"no running stage named {name!r}; stages: {', '.join(self.stages)}")
        task.cancel()

    def _shutting_down(self) -> bool:
        """Stopping, or a cancel scope around us is cancelled (our task group's or its owner's): a
        cancel that came from no scope (``kill``, a stray ``task.cancel()``) is a fault instead."""
        return self._stopping or anyio.current_effective_deadline() == -math.inf

    async def _supervise(self, stage: Stage, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        ended = self._ended[stage.name] = asyncio.Event()
        try:
            with anyio.CancelScope() as scope:
                self._scopes[stage.name] = scope
                await self._supervise_loop(stage, task_status)
        finally:
            ended.set()
            if self._ended.get(stage.name) is ended:
                del self._ended[stage.name]

    async def _supervise_loop(self, stage: Stage, task_status: TaskStatus[None]) -> None:
        status = _ReadyOnce(task_status)  # kept across restarts until the stage has reported ready once
        while True:
            self._tasks[stage.name] = asyncio.current_task()
            failure: str
            try:
                await stage.run(task_status=status)
                failure = "returned"
            except asyncio.CancelledError:
                if self._shutting_down() or self.gave_up:
                    raise
                # cancelled by someone else than our task group (a chaos test, a stray cancel):
                # uncancel so this task goes on, then restart the stage like any other failure
                task = asyncio.current_task()
                if task is not None:
                    while task.uncancel():
                        pass
                failure = "cancelled"
            except Exception as e:
                log.exception("stage_failed", stage=stage.name, error=f"{type(e).__name__}: {e}")
                failure = f"{type(e).__name__}: {e}"
            finally:
                if stage.name in self.stages:
                    self._tasks[stage.name] = None
            if self._shutting_down() or self.stages.get(stage.name) is not stage:  # or removed
                return
            self._fail_held(stage, failure)
            if self.gave_up:  # the server is draining already: no restart, and no second give-up
                return
            if not self._allow_restart():
                self.gave_up = True
                log.error("restart_intensity_exceeded", stage=stage.name, intensity=self.intensity, period_s=self.period)
                self.on_give_up(f"stage {stage.name} failed {self.intensity + 1} times within {self.period:g} s")
                return
            self.restart_count[stage.name] += 1
            self.on_restart(stage)
            log.warning("stage_restarted", stage=stage.name, reason=failure, restarts=self.restart_count[stage.name])
            await anyio.lowlevel.checkpoint()

    def _fail_held(self, stage: Stage, failure: str) -> None:
        jobs = stage.release()
        for job in jobs:
            job.fail(*retryable(f"stage {stage.name} failed while holding this request"))
        if jobs:
            log.warning("stage_work_failed", stage=stage.name, jobs=len(jobs), reason=failure)

    def _allow_restart(self) -> bool:
        now = self.clock()
        while self.restarts and now - self.restarts[0] > self.period:
            self.restarts.popleft()
        if len(self.restarts) >= self.intensity:
            return False
        self.restarts.append(now)
        return True


class _ReadyOnce:
    """Passes the first ``started()`` on to the supervisor's own task status; ignores the rest.

    A stage that fails before it reports ready is restarted, and its next run's ``started()``
    is the one that counts, so the supervisor does not wait for ever.
    """

    def __init__(self, inner: TaskStatus[None]) -> None:
        self._inner = inner
        self._done = False

    def started(self, value: None = None) -> None:
        if not self._done:
            self._done = True
            self._inner.started(value)
