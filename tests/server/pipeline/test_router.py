"""The router (server/pipeline/stages/router.py): results reach their job, which completes once, after its last piece."""

from __future__ import annotations

import pytest

from engine.registry import ServedModel
from server.pipeline.jobs import Outcome
from server.pipeline.links import Link
from server.pipeline.stages import ImageDone, Router
from server.pipeline.statuses import Code
from tests.server.pipeline.stage_kit import RecordingRecipient, image_job, results_of, running

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


async def test_results_reach_their_job_and_it_completes_once_after_its_last_piece(digits: ServedModel) -> None:
    sink = RecordingRecipient()
    inbox: Link[ImageDone] = Link("router", 16)
    a = image_job(digits, sink, "a", 5, seed=1)
    b = image_job(digits, sink, "b", 2, seed=2)
    a_parts, b_parts = results_of(a, 3), results_of(b, 2)
    assert len(a_parts) == 2 and len(b_parts) == 1
    async with running(Router(inbox)):
        await inbox.put(a_parts[0])
        await inbox.put(b_parts[0])
        await sink.outcome(b)
        # a's first piece was routed before b's; a is not complete yet
        assert sink.items["a"] == [a_parts[0].result] and not a.done and "a" not in sink.outcomes
        assert a.sent == 3
        await inbox.put(a_parts[1])
        assert await sink.outcome(a) == Outcome(reason="complete")
        # a stray piece after the end neither reaches the recipient nor ends the job again
        await inbox.put(a_parts[1])
        c = image_job(digits, sink, "c", 1, seed=3)
        await inbox.put(results_of(c, 1)[0])
        await sink.outcome(c)
    assert sink.items["a"] == [p.result for p in a_parts]
    assert sink.items["b"] == [b_parts[0].result]
    assert sink.outcomes == {"a": [Outcome()], "b": [Outcome()], "c": [Outcome()]}
    assert a.sent == 5 and b.sent == 2


async def test_the_router_drops_pieces_of_finished_jobs(digits: ServedModel) -> None:
    sink = RecordingRecipient()
    inbox: Link[ImageDone] = Link("router", 16)
    gone = image_job(digits, sink, "gone", 2)
    parts = results_of(gone, 2)
    gone.fail(Code.DEADLINE_EXCEEDED, "deadline passed")
    after = image_job(digits, sink, "after", 1)
    async with running(Router(inbox)):
        await inbox.put(parts[0])
        await inbox.put(results_of(after, 1)[0])
        await sink.outcome(after)
    assert "gone" not in sink.items
    assert [o.code for o in sink.outcomes["gone"]] == [Code.DEADLINE_EXCEEDED]
