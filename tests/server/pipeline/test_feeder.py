"""The feeder (server/pipeline/stages/feeder.py): tokens reach their job, a cancel leaves the decode
loop, a restart loses no sequence."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import anyio
import pytest

from engine.decode import TokenEvent
from engine.engine import Engine
from engine.registry import ModelRegistry, ServedModel
from engine.sampling import SamplingParams
from server.pipeline.jobs import Job, Outcome
from server.pipeline.links import Link
from server.pipeline.stages import Feeder
from server.pipeline.stages.names import ModelStage
from server.pipeline.statuses import Code
from server.pipeline.supervisor import Supervisor
from tests.server.pipeline.stage_kit import WAIT, RecordingRecipient, running, settle, sync_text, text_job

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


async def test_tokens_reach_their_job_and_it_ends_with_length(engine: Engine, registry: ModelRegistry, text_model: ServedModel) -> None:
    sink = RecordingRecipient()
    inbox: Link[Job] = Link("text", 8)
    settings = {"x": SamplingParams(seed=1, max_new_tokens=7), "y": SamplingParams(seed=2, max_new_tokens=40, temperature=0.8)}
    jobs = [text_job(text_model, sink, name, "ROMEO:", p) for name, p in settings.items()]
    for job in jobs:
        await inbox.put(job)
    async with running(Feeder("text", ModelStage.TEXT, inbox, engine, registry, max_pending=4)):
        for job in jobs:
            assert await sink.outcome(job) == Outcome(reason="length")
    for job in jobs:
        params = settings[job.id]
        events = sink.items[job.id]
        assert len({ev.handle.id for ev in events}) == 1  # one sequence each
        assert len(events) == params.max_new_tokens and job.sent == params.max_new_tokens
        assert "".join(ev.text for ev in events) == sync_text(text_model, "ROMEO:", params)
        assert job.seed == params.seed
        assert len(sink.outcomes[job.id]) == 1


async def test_a_cancelled_text_job_leaves_the_decode_loop(
    engine: Engine, registry: ModelRegistry, text_model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = RecordingRecipient()
    inbox: Link[Job] = Link("text", 8)
    feeder = Feeder("text", ModelStage.TEXT, inbox, engine, registry, max_pending=4)
    loop = asyncio.get_running_loop()
    raw: list[TokenEvent | BaseException] = []  # what the decode thread sent, before the job filters it
    ended = asyncio.Event()
    make_listener = feeder._on_event

    def spying_listener(job: Job) -> Callable[[TokenEvent | BaseException], None]:
        inner = make_listener(job)

        def sink_(event: TokenEvent | BaseException) -> None:
            inner(event)
            raw.append(event)
            if isinstance(event, BaseException) or event.finished:
                loop.call_soon_threadsafe(ended.set)

        return sink_

    monkeypatch.setattr(feeder, "_on_event", spying_listener)
    job = text_job(text_model, sink, "long", "A", SamplingParams(seed=3, max_new_tokens=4096))
    await inbox.put(job)
    async with running(feeder):
        await sink.until(lambda: bool(sink.items.get("long")))
        assert job.fail(Code.CANCELLED, "client went away")
        seen = len(sink.items["long"])
        with anyio.fail_after(WAIT):
            await ended.wait()
        await settle()
        last = raw[-1]
        assert isinstance(last, TokenEvent) and last.finish_reason == "cancelled"
        assert last.n_generated < 4096
        worker = engine.decode_thread(text_model)
        assert not worker.loop.has_work and worker.loop.active_count == 0
        assert len(sink.items["long"]) == seen  # nothing reached the caller after the cancel
    assert [o.code for o in sink.outcomes["long"]] == [Code.CANCELLED]


async def test_an_invalid_prompt_fails_invalid_argument_and_the_feeder_goes_on(
    engine: Engine, registry: ModelRegistry, text_model: ServedModel
) -> None:
    sink = RecordingRecipient()
    inbox: Link[Job] = Link("text", 8)
    bad = text_job(text_model, sink, "bad", "ROMEO: \u00e9", SamplingParams(max_new_tokens=5))
    good = text_job(text_model, sink, "good", "A", SamplingParams(seed=1, max_new_tokens=5))
    await inbox.put(bad)
    await inbox.put(good)
    async with running(Feeder("text", ModelStage.TEXT, inbox, engine, registry, max_pending=4)):
        outcome = await sink.outcome(bad)
        assert outcome.code == Code.INVALID_ARGUMENT and "vocabulary" in outcome.message
        assert await sink.outcome(good) == Outcome(reason="length")
    assert "bad" not in sink.items


async def test_sequences_keep_streaming_while_a_killed_feeder_restarts(
    engine: Engine, registry: ModelRegistry, text_model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = RecordingRecipient()
    inbox: Link[Job] = Link("text", 8)
    feeder = Feeder("text", ModelStage.TEXT, inbox, engine, registry, max_pending=4)
    restarted = asyncio.Event()
    sup = Supervisor([feeder], on_restart=lambda stage: restarted.set())
    params = SamplingParams(seed=9, max_new_tokens=300)
    job = text_job(text_model, sink, "long", "A", params)
    worker = engine.decode_thread(text_model)  # the feeder will use this one
    resume = threading.Event()
    resume.set()
    step = worker.loop.step

    def held_step() -> list[TokenEvent]:
        resume.wait()  # lets the test hold the decode thread between steps
        return step()

    monkeypatch.setattr(worker.loop, "step", held_step)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            await inbox.put(job)
            await sink.until(lambda: bool(sink.items.get("long")))
            resume.clear()  # the sequence is mid-stream across the restart
            sup.kill(feeder.name)
            with anyio.fail_after(WAIT):
                await restarted.wait()
            assert not job.done
            resume.set()
            assert await sink.outcome(job) == Outcome(reason="length")
            after = text_job(text_model, sink, "after", "B", SamplingParams(seed=1, max_new_tokens=3))
            await inbox.put(after)  # the restarted feeder takes new work
            assert await sink.outcome(after) == Outcome(reason="length")
            sup.stop()
            tg.cancel_scope.cancel()
    finally:
        resume.set()
    assert "".join(ev.text for ev in sink.items["long"]) == sync_text(text_model, "A", params)


async def test_start_wait_is_the_oldest_waits_until_its_first_token(
    engine: Engine, registry: ModelRegistry, text_model: ServedModel
) -> None:
    """What admission reads for --text-wait-ms: a request queued in the inbox waits from its creation; once
    every request has its first token, nothing waits."""
    sink = RecordingRecipient()
    inbox: Link[Job] = Link("text", 8)
    feeder = Feeder("text", ModelStage.TEXT, inbox, engine, registry, max_pending=4)
    job = text_job(text_model, sink, "x", "ROMEO:", SamplingParams(seed=1, max_new_tokens=3))
    assert feeder.start_wait(job.created + 5.0) == 0.0  # nothing queued yet
    await inbox.put(job)
    assert feeder.start_wait(job.created + 5.0) == pytest.approx(5.0)
    async with running(feeder):
        assert await sink.outcome(job) == Outcome(reason="length")
    assert feeder.start_wait(job.created + 5.0) == 0.0
