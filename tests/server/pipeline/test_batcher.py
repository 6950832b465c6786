"""The pipeline core: bounded links with demand, the stages on tiny real models, admission."""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import anyio
import numpy as np
import pytest
import torch

from engine.decode import DecodeBatch, SequenceRequest, TokenEvent
from engine.engine import Engine
from engine.errors import EngineError
from engine.images import ImageChunk, ImageRequest, ImageResult
from engine.modelfile import export_model
from engine.models.transformer import CharTransformer, TransformerConfig
from engine.models.vae import VAE, VAEConfig
from engine.registry import ModelRegistry, ServedModel
from engine.sampling import SamplingParams
from server.config import ServerConfig
from server.metrics import Metrics
from server.pipeline.core import Pipeline
from server.pipeline.jobs import Job, Outcome, Rpc
from server.pipeline.links import Link
from server.pipeline.stages import Batcher, ImageDone, ImageWork, Processor, Producer, Router, Stage, TextFeeder
from server.pipeline.stages.batcher import BatchWindow
from server.pipeline.statuses import Code, Refused
from server.pipeline.supervisor import Supervisor

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

VOCAB = "\n !,.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
WAIT = 5.0  # seconds: generous bound for anything that should happen "at once"


# -- helpers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    text = CharTransformer(TransformerConfig(vocab_size=len(VOCAB), block_size=32, n_layer=1, n_head=2, d_model=16, d_ff=32, dropout=0.0))
    export_model(folder / "text.safetensors", "char-transformer", text, vocab=VOCAB)
    export_model(folder / "digits.safetensors", "vae", VAE(VAEConfig(hidden_dim=8, latent_dim=4)))
    return ModelRegistry.from_folder(folder)


@pytest.fixture
def digits(registry: ModelRegistry) -> ServedModel:
    return registry.get("digits")


@pytest.fixture
def text_model(registry: ModelRegistry) -> ServedModel:
    return registry.get("text")


@pytest.fixture
def engine() -> Iterator[Engine]:
    e = Engine(ServerConfig(decode_batch=4, decode_pending=4, max_new_tokens=4096).engine_limits())  # long sequences to cancel
    yield e
    e.close()


