"""The batcher (server/pipeline/stages/batcher.py): when a batch closes, how many run at once, what fails with it, and its window."""

from __future__ import annotations

import asyncio
import collections

import anyio
import pytest

from engine.errors import EngineError
from engine.registry import ServedModel
from server.pipeline.links import Link
from server.pipeline.stages import ImageDone, ImageWork
from server.pipeline.stages.batcher import BatchWindow
from server.pipeline.statuses import Code
from server.pipeline.supervisor import Supervisor
from tests.server.pipeline.stage_kit import WAIT, FakeEngine, RecordingRecipient, image_job, make_batcher, pieces, running, settle, take_n

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


class FakeClocks:
    """A loop thread's CPU clock and the wall clock, moved by hand."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.wall = 0.0

    def advance(self, wall_s: float, busy: float) -> None:
        self.wall += wall_s
        self.cpu += wall_s * busy


async def test_the_batch_window_stretches_only_while_the_loop_is_saturated() -> None:
    clocks = FakeClocks()
    window = BatchWindow(0.002, cpu=lambda: clocks.cpu, wall=lambda: clocks.wall, stretch=4.0)
    for _ in range(20):  # a loop with time to spare: the configured window
        clocks.advance(0.01, busy=0.3)
        assert window.next() == 0.002
    for _ in range(20):  # saturated: up to 4x
        clocks.advance(0.01, busy=1.0)
        window.next()
    assert window.current_s == pytest.approx(0.008)
    for _ in range(20):  # the load goes: back to the configured window
        clocks.advance(0.01, busy=0.1)
        window.next()
    assert window.current_s == 0.002


async def test_a_full_batch_closes_without_waiting_for_the_timeout(digits: ServedModel) -> None:
    sink = RecordingRecipient()
    engine = FakeEngine()
    inbox: Link[ImageWork] = Link("in", 16)
    out: Link[ImageDone] = Link("out", 16)
    a, b = image_job(digits, sink, "a", 4, seed=1), image_job(digits, sink, "b", 4, seed=2)
    async with running(make_batcher(engine, inbox, out, batch_size=8, batch_timeout=10.0)):
        await inbox.put(pieces(a)[0])
        await settle()
        assert engine.calls == []  # half full: the batcher waits for more
        await inbox.put(pieces(b)[0])
        done = await take_n(out, 2)  # well before the 10 s timeout
    assert engine.sizes == [[4, 4]]
    assert [d.job for d in done] == [a, b]
    for d in done:
        assert d.result.pixels.shape == (4, 28, 28)
        assert d.result.seed == d.job.seed


async def test_a_partial_batch_closes_after_the_timeout(digits: ServedModel) -> None:
    sink = RecordingRecipient()
    engine = FakeEngine()
    inbox: Link[ImageWork] = Link("in", 16)
    out: Link[ImageDone] = Link("out", 16)
    job = image_job(digits, sink, "a", 3)
    loop = asyncio.get_running_loop()
    async with running(make_batcher(engine, inbox, out, batch_size=8, batch_timeout=0.05)):
        started = loop.time()
        await inbox.put(pieces(job)[0])
        (done,) = await take_n(out, 1)
        elapsed = loop.time() - started
    assert engine.sizes == [[3]]
    assert done.job is job
    assert 0.03 <= elapsed < WAIT  # it waited for the timeout (about 0.05 s), not for a full batch


async def test_a_batch_with_nobody_else_to_wait_for_closes_at_once(digits: ServedModel) -> None:
    """Every unfinished request of the server is in the batch: the window would only add latency."""
    sink = RecordingRecipient()
    engine = FakeEngine()
    inbox: Link[ImageWork] = Link("in", 16)
    out: Link[ImageDone] = Link("out", 16)
    unfinished = [1]  # what the pipeline's in-flight count says
    async with running(make_batcher(engine, inbox, out, batch_size=8, batch_timeout=10.0, inflight=lambda: unfinished[0])):
        alone = image_job(digits, sink, "alone", 3)
        await inbox.put_from(collections.deque(pieces(alone, size=2)))  # a job in two pieces counts once
        (first, second) = await take_n(out, 2)  # well before the 10 s window
        assert engine.sizes == [[2, 1]] and first.job is second.job is alone

        unfinished[0] = 2  # another request is on its way: the batch waits for it ...
        a, b = image_job(digits, sink, "a", 1), image_job(digits, sink, "b", 1)
        await inbox.put(pieces(a)[0])
        await settle()
        assert len(engine.sizes) == 1
        await inbox.put(pieces(b)[0])  # ... and closes as it joins: nothing else can come (a closed loop's round)
        done = await take_n(out, 2)
        assert engine.sizes[1] == [1, 1] and {d.job for d in done} == {a, b}

        unfinished[0] = 3  # a third is on its way (accepted, not yet admitted: Pipeline.calls_in_progress)
        c, d = image_job(digits, sink, "c", 1), image_job(digits, sink, "d", 1)
        await inbox.put(pieces(c)[0])
        await inbox.put(pieces(d)[0])
        await settle()
        assert len(engine.sizes) == 2  # a batch of 2 out of 8: still within its window


async def test_the_batch_timeout_counts_from_its_first_piece(digits: ServedModel) -> None:
    """Pieces keep arriving more often than the timeout: the batch must still close about one timeout
    after its first piece, not wait for a quiet spell (that would hold it until the stream stops)."""
    sink = RecordingRecipient()
    engine = FakeEngine()
    inbox: Link[ImageWork] = Link("in", 64)
    out: Link[ImageDone] = Link("out", 64)
    sent = 0
    async with running(make_batcher(engine, inbox, out, batch_size=200, batch_timeout=0.2)):
        while not engine.calls and sent < 40:  # one piece every 0.05 s for up to 2 s
            await inbox.put(pieces(image_job(digits, sink, f"j{sent}", 1))[0])
            sent += 1
            await asyncio.sleep(0.05)
        await engine.until(lambda: bool(engine.calls))
    assert len(engine.calls[0]) < 20  # about 4 when the timer runs from the first piece; 40 if it restarted


async def test_a_piece_that_does_not_fit_opens_the_next_batch(digits: ServedModel) -> None:
    sink = RecordingRecipient()
    engine = FakeEngine()
    inbox: Link[ImageWork] = Link("in", 16)
    out: Link[ImageDone] = Link("out", 16)
    jobs = [image_job(digits, sink, "a", 5, seed=1), image_job(digits, sink, "b", 5, seed=2), image_job(digits, sink, "c", 3, seed=3)]
    for job in jobs:
        inbox.offer(pieces(job)[0])
    async with running(make_batcher(engine, inbox, out, batch_size=8, batch_timeout=10.0)):
        done = await take_n(out, 3)  # none of these batches waits for the 10 s timeout
    assert engine.sizes == [[5], [5, 3]]  # b does not fit next to a: it and c open the next batch, in order
    assert [c for call in engine.calls for c in call] == [j.chunks[0] for j in jobs]
    assert [d.job for d in done] == jobs


async def test_at_most_concurrency_batches_run_at_once(digits: ServedModel) -> None:
    sink = RecordingRecipient()
    gate = asyncio.Event()
    engine = FakeEngine(gate)
    inbox: Link[ImageWork] = Link("in", 16)
    out: Link[ImageDone] = Link("out", 16)
    jobs = [image_job(digits, sink, f"j{i}", 1, seed=i) for i in range(5)]
    for job in jobs:
        inbox.offer(pieces(job)[0])
    batcher = make_batcher(engine, inbox, out, batch_size=1, concurrency=2)
    async with running(batcher):
        await engine.until(lambda: engine.active == 2)
        await settle()
        assert engine.active == 2 and len(engine.calls) == 2  # the third batch waits for a slot
        assert len(batcher.running) == 2
        assert len(inbox) + len(batcher.pending) == 3  # nothing else was taken
        gate.set()
        done = await take_n(out, 5)
    assert engine.max_active == 2
    assert engine.sizes == [[1]] * 5
    assert {d.job for d in done} == set(jobs)


async def test_finished_jobs_are_not_sent_to_the_engine(digits: ServedModel) -> None:
    sink = RecordingRecipient()
    engine = FakeEngine()
    inbox: Link[ImageWork] = Link("in", 16)
    out: Link[ImageDone] = Link("out", 16)
    cancelled, live, expired = (image_job(digits, sink, name, 1) for name in ("cancelled", "live", "expired"))
    all_done = [image_job(digits, sink, f"gone{i}", 1) for i in range(3)]
    last = image_job(digits, sink, "last", 3)
    for job in [cancelled, live, expired, *all_done, last]:
        inbox.offer(pieces(job)[0])
    cancelled.fail(Code.CANCELLED, "client went away")
    expired.fail(Code.DEADLINE_EXCEEDED, "deadline passed")
    for job in all_done:
        job.fail(Code.CANCELLED, "client went away")
    async with running(make_batcher(engine, inbox, out, batch_size=3)):
        done = await take_n(out, 2)  # batches: [cancelled, live, expired], [gone0..2], [last]
    assert [d.job for d in done] == [live, last]
    assert engine.calls == [[live.chunks[0]], [last.chunks[0]]]  # a batch of finished jobs costs no call at all
    assert sink.outcomes["cancelled"][0].code == Code.CANCELLED  # untouched
    assert sink.outcomes["expired"][0].code == Code.DEADLINE_EXCEEDED


async def test_an_engine_error_fails_its_batch_unavailable_and_the_batcher_goes_on(digits: ServedModel) -> None:
    sink = RecordingRecipient()
    engine = FakeEngine(failures=[EngineError("generation failed in digits: RuntimeError"), ValueError("bad batch")])
    inbox: Link[ImageWork] = Link("in", 16)
    out: Link[ImageDone] = Link("out", 16)
    a1, a2, b, c = (image_job(digits, sink, name, 1, seed=i) for i, name in enumerate(("a1", "a2", "b", "c")))
    for job in (a1, a2, b, c):
        inbox.offer(pieces(job)[0])
    batcher = make_batcher(engine, inbox, out, batch_size=2)
    async with running(batcher):
        # batches: [a1, a2] -> EngineError, [b, c] -> ValueError; then a good one
        for job in (a1, a2):
            outcome = await sink.outcome(job)
            assert outcome.code == Code.UNAVAILABLE
            assert "generation failed" in outcome.message and "retried" in outcome.message
        for job in (b, c):
            assert (await sink.outcome(job)).code == Code.INVALID_ARGUMENT
        d = image_job(digits, sink, "d", 2)
        await inbox.put(pieces(d)[0])
        (done,) = await take_n(out, 1)
        assert done.job is d and done.result.pixels.shape == (2, 28, 28)
        await settle()
        assert batcher.running == {}
    assert engine.sizes == [[1, 1], [1, 1], [2]]
    assert all(len(v) == 1 for v in sink.outcomes.values())
    assert "d" not in sink.outcomes  # the batcher does not finish jobs; the router does


@pytest.mark.parametrize("fault", ["engine raises", "kill"])
async def test_jobs_of_a_running_batch_fail_unavailable_when_the_batcher_dies(digits: ServedModel, fault: str) -> None:
    sink = RecordingRecipient()
    gate = asyncio.Event()
    engine = FakeEngine(gate, failures=[RuntimeError("not an EngineError")] if fault == "engine raises" else [])
    inbox: Link[ImageWork] = Link("in", 16)
    out: Link[ImageDone] = Link("out", 16)
    batcher = make_batcher(engine, inbox, out, batch_size=2)
    restarted = asyncio.Event()
    sup = Supervisor([batcher], on_restart=lambda stage: restarted.set())
    job = image_job(digits, sink, "a", 2)
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        await inbox.put(pieces(job)[0])
        await engine.until(lambda: engine.active == 1)
        if fault == "kill":
            sup.kill(batcher.name)
        else:
            gate.set()
        with anyio.fail_after(WAIT):
            await restarted.wait()
        await settle()
        try:
            assert job.done, "the job of the batch that was running is left unfinished"
            assert sink.outcomes["a"][0].code == Code.UNAVAILABLE
        finally:
            sup.stop()
            tg.cancel_scope.cancel()


async def test_a_killed_idle_batcher_is_restarted_and_serves_again(digits: ServedModel) -> None:
    sink = RecordingRecipient()
    engine = FakeEngine()
    inbox: Link[ImageWork] = Link("in", 16)
    out: Link[ImageDone] = Link("out", 16)
    batcher = make_batcher(engine, inbox, out, batch_size=2)
    restarted = asyncio.Event()
    sup = Supervisor([batcher], on_restart=lambda stage: restarted.set())
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        await settle()
        sup.kill(batcher.name)
        with anyio.fail_after(WAIT):
            await restarted.wait()
        job = image_job(digits, sink, "after", 2)
        await inbox.put(pieces(job)[0])
        (done,) = await take_n(out, 1)
        assert done.job is job
        assert sup.restart_count[batcher.name] == 1
        sup.stop()
        tg.cancel_scope.cancel()
