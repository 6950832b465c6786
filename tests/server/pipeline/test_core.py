"""The pipeline (server/pipeline/core.py): admission at its front door, deadlines, and every stage wired together."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import numpy as np
import pytest

from engine.engine import Engine
from engine.images import ImageRequest
from engine.registry import ModelRegistry, ServedModel
from engine.sampling import SamplingParams
from server.config import ServerConfig
from server.metrics import Metrics
from server.pipeline.core import Pipeline
from server.pipeline.jobs import Outcome
from server.pipeline.statuses import Code, Refused
from server.pipeline.supervisor import Supervisor
from tests.server.pipeline.stage_kit import WAIT, RecordingRecipient, image_job, sync_text, text_job

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


def make_pipeline(registry: ModelRegistry, engine: Engine, **config: Any) -> tuple[Pipeline, Metrics]:
    metrics = Metrics()
    return Pipeline(ServerConfig(**config), registry, engine, metrics), metrics


async def test_admit_refuses_beyond_max_inflight(registry: ModelRegistry, engine: Engine, digits: ServedModel) -> None:
    pipeline, _ = make_pipeline(registry, engine, max_inflight=2, queue_size=16)
    sink = RecordingRecipient()
    jobs = [image_job(digits, sink, f"j{i}", 1) for i in range(3)]
    pipeline.admit(jobs[0], None)
    pipeline.admit(jobs[1], None)
    with pytest.raises(Refused) as refused:
        pipeline.admit(jobs[2], None)
    assert refused.value.code == Code.RESOURCE_EXHAUSTED and "in flight" in refused.value.message
    assert pipeline.inflight == {jobs[0], jobs[1]} and len(pipeline.ingress) == 2
    assert jobs[2].tick == 0 and jobs[2].on_finish is None
    jobs[0].finish(Outcome())  # room again
    pipeline.admit(jobs[2], None)
    assert pipeline.inflight == {jobs[1], jobs[2]}
    assert pipeline.fail_all(Code.UNAVAILABLE, "test over") == 2


async def test_admit_takes_a_burst_up_to_max_inflight_whatever_the_queue_size(
    registry: ModelRegistry, engine: Engine, digits: ServedModel
) -> None:
    pipeline, _ = make_pipeline(registry, engine, max_inflight=5, queue_size=2)
    sink = RecordingRecipient()
    jobs = [image_job(digits, sink, f"j{i}", 1) for i in range(6)]
    for job in jobs[:5]:
        pipeline.admit(job, None)  # the ingress holds max_inflight; the links behind it hold queue_size
    with pytest.raises(Refused) as refused:
        pipeline.admit(jobs[5], None)
    assert refused.value.code == Code.RESOURCE_EXHAUSTED and "in flight" in refused.value.message
    assert jobs[5] not in pipeline.inflight and jobs[5].tick == 0
    assert pipeline.ingress.take_nowait(10) == jobs[:5] and pipeline.work.capacity == 2 and pipeline.ingress.capacity == 7
    pipeline.fail_all(Code.UNAVAILABLE, "test over")


async def test_admit_refuses_unavailable_when_not_accepting(registry: ModelRegistry, engine: Engine, digits: ServedModel) -> None:
    pipeline, _ = make_pipeline(registry, engine)
    pipeline.accepting = False
    job = image_job(digits, RecordingRecipient(), "j", 1)
    with pytest.raises(Refused) as refused:
        pipeline.admit(job, None)
    assert refused.value.code == Code.UNAVAILABLE
    assert not pipeline.inflight and len(pipeline.ingress) == 0


async def test_a_job_past_its_deadline_fails_and_leaves_inflight(registry: ModelRegistry, engine: Engine, digits: ServedModel) -> None:
    pipeline, metrics = make_pipeline(registry, engine, request_timeout_s=30.0)
    sink = RecordingRecipient()
    job = image_job(digits, sink, "slow", 1)
    other = image_job(digits, sink, "other", 1)
    pipeline.admit(job, 0.05)
    pipeline.admit(other, None)
    assert pipeline.inflight == {job, other}
    outcome = await sink.outcome(job)  # nothing runs the stages: only the timer can end it
    assert outcome.code == Code.DEADLINE_EXCEEDED
    assert pipeline.inflight == {other}
    labels = {"model": "digits", "rpc": "Generate", "code": "DEADLINE_EXCEEDED"}
    assert metrics.registry.get_sample_value("genserve_requests_total", labels) == 1
    assert not other.done  # 30 s away
    other.finish(Outcome())
    with anyio.fail_after(WAIT):
        await pipeline.wait_idle()
    assert sink.outcomes["slow"] == [outcome]


async def test_the_server_timeout_caps_the_requested_one(registry: ModelRegistry, engine: Engine, digits: ServedModel) -> None:
    pipeline, _ = make_pipeline(registry, engine, request_timeout_s=0.05)
    sink = RecordingRecipient()
    job = image_job(digits, sink, "j", 1)
    loop = asyncio.get_running_loop()
    before = loop.time()
    pipeline.admit(job, 3600.0)
    after = loop.time()
    assert before + 0.05 <= job.deadline <= after + 0.05  # the server's 0.05 s, not the hour asked for
    assert (await sink.outcome(job)).code == Code.DEADLINE_EXCEEDED
    assert not pipeline.inflight


async def test_the_whole_pipeline_serves_image_and_text_jobs(registry: ModelRegistry, engine: Engine, digits: ServedModel) -> None:
    pipeline, metrics = make_pipeline(registry, engine, batch_size=4, batch_timeout_ms=5.0, processors=2, queue_size=8)
    sink = RecordingRecipient()
    sup = Supervisor(pipeline.stages)
    big = image_job(digits, sink, "big", 10, seed=5)
    small = image_job(digits, sink, "small", 1, seed=6)
    text = text_job(registry.get("text"), sink, "text", "A", SamplingParams(seed=4, max_new_tokens=6))
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        for job in (big, small, text):
            pipeline.admit(job, None)
        for job in (big, small):
            assert await sink.outcome(job) == Outcome(reason="complete")
        assert await sink.outcome(text) == Outcome(reason="length")
        with anyio.fail_after(WAIT):
            await pipeline.wait_idle()
        sup.stop()
        tg.cancel_scope.cancel()
    assert digits.images is not None
    (direct,) = digits.images.generate([ImageRequest(n=10, seed=5)])
    got = sink.items["big"]
    assert [r.offset for r in got] == [0, 4, 8]  # pieces of at most batch_size, in order
    assert np.array_equal(np.concatenate([r.pixels for r in got]), direct.pixels)
    assert "".join(ev.text for ev in sink.items["text"]) == sync_text(registry.get("text"), "A", SamplingParams(seed=4, max_new_tokens=6))
    assert sup.restart_count == dict.fromkeys(sup.stages, 0)
    assert metrics.registry.get_sample_value("genserve_samples_total", {"model": "digits"}) == 11