class RecordingRecipient:
    """A job recipient that records what each job emitted and every terminal outcome (exactly one is expected)."""

    def __init__(self) -> None:
        self.items: dict[str, list[Any]] = {}
        self.outcomes: dict[str, list[Outcome]] = {}
        self._changed = asyncio.Event()

    def emit(self, job: Job, item: ImageResult | TokenEvent) -> None:
        self.items.setdefault(job.id, []).append(item)
        self._changed.set()

    def finish(self, job: Job, outcome: Outcome) -> None:
        self.outcomes.setdefault(job.id, []).append(outcome)
        self._changed.set()

    async def until(self, condition: Callable[[], bool], timeout: float = WAIT) -> None:
        with anyio.fail_after(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def outcome(self, job: Job, timeout: float = WAIT) -> Outcome:
        await self.until(lambda: job.id in self.outcomes, timeout)
        return self.outcomes[job.id][0]


class FakeEngine:
    """Records each image batch (its chunks); optionally blocks on a gate or raises; else runs the real model."""

    def __init__(self, gate: asyncio.Event | None = None, failures: Sequence[BaseException] = ()) -> None:
        self.calls: list[list[ImageChunk]] = []
        self.active = 0
        self.max_active = 0
        self.gate = gate
        self.failures = list(failures)
        self.changed = asyncio.Event()

    @property
    def sizes(self) -> list[list[int]]:
        return [[c.n for c in call] for call in self.calls]

    def preferred_batch(self, served: ServedModel) -> int:
        assert served.images is not None
        return served.images.tile

    async def generate_images(self, served: ServedModel, chunks: Sequence[ImageChunk]) -> list[ImageResult]:
        self.calls.append(list(chunks))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.changed.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.failures:
                raise self.failures.pop(0)
            assert served.images is not None
            return served.images.run(list(chunks))
        finally:
            self.active -= 1
            self.changed.set()

    async def until(self, condition: Callable[[], bool], timeout: float = WAIT) -> None:
        with anyio.fail_after(timeout):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


def image_job(served: ServedModel, sink: RecordingRecipient, job_id: str, n: int, seed: int | None = 1, **kw: Any) -> Job:
    return Job(job_id, Rpc.GENERATE, served, sink, 0.0, image=ImageRequest(n=n, seed=seed, request_id=job_id, **kw))


def text_job(served: ServedModel, sink: RecordingRecipient, job_id: str, prompt: str, params: SamplingParams) -> Job:
    return Job(job_id, Rpc.GENERATE, served, sink, 0.0, text=SequenceRequest(prompt, params, job_id))


def pieces(job: Job, size: int | None = None) -> list[ImageWork]:
    """The job's prepared work, as a processor would make it."""
    assert job.image is not None and job.served.images is not None
    whole = job.served.images.prepare(job.image)
    job.seed = whole.seed
    job.chunks = whole.split(size) if size is not None else [whole]
    return [ImageWork(job, c) for c in job.chunks]


def make_batcher(engine: FakeEngine | Engine, inbox: Link[ImageWork], out: Link[ImageDone], **kw: Any) -> Batcher:
    settings: dict[str, Any] = {"batch_size": 8, "batch_timeout": 10.0, "concurrency": 1, **kw}
    return Batcher("digits", inbox, out, cast(Engine, engine), **settings)


async def take_n(link: Link[Any], n: int, timeout: float = WAIT) -> list[Any]:
    items: list[Any] = []
    with anyio.fail_after(timeout):
        while len(items) < n:
            items += await link.take(n - len(items))
    return items


async def settle(rounds: int = 100) -> None:
    """Let every ready task run until it blocks (no timers involved)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


@asynccontextmanager
async def running(*stages: Stage) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for stage in stages:
            await tg.start(stage.run)
        yield
        tg.cancel_scope.cancel()


def sync_text(served: ServedModel, prompt: str, params: SamplingParams) -> str:
    loop = DecodeBatch.from_loaded(served.model, max_batch=1)
    loop.add(SequenceRequest(prompt, params))
    return "".join(ev.text for ev in loop.run_until_idle())


# -- Link -------------------------------------------------------------------------------------------


async def test_take_returns_at_most_the_demand_in_fifo_order() -> None:
    link: Link[int] = Link("l", 10)
    for i in range(5):
        assert link.offer(i)
    assert await link.take(2) == [0, 1]
    assert await link.take(10) == [2, 3, 4]  # what is there, without waiting for more
    assert len(link) == 0
    assert link.take_nowait(3) == []


async def test_take_waits_for_the_first_item() -> None:
    link: Link[str] = Link("l", 4)
    taker = asyncio.create_task(link.take(3))
    await settle()
    assert not taker.done()
    await link.put("a")
    with anyio.fail_after(WAIT):
        assert await taker == ["a"]


async def test_a_cancelled_take_loses_nothing() -> None:
    link: Link[int] = Link("l", 4)
    taker = asyncio.create_task(link.take(1))
    await settle()
    taker.cancel()
    link.offer(7)  # offered while the cancelled taker is still being woken
    with pytest.raises(asyncio.CancelledError):
        await taker
    assert await link.take(1) == [7]


async def test_offer_refuses_when_full_and_loses_nothing() -> None:
    link: Link[int] = Link("l", 3)
    assert [link.offer(i) for i in range(5)] == [True, True, True, False, False]
    assert link.full and len(link) == 3
    assert await link.take(10) == [0, 1, 2]
    assert link.offer(9)
    assert link.take_nowait(5) == [9]


async def test_put_waits_while_full_and_resumes_when_a_consumer_takes() -> None:
    link: Link[int] = Link("l", 2)
    await link.put(0)
    await link.put(1)
    producer = asyncio.create_task(link.put(2))
    await settle()
    assert not producer.done()  # back-pressure: the producer is held back
    assert len(link) == 2
    assert await link.take(1) == [0]
    with anyio.fail_after(WAIT):
        await producer
    assert await link.take(5) == [1, 2]


async def test_put_from_hands_over_a_group_in_order_as_room_allows() -> None:
    link: Link[int] = Link("l", 3)
    pending = collections.deque(range(5))
    producer = asyncio.create_task(link.put_from(pending))
    await settle()
    assert not producer.done()  # back-pressure: 3 fit, 2 wait in the producer's own deque
    assert list(pending) == [3, 4] and len(link) == 3
    assert await link.take(2) == [0, 1]
    with anyio.fail_after(WAIT):
        await producer
    assert not pending
    assert await link.take(10) == [2, 3, 4]


async def test_a_cancelled_put_from_keeps_what_it_did_not_hand_over() -> None:
    link: Link[int] = Link("l", 2)
    pending = collections.deque(range(4))
    producer = asyncio.create_task(link.put_from(pending))
    await settle()
    producer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await producer
    assert list(pending) == [2, 3]  # the supervisor can still see (and fail) them
    assert link.take_nowait(5) == [0, 1]


async def test_a_group_wakes_every_waiting_consumer_it_can_feed() -> None:
    link: Link[int] = Link("l", 8)
    takers = [asyncio.create_task(link.take(1)) for _ in range(3)]
    await settle()
    await link.put_from(collections.deque([1, 2]))
    await settle()
    assert sorted(t.result()[0] for t in takers if t.done()) == [1, 2]  # two items: two consumers run
    link.offer(3)
    with anyio.fail_after(WAIT):
        assert await asyncio.gather(*takers) == [[1], [2], [3]]


async def test_a_consumer_cancelled_after_its_wake_up_passes_it_on() -> None:
    link: Link[int] = Link("l", 4)
    first = asyncio.create_task(link.take(1))
    second = asyncio.create_task(link.take(1))
    await settle()
    link.offer(7)  # wakes `first` ...
    first.cancel()  # ... which is cancelled before it runs: the item must reach `second`
    with pytest.raises(asyncio.CancelledError):
        await first
    with anyio.fail_after(WAIT):
        assert await second == [7]


async def test_a_demand_below_one_is_refused_and_takes_nothing() -> None:
    link: Link[int] = Link("l", 4)
    link.offer(1)
    for demand in (0, -1):
        with pytest.raises(ValueError, match=rf"^link l: demand must be >= 1, got {demand}$"):
            await link.take(demand)
    assert len(link) == 1  # the item is still there
    assert await link.take(1) == [1]


async def test_a_link_needs_room() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Link("l", 0)


# -- Batcher ----------------------------------------------------------------------------------------


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
    async with running(make_batcher(engine, inbox, out, batch_size=8, batch_timeout=10.0, in_flight=lambda: unfinished[0])):
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


# -- Processor --------------------------------------------------------------------------------------


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


# -- Router -----------------------------------------------------------------------------------------


def results_of(job: Job, size: int) -> list[ImageDone]:
    assert job.served.images is not None
    return [ImageDone(job, r) for r in job.served.images.run([w.chunk for w in pieces(job, size)])]


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


# -- Producer ---------------------------------------------------------------------------------------


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


# -- TextFeeder -------------------------------------------------------------------------------------


async def test_tokens_reach_their_job_and_it_ends_with_length(engine: Engine, registry: ModelRegistry, text_model: ServedModel) -> None:
    sink = RecordingRecipient()
    inbox: Link[Job] = Link("text", 8)
    settings = {"x": SamplingParams(seed=1, max_new_tokens=7), "y": SamplingParams(seed=2, max_new_tokens=40, temperature=0.8)}
    jobs = [text_job(text_model, sink, name, "ROMEO:", p) for name, p in settings.items()]
    for job in jobs:
        await inbox.put(job)
    async with running(TextFeeder("text", inbox, engine, registry, max_pending=4)):
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
    feeder = TextFeeder("text", inbox, engine, registry, max_pending=4)
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
    async with running(TextFeeder("text", inbox, engine, registry, max_pending=4)):
        outcome = await sink.outcome(bad)
        assert outcome.code == Code.INVALID_ARGUMENT and "vocabulary" in outcome.message
        assert await sink.outcome(good) == Outcome(reason="length")
    assert "bad" not in sink.items


async def test_sequences_keep_streaming_while_a_killed_feeder_restarts(
    engine: Engine, registry: ModelRegistry, text_model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = RecordingRecipient()
    inbox: Link[Job] = Link("text", 8)
    feeder = TextFeeder("text", inbox, engine, registry, max_pending=4)
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


# -- Pipeline.admit ---------------------------------------------------------------------------------


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
