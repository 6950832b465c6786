"""The producer (server/pipeline/stages/producer.py): live jobs forwarded in order, held back by a full
link, what it held failed when it is killed."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from engine.registry import ServedModel
from engine.sampling import SamplingParams
from server.pipeline.jobs import Job
from server.pipeline.links import Link
from server.pipeline.stages import Producer
from server.pipeline.statuses import Code
from server.pipeline.supervisor import Supervisor
from tests.server.pipeline.stage_kit import WAIT, RecordingRecipient, image_job, running, settle, take_n, text_job

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


async def test_the_producer_sends_text_straight_to_its_feeder_and_skips_finished_jobs(digits: ServedModel, text_model: ServedModel) -> None:
    sink = RecordingRecipient()
    ingress: Link[Job] = Link("ingress", 8)
    work: Link[Job] = Link("work", 8)
    texts: Link[Job] = Link("texts", 8)
    gone = text_job(text_model, sink, "gone", "A", SamplingParams(max_new_tokens=3))
    gone.fail(Code.CANCELLED, "client went away")
    t = text_job(text_model, sink, "t", "A", SamplingParams(max_new_tokens=3))
    img = image_job(digits, sink, "img", 2)
    for job in (gone, t, img):
        ingress.offer(job)
    async with running(Producer(ingress, work, {"text": texts})):
        assert await take_n(texts, 1) == [t]  # no processor on the way: a text job needs no preparing
        assert await take_n(work, 1) == [img]
    assert len(work) == 0 and len(texts) == 0


async def test_the_producer_forwards_live_jobs_in_order_and_skips_finished_ones(digits: ServedModel) -> None:
    sink = RecordingRecipient()
    ingress: Link[Job] = Link("ingress", 16)
    work: Link[Job] = Link("work", 16)
    jobs = [image_job(digits, sink, f"j{i}", 1) for i in range(6)]
    jobs[1].fail(Code.CANCELLED, "client went away")
    jobs[4].fail(Code.DEADLINE_EXCEEDED, "deadline passed")
    for job in jobs:
        ingress.offer(job)
    async with running(Producer(ingress, work)):
        forwarded = await take_n(work, 4)
        await settle()
        assert len(work) == 0 and len(ingress) == 0
    assert forwarded == [jobs[0], jobs[2], jobs[3], jobs[5]]


async def test_the_producer_is_held_back_by_a_full_link(digits: ServedModel) -> None:
    sink = RecordingRecipient()
    ingress: Link[Job] = Link("ingress", 16)
    work: Link[Job] = Link("work", 2)
    jobs = [image_job(digits, sink, f"j{i}", 1) for i in range(5)]
    for job in jobs:
        ingress.offer(job)
    producer = Producer(ingress, work)
    async with running(producer):
        await settle()
        assert len(work) == 2 and list(producer.holding()) == jobs[2:]  # it holds what it could not pass on
        assert await take_n(work, 5) == jobs


async def test_a_killed_producer_fails_what_it_held_and_forwards_the_rest_after_restart(digits: ServedModel) -> None:
    sink = RecordingRecipient()
    ingress: Link[Job] = Link("ingress", 16)
    work: Link[Job] = Link("work", 1)
    first = image_job(digits, sink, "first", 1)
    held = [image_job(digits, sink, f"held{i}", 1) for i in range(3)]
    for job in (first, *held):
        ingress.offer(job)
    producer = Producer(ingress, work)
    restarted = asyncio.Event()
    sup = Supervisor([producer], on_restart=lambda stage: restarted.set())
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        await settle()
        assert list(producer.holding()) == held  # taken from the ingress, blocked on the full link
        sup.kill(producer.name)
        with anyio.fail_after(WAIT):
            await restarted.wait()
        for job in held:
            assert [o.code for o in sink.outcomes[job.id]] == [Code.UNAVAILABLE]
        later = image_job(digits, sink, "later", 1)
        ingress.offer(later)
        assert await take_n(work, 2) == [first, later]  # the failed ones are not passed on
        sup.stop()
        tg.cancel_scope.cancel()
    assert "first" not in sink.outcomes and "later" not in sink.outcomes
