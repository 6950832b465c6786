"""server.pipeline.supervisor: one_for_one restarts of pipeline stages on an anyio task group, with a restart intensity."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import anyio
import pytest
from anyio.abc import TaskGroup, TaskStatus

from server.pipeline.jobs import Job, Outcome, Rpc
from server.pipeline.stages import Stage
from server.pipeline.statuses import Code
from server.pipeline.supervisor import Supervisor

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


class RecordingRecipient:
    """Counts every terminal outcome per job (Job.finish must call it exactly once)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, list[Outcome]] = {}

    def emit(self, job: Job, item: Any) -> None:
        pass

    def finish(self, job: Job, outcome: Outcome) -> None:
        self.outcomes.setdefault(job.id, []).append(outcome)


def make_job(job_id: str, sink: RecordingRecipient) -> Job:
    return Job(job_id, Rpc.GENERATE, cast(Any, None), sink, 0.0)  # the supervisor never looks at the model


class FakeStage(Stage):
    """A stage that runs until told to crash (or is cancelled); each run holds ``hold``'s jobs."""

    kind = "fake"

    def __init__(self, name: str, hold: list[Job] | None = None, *, gated: bool = False) -> None:
        super().__init__(name)
        self.hold = hold or []
        self.runs = 0
        self.started_runs = 0
        self.cancelled_runs = 0
        self.gate = asyncio.Event()  # run waits for it before reporting ready (when gated)
        if not gated:
            self.gate.set()
        self._changed = asyncio.Condition()
        self._crash = asyncio.Event()
        self.fail_before_ready = 0  # this many first runs raise before calling task_status.started()

    async def _bump(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_started(self, runs: int) -> None:
        """Wait until ``runs`` runs have reported ready."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.started_runs >= runs)

    def crash(self) -> None:
        self._crash.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.runs += 1
        self._crash = asyncio.Event()
        if self.runs <= self.fail_before_ready:
            raise RuntimeError(f"{self.name} failed to start")
        await self.gate.wait()
        self.held = list(self.hold)
        task_status.started()
        self.started_runs += 1
        await self._bump()
        try:
            await self._crash.wait()
        except asyncio.CancelledError:
            self.cancelled_runs += 1
            raise
        raise RuntimeError(f"{self.name} crashed")


class Recorder:
    def __init__(self) -> None:
        self.restarted: list[str] = []
        self.gave_up: list[str] = []
        self.gave_up_event = asyncio.Event()

    def on_restart(self, stage: Stage) -> None:
        self.restarted.append(stage.name)

    def on_give_up(self, reason: str) -> None:
        self.gave_up.append(reason)
        self.gave_up_event.set()


def supervisor(
    stages: list[FakeStage], rec: Recorder, *, intensity: int = 3, period: float = 5.0, clock: Callable[[], float] = time.monotonic
) -> Supervisor:
    return Supervisor(stages, intensity=intensity, period=period, on_give_up=rec.on_give_up, on_restart=rec.on_restart, clock=clock)


def gave_up(sup: Supervisor) -> bool:
    return sup.gave_up  # read through a call: mypy would otherwise keep an earlier assert's narrowing across awaits


async def settle(rounds: int = 50) -> None:
    """Let every ready task run a few times (a restart takes a couple of loop iterations)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def shutdown(sup: Supervisor, tg: TaskGroup) -> None:
    sup.stop()
    tg.cancel_scope.cancel()


async def test_a_crashed_stage_is_restarted_and_its_jobs_fail_unavailable_once() -> None:
    sink = RecordingRecipient()
    held = [make_job("a", sink), make_job("b", sink)]
    already_done = make_job("done", sink)
    already_done.finish(Outcome(reason="complete"))
    stage = FakeStage("flaky", [*held, already_done])
    other = FakeStage("other")
    rec = Recorder()
    sup = supervisor([stage, other], rec)
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        assert stage.started_runs == 1
        stage.crash()
        with anyio.fail_after(5):
            await stage.wait_started(2)
        assert stage.runs == 2
        assert sup.restart_count == {"flaky": 1, "other": 0}
        assert rec.restarted == ["flaky"]
        assert rec.gave_up == [] and not sup.gave_up
        assert other.runs == 1  # one_for_one: the others are left alone
        for job in held:
            assert job.done
            assert [o.code for o in sink.outcomes[job.id]] == [Code.UNAVAILABLE]
            assert "flaky" in sink.outcomes[job.id][0].message
        assert sink.outcomes["done"] == [Outcome(reason="complete")]  # a finished job keeps its outcome
        # the restarted stage holds the same jobs again: a second crash must not finish them twice
        stage.crash()
        with anyio.fail_after(5):
            await stage.wait_started(3)
        assert sup.restart_count["flaky"] == 2
        assert all(len(sink.outcomes[j.id]) == 1 for j in [*held, already_done])
        await shutdown(sup, tg)


async def test_a_stage_that_returns_is_restarted() -> None:
    class Returns(FakeStage):
        async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            self.runs += 1
            task_status.started()
            self.started_runs += 1
            await self._bump()
            if self.runs == 1:
                return
            await asyncio.Event().wait()

    stage = Returns("returns")
    rec = Recorder()
    sup = supervisor([stage], rec)
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        with anyio.fail_after(5):
            await stage.wait_started(2)
        assert sup.restart_count["returns"] == 1
        assert rec.restarted == ["returns"]
        await shutdown(sup, tg)


async def test_kill_cancels_the_stage_and_it_is_restarted() -> None:
    sink = RecordingRecipient()
    job = make_job("j", sink)
    stage = FakeStage("victim", [job])
    rec = Recorder()
    sup = supervisor([stage], rec)
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        sup.kill("victim")
        with anyio.fail_after(5):
            await stage.wait_started(2)
        assert stage.cancelled_runs == 1
        assert sup.restart_count["victim"] == 1
        assert rec.restarted == ["victim"]
        assert [o.code for o in sink.outcomes["j"]] == [Code.UNAVAILABLE]
        sup.kill("victim")  # the restarted stage can be killed again: the supervisor tracks its new run
        with anyio.fail_after(5):
            await stage.wait_started(3)
        assert sup.restart_count["victim"] == 2
        await shutdown(sup, tg)
    with pytest.raises(KeyError):
        sup.kill("nobody")


async def test_more_failures_than_the_intensity_within_the_period_give_up() -> None:
    stage = FakeStage("flaky")
    bystander = FakeStage("bystander")
    rec = Recorder()
    sup = supervisor([stage, bystander], rec, intensity=2, period=60.0)
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        for n in (2, 3):  # two failures: restarted each time
            stage.crash()
            with anyio.fail_after(5):
                await stage.wait_started(n)
        assert not gave_up(sup) and rec.gave_up == []
        stage.crash()  # the third within the period: more than intensity=2
        with anyio.fail_after(5):
            await rec.gave_up_event.wait()
        assert sup.gave_up
        assert len(rec.gave_up) == 1 and "flaky" in rec.gave_up[0]
        await settle()
        assert stage.runs == 3  # not started again
        assert sup.restart_count["flaky"] == 2
        assert rec.restarted == ["flaky", "flaky"]
        with pytest.raises(KeyError):
            sup.kill("flaky")  # nothing is running under that name any more
        assert bystander.runs == 1 and bystander.cancelled_runs == 0  # the others keep serving (the drain needs them)
        await shutdown(sup, tg)


async def test_after_giving_up_another_failure_neither_restarts_nor_gives_up_again() -> None:
    flaky, bystander = FakeStage("flaky"), FakeStage("bystander")
    rec = Recorder()
    sup = supervisor([flaky, bystander], rec, intensity=1, period=60.0)
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        flaky.crash()
        with anyio.fail_after(5):
            await flaky.wait_started(2)
        flaky.crash()
        with anyio.fail_after(5):
            await rec.gave_up_event.wait()
        bystander.crash()
        await settle()
        assert bystander.runs == 1 and sup.restart_count["bystander"] == 0  # not restarted
        try:
            assert len(rec.gave_up) == 1, rec.gave_up
        finally:
            await shutdown(sup, tg)


async def test_failures_spread_beyond_the_period_do_not_accumulate() -> None:
    stage = FakeStage("flaky")
    rec = Recorder()
    period = 5.0
    now = [1000.0]  # a clock moved by hand: the test holds on any machine, however slow
    sup = supervisor([stage], rec, intensity=1, period=period, clock=lambda: now[0])
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        for n in range(2, 5):
            stage.crash()
            with anyio.fail_after(5):
                await stage.wait_started(n)
            now[0] += period + 0.001  # the last restart leaves the window
        assert not gave_up(sup) and rec.gave_up == []
        assert sup.restart_count["flaky"] == 3
        # two failures within the period (0.001 s apart, by the clock) are more than intensity=1
        stage.crash()
        with anyio.fail_after(5):
            await stage.wait_started(5)
        now[0] += 0.001
        stage.crash()
        with anyio.fail_after(5):
            await rec.gave_up_event.wait()
        assert sup.gave_up and sup.restart_count["flaky"] == 4
        await shutdown(sup, tg)


async def test_ready_only_after_every_stage_reported_started() -> None:
    stages = [FakeStage("one", gated=True), FakeStage("two", gated=True), FakeStage("three", gated=True)]
    rec = Recorder()
    sup = supervisor(stages, rec)
    ready = asyncio.Event()
    async with anyio.create_task_group() as tg:

        async def start() -> None:
            await tg.start(sup.run)
            ready.set()

        tg.start_soon(start)
        for stage in stages:
            await settle()
            assert not ready.is_set(), f"ready before {stage.name} reported started"
            stage.gate.set()
        with anyio.fail_after(5):
            await ready.wait()
        assert [s.started_runs for s in stages] == [1, 1, 1]
        assert sup.restart_count == {"one": 0, "two": 0, "three": 0}
        await shutdown(sup, tg)


async def test_a_stage_that_fails_before_it_is_ready_still_lets_the_supervisor_report_ready() -> None:
    stage = FakeStage("slow-starter")
    stage.fail_before_ready = 1  # the first run raises before started(); the restart comes up fine
    rec = Recorder()
    sup = supervisor([stage], rec)
    async with anyio.create_task_group() as tg:
        try:
            with anyio.fail_after(1):
                await tg.start(sup.run)
            assert stage.started_runs == 1 and sup.restart_count["slow-starter"] == 1
        finally:
            await shutdown(sup, tg)


async def test_after_stop_and_cancel_nothing_is_restarted() -> None:
    sink = RecordingRecipient()
    job = make_job("j", sink)
    stages = [FakeStage("a", [job]), FakeStage("b")]
    rec = Recorder()
    sup = supervisor(stages, rec)
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        await shutdown(sup, tg)
    assert [s.runs for s in stages] == [1, 1]
    assert [s.cancelled_runs for s in stages] == [1, 1]
    assert sup.restart_count == {"a": 0, "b": 0}
    assert rec.restarted == [] and rec.gave_up == [] and not sup.gave_up
    assert "j" not in sink.outcomes  # the server's drain decides held jobs' outcomes, not the supervisor
    with pytest.raises(KeyError):
        sup.kill("a")


async def test_stop_prevents_restarts_of_a_stage_that_then_fails() -> None:
    stage = FakeStage("flaky")
    rec = Recorder()
    sup = supervisor([stage], rec)
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        sup.stop()
        stage.crash()
        await settle()
        assert stage.runs == 1 and sup.restart_count["flaky"] == 0 and rec.restarted == []
        tg.cancel_scope.cancel()


async def test_cancelling_the_enclosing_group_without_stop_does_not_restart() -> None:
    sink = RecordingRecipient()
    stages = [FakeStage("a", [make_job("j", sink)]), FakeStage("b")]
    rec = Recorder()
    sup = supervisor(stages, rec)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            tg.cancel_scope.cancel()  # "keep them running until cancelled"
    assert Counter(rec.restarted) == Counter()
    assert sup.restart_count == {"a": 0, "b": 0}
    assert "j" not in sink.outcomes
    assert rec.gave_up == [] and not sup.gave_up
    assert [s.runs for s in stages] == [1, 1]


async def test_stage_names_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        Supervisor([Stage("x"), Stage("x")])


async def test_a_stage_added_at_run_time_is_supervised_like_the_others() -> None:
    first, late = FakeStage("first"), FakeStage("late")
    rec = Recorder()
    sup = supervisor([first], rec)
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        with anyio.fail_after(5):
            await sup.add(late)  # returns once it reported ready
        assert late.started_runs == 1 and sup.restart_count == {"first": 0, "late": 0}
        with pytest.raises(ValueError, match="already supervised"):
            await sup.add(FakeStage("late"))
        late.crash()
        with anyio.fail_after(5):
            await late.wait_started(2)
        assert rec.restarted == ["late"] and first.runs == 1
        await shutdown(sup, tg)
    with pytest.raises(RuntimeError, match="not running"):
        await sup.add(FakeStage("after"))


async def test_a_removed_stage_ends_without_a_restart_and_its_held_jobs_fail_unavailable() -> None:
    sink = RecordingRecipient()
    job = make_job("j", sink)
    keep, gone = FakeStage("keep"), FakeStage("gone", [job])
    rec = Recorder()
    sup = supervisor([keep, gone], rec)
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        with anyio.fail_after(5):
            assert await sup.remove("gone") is gone
        await settle()
        assert gone.runs == 1 and gone.cancelled_runs == 1  # ended, and not started again
        assert rec.restarted == [] and not sup.gave_up
        assert list(sup.stages) == ["keep"] and "gone" not in sup.restart_count
        assert [o.code for o in sink.outcomes["j"]] == [Code.UNAVAILABLE]
        with pytest.raises(KeyError):
            await sup.remove("gone")
        with pytest.raises(KeyError):
            sup.kill("gone")
        await sup.add(FakeStage("gone"))  # the name can come back (a model file published again)
        keep.crash()  # the others are still supervised
        with anyio.fail_after(5):
            await keep.wait_started(2)
        await shutdown(sup, tg)
