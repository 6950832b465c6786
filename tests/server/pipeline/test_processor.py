"""The processor (server/pipeline/stages/processor.py): requests split into pieces, seeds, refusals, finished jobs skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.engine import Engine
from engine.images import ImageRequest
from engine.registry import ServedModel
from engine.sampling import SamplingParams
from server.pipeline.jobs import Job
from server.pipeline.links import Link
from server.pipeline.stages import ImageWork, Processor, Producer
from server.pipeline.statuses import Code
from tests.server.pipeline.stage_kit import RecordingRecipient, image_job, running, settle, take_n, text_job

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


async def test_a_big_request_is_split_into_contiguous_pieces(digits: ServedModel) -> None:
    sink = RecordingRecipient()
    inbox: Link[Job] = Link("work", 8)
    images: Link[ImageWork] = Link("images", 8)
    job = image_job(digits, sink, "big", 10, seed=7)
    await inbox.put(job)
    async with running(Processor(0, inbox, {"digits": images}, Engine(), max_chunk=4)):
        works = await take_n(images, 3)
    assert all(w.job is job for w in works)
    chunks = [w.chunk for w in works]
    assert [c.n for c in chunks] == [4, 4, 2]
    assert [c.offset for c in chunks] == [0, 4, 8]
    assert {c.total for c in chunks} == {10} and {c.seed for c in chunks} == {7}
    assert job.chunks == chunks and job.seed == 7
    assert not job.done and "big" not in sink.outcomes


async def test_the_same_seed_gives_the_same_latents_whatever_the_split(digits: ServedModel) -> None:
    """The processor leaves the drawing to the engine; drawn in pieces, eagerly or inside the
    batch's graph, the latents and images are those of the whole request."""
    assert digits.images is not None
    whole = digits.images.prepare(ImageRequest(n=10, seed=123))
    expected = whole.z
    assert expected is not None
    (expected_result,) = digits.images.run([whole])
    for max_chunk in (1, 3, 4, 16):
        sink = RecordingRecipient()
        inbox: Link[Job] = Link("work", 8)
        images: Link[ImageWork] = Link("images", 16)
        job = image_job(digits, sink, "j", 10, seed=123)
        await inbox.put(job)
        async with running(Processor(0, inbox, {"digits": images}, Engine(), max_chunk=max_chunk)):
            works = await take_n(images, -(-10 // max_chunk))
        assert all(w.chunk.z is None for w in works)  # not drawn on the event loop
        results = digits.images.run([w.chunk for w in works])  # drawn inside the graph
        np.testing.assert_array_equal(np.concatenate([r.pixels for r in results]), expected_result.pixels)
        z = torch.cat([digits.images.draw(w.chunk).z for w in works])  # type: ignore[misc]
        assert torch.equal(z, expected), f"max_chunk={max_chunk}"


async def test_a_drawn_seed_is_recorded_on_the_job(digits: ServedModel) -> None:
    sink = RecordingRecipient()
    inbox: Link[Job] = Link("work", 8)
    images: Link[ImageWork] = Link("images", 8)
    job = image_job(digits, sink, "j", 6, seed=None)
    await inbox.put(job)
    async with running(Processor(0, inbox, {"digits": images}, Engine(), max_chunk=4)):
        works = await take_n(images, 2)
    assert {w.chunk.seed for w in works} == {job.seed}
    assert digits.images is not None
    drawn = torch.cat([digits.images.draw(w.chunk).z for w in works])  # type: ignore[misc]
    whole = digits.images.prepare(ImageRequest(n=6, seed=job.seed)).z
    assert whole is not None and torch.equal(drawn, whole)


async def test_a_model_without_a_link_fails_unavailable(digits: ServedModel, text_model: ServedModel) -> None:
    sink = RecordingRecipient()
    inbox: Link[Job] = Link("work", 8)
    ingress: Link[Job] = Link("ingress", 8)
    images: Link[ImageWork] = Link("images", 8)
    lost_image = image_job(digits, sink, "img", 2)
    lost_text = text_job(text_model, sink, "txt", "A", SamplingParams(max_new_tokens=3))
    await inbox.put(lost_image)
    ingress.offer(lost_text)
    async with running(Processor(0, inbox, {}, Engine(), max_chunk=4)), running(Producer(ingress, Link("work", 8), {})):
        for job in (lost_image, lost_text):
            outcome = await sink.outcome(job)
            assert outcome.code == Code.UNAVAILABLE and "not being served" in outcome.message
    assert len(images) == 0


async def test_invalid_image_requests_fail_invalid_argument(digits: ServedModel) -> None:
    sink = RecordingRecipient()
    inbox: Link[Job] = Link("work", 8)
    images: Link[ImageWork] = Link("images", 8)
    labelled = image_job(digits, sink, "labels", 2, labels=[1, 2])  # the VAE is unconditional
    empty = image_job(digits, sink, "zero", 0)
    good = image_job(digits, sink, "good", 1)
    for job in (labelled, empty, good):
        await inbox.put(job)
    async with running(Processor(0, inbox, {"digits": images}, Engine(), max_chunk=4)):
        (work,) = await take_n(images, 1)
        for job, field in ((labelled, "labels"), (empty, "n")):
            outcome = await sink.outcome(job)
            assert outcome.code == Code.INVALID_ARGUMENT and field in outcome.message
    assert work.job is good  # the bad ones put nothing on the link
    assert len(images) == 0


async def test_the_processor_skips_finished_jobs(digits: ServedModel) -> None:
    sink = RecordingRecipient()
    inbox: Link[Job] = Link("work", 8)
    images: Link[ImageWork] = Link("images", 8)
    gone = image_job(digits, sink, "gone", 2)
    gone.fail(Code.CANCELLED, "client went away")
    img = image_job(digits, sink, "img", 2)
    for job in (gone, img):
        await inbox.put(job)
    async with running(Processor(0, inbox, {"digits": images}, Engine(), max_chunk=4)):
        (work,) = await take_n(images, 1)
        await settle()
    assert work.job is img and gone.chunks == [] and len(images) == 0
