"""Overload end to end on localhost: a saturated server refuses at once with RESOURCE_EXHAUSTED and a
retry hint, no call ends CANCELLED, and the SDK's retries wait as long as the hint says.

Saturation is made deterministic, not timed: the engine's fault seam holds every image batch for a
while before it runs (so ``max_inflight`` is reached and stays reached), or the delay controller is
given samples of a standing queue while one request is held. Each test is bounded: a few dozen calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import grpc
import pytest
import pytest_asyncio

from clients import AsyncClient, RetryPolicy
from engine.faults import Faults
from engine.images import ImageChunk
from engine.registry import ServedModel
from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.grpc_edge.codes import RETRY_PUSHBACK_KEY
from server.runtime.app import GenServer
from tests.serving import running_server

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

MODELS = "models"
HINT_MS = 300  # the retry hint: the admission interval
QUICK_RETRIES = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.002)  # all in a few ms without the hint


def image(seed: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="vae", image=pb.ImageParams(n=1, seed=seed))


async def outcome(stub: pb_grpc.GeneratorStub, request: pb.GenerateRequest) -> tuple[grpc.StatusCode, dict[str, str]]:
    call = stub.Generate(request)
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code(), {k: v for k, v in (e.trailing_metadata() or ()) if isinstance(v, str)}
    return await call.code(), {}


async def until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def counter(server: GenServer, name: str, **labels: str) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


def stand_queue(server: GenServer) -> None:
    """Samples of a standing queue: jobs that waited a second, for longer than an interval."""
    codel = server.pipeline.admission.codel
    now = time.perf_counter()
    codel.observe(1.0, now - 2 * codel.interval)
    codel.observe(1.0, now)
    assert codel.shedding


class HoldBatches(Faults):
    """Every image batch waits ``seconds`` before it runs. (Not a long batch timeout: a batch with
    nobody else in flight no longer waits out its window.)"""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def before_image_batch(self, served: ServedModel, chunks: Sequence[ImageChunk]) -> None:
        await asyncio.sleep(self.seconds)


@asynccontextmanager
async def holding_server(seconds: float, max_inflight: int) -> AsyncIterator[GenServer]:
    async with running_server(models_dir=MODELS, max_inflight=max_inflight, admission_interval_ms=HINT_MS, log_level="warning") as srv:
        srv.engine.install_faults(HoldBatches(seconds))
        yield srv


@pytest_asyncio.fixture
async def held() -> AsyncIterator[GenServer]:
    """A server whose image batches wait 2 s before they run: admitted requests stay in flight that long."""
    async with holding_server(2.0, max_inflight=4) as srv:
        yield srv


async def test_a_saturated_server_refuses_at_once_with_a_hint_and_cancels_nothing(held: GenServer) -> None:
    async with grpc.aio.insecure_channel(held.address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        first = [asyncio.create_task(outcome(stub, image(i))) for i in range(4)]
        await until(lambda: len(held.pipeline.inflight) == 4)
        refused = await asyncio.gather(*(outcome(stub, image(i)) for i in range(4, 24)))  # answered while the 4 are held
        assert all(not t.done() for t in first)
        assert [code for code, _ in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 20
        assert all(trailers.get(RETRY_PUSHBACK_KEY) == str(HINT_MS) for _, trailers in refused)
        assert [code for code, _ in await asyncio.gather(*first)] == [grpc.StatusCode.OK] * 4
    # the server's own count agrees: 4 served, 20 refused, nothing cancelled
    assert counter(held, "genserve_requests_total", model="vae", rpc="Generate", code="OK") == 4
    assert counter(held, "genserve_rejections_total", rpc="Generate", code="RESOURCE_EXHAUSTED") == 20
    assert counter(held, "genserve_requests_total", model="vae", rpc="Generate", code="CANCELLED") == 0


async def test_a_standing_queue_sheds_plain_calls_with_a_hint_and_shrinks_stream_credit(
    held: GenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with grpc.aio.insecure_channel(held.address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        first = asyncio.create_task(outcome(stub, image(0)))
        await until(lambda: len(held.pipeline.inflight) == 1)
        stand_queue(held)
        monkeypatch.setattr(held.pipeline.admission.codel, "observe", lambda delay, now: None)  # it stays standing
        code, trailers = await outcome(stub, image(1))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and trailers[RETRY_PUSHBACK_KEY] == str(HINT_MS)
        stream = stub.GenerateStream()  # a stream's requests are admitted by its credit, which shrinks instead
        assert (await stream.read()).credits == 512
        await stream.write(pb.StreamRequest(requests=[pb.GenerateRequest(id="s", model="vae", image=pb.ImageParams(n=1))]))
        finishes: list[pb.Finish] = []
        credits = 0
        while not finishes:
            reply = await stream.read()
            finishes += [r.finish for r in reply.results if r.HasField("finish")]
            credits += reply.credits
        assert [f.code for f in finishes] == [0]
        assert credits == 0  # shedding: a stream may hold 128 of its 512 credits, it holds 511: none back
        await stream.done_writing()
        assert (await first)[0] == grpc.StatusCode.OK
    assert counter(held, "genserve_overload_refusals_total", reason="delay") == 1


async def test_the_sdk_waits_for_the_hint_before_retrying_a_plain_call() -> None:
    async with holding_server(0.1, max_inflight=1) as srv:
        async with AsyncClient(srv.address, retry=QUICK_RETRIES, timeout=30) as client:
            held = asyncio.create_task(client.generate_images("vae", 1, seed=0))
            await until(lambda: len(srv.pipeline.inflight) == 1)
            started = time.monotonic()
            result = await client.generate_images("vae", 1, seed=1)  # refused once, retried after the hint
            assert time.monotonic() - started >= HINT_MS / 1000
            assert result.shape == (1, 28, 28)
            await held
        assert counter(srv, "genserve_rejections_total", rpc="Generate", code="RESOURCE_EXHAUSTED") == 1


async def test_the_sdk_session_waits_for_the_hint_before_sending_a_refused_request_again() -> None:
    async with holding_server(0.1, max_inflight=1) as srv:
        async with AsyncClient(srv.address, retry=QUICK_RETRIES, timeout=30) as client:
            held = asyncio.create_task(client.generate_images("vae", 1, seed=0))
            await until(lambda: len(srv.pipeline.inflight) == 1)
            started = time.monotonic()
            async with client.session() as session:
                result = await session.submit_images("vae", 1, id="r", seed=1)  # refused for its id once, with the hint
            assert time.monotonic() - started >= HINT_MS / 1000
            assert result.images.shape == (1, 28, 28)
            await held
        assert counter(srv, "genserve_rejections_total", rpc="GenerateStream", code="RESOURCE_EXHAUSTED") == 1


async def test_calls_behind_a_long_loop_queue_are_refused_by_the_accept_path_and_nothing_else_is(held: GenServer) -> None:
    """The service's policy for server/grpc_edge/accept.py: while calls wait over target to start, on average, a
    Generate call that arrives behind others still waiting, or that waited over twice the target, is
    refused with the hint; other methods, and a call that finds nobody waiting, go on to their
    handlers; calls that start at once again end it."""
    from server.grpc_edge.service import GENERATE_PATH

    service, admission = held.service, held.pipeline.admission
    list_models = b"/genserve.v1.Generator/ListModels"
    for _ in range(10):  # calls that waited 1 s each to start
        admission.observe_arrival(1.0)
    assert admission.arrival.shedding(admission.clock())
    code, message, trailers = service.refusal_at_arrival(GENERATE_PATH, in_progress=1, queued_s=0.003) or (None, "", ())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "to start" in message
    assert dict(trailers)[RETRY_PUSHBACK_KEY] == str(HINT_MS)
    assert service.refusal_at_arrival(GENERATE_PATH, in_progress=0, queued_s=0.0) is None  # nobody waits in front of it
    assert service.refusal_at_arrival(list_models, in_progress=1, queued_s=0.003) is None
    assert service.refusal_at_handover(GENERATE_PATH, waited_s=1.0) is not None  # shedding, and it waited 1 s
    assert service.refusal_at_handover(GENERATE_PATH, waited_s=0.002) is None  # shedding, but it waited under 2x target
    assert counter(held, "genserve_rejections_total", rpc="Generate", code="RESOURCE_EXHAUSTED") == 2
    assert counter(held, "genserve_overload_refusals_total", reason="arrival") == 2
    for _ in range(400):
        assert service.refusal_at_handover(list_models, waited_s=0.0001) is None
    assert not admission.shedding
    async with grpc.aio.insecure_channel(held.address) as channel:
        assert (await outcome(pb_grpc.GeneratorStub(channel), image(1)))[0] == grpc.StatusCode.OK


async def test_calls_in_progress_past_the_limit_are_refused_at_arrival_and_text_calls_do_not_count() -> None:
    """admission's CallLimit (no rate yet: its floor, 16 for batches of 16): the 17th image call in
    progress is refused at arrival with the hint, while text streams in progress leave the count
    (server/grpc_edge/accept.py release_call) and never hold image calls back."""
    async with running_server(models_dir=MODELS, batch_size=16, admission_interval_ms=HINT_MS, log_level="warning") as srv:
        assert srv.pipeline.admission.calls.limit == 16
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = pb_grpc.GeneratorStub(channel)
            text = pb.GenerateRequest(model="transformer", text=pb.TextParams(prompt="ROMEO:", max_new_tokens=1000, seed=1))
            streams = []
            for _ in range(20):  # one after another (at arrival a call is not known to be text: it counts until its handler runs)
                streams.append(stub.Generate(text))
                await streams[-1].read()  # decoding: its first token came
            assert (await outcome(stub, image(1)))[0] == grpc.StatusCode.OK  # 20 text calls in progress, not counted
            for call in streams:
                call.cancel()
        srv.engine.install_faults(HoldBatches(2.0))
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = pb_grpc.GeneratorStub(channel)
            held = [asyncio.create_task(outcome(stub, image(i))) for i in range(16)]
            await until(lambda: len(srv.pipeline.inflight) == 16)
            code, trailers = await outcome(stub, image(99))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and trailers.get(RETRY_PUSHBACK_KEY) == str(HINT_MS)
            assert [c for c, _ in await asyncio.gather(*held)] == [grpc.StatusCode.OK] * 16
        assert counter(srv, "genserve_overload_refusals_total", reason="limit") == 1


class SlowSteps(Faults):
    """Every decode step waits ``seconds`` first: text decodes slowly and deterministically."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def before_decode_step(self, served: ServedModel) -> None:
        time.sleep(self.seconds)


async def test_text_waiting_past_its_budget_for_a_first_token_is_refused_with_a_hint_and_nothing_else_is() -> None:
    """--text-wait-ms: past its decode loop's ceiling a text model refuses new text at once, naming the
    model, instead of queueing it for seconds; the requests it took all finish, and once the queue has
    drained text is admitted again. (One decode slot, slowed steps: the second request waits.)"""
    settings = {"decode_batch": 1, "text_wait_ms": 200, "admission_interval_ms": HINT_MS, "log_level": "warning"}
    async with running_server(models_dir=MODELS, **settings) as srv:
        srv.engine.install_faults(SlowSteps(0.01))
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = pb_grpc.GeneratorStub(channel)

            def text(seed: int, tokens: int) -> pb.GenerateRequest:
                return pb.GenerateRequest(model="transformer", text=pb.TextParams(prompt="ROMEO:", max_new_tokens=tokens, seed=seed))

            first = stub.Generate(text(1, 60))  # holds the only slot for 60 slowed steps
            await first.read()
            waiting = asyncio.create_task(outcome(stub, text(2, 5)))  # waits for that slot
            feeder = srv.pipeline.topology.feeders["transformer"]
            await until(lambda: feeder.start_wait(time.perf_counter()) > 0.25)
            call = stub.Generate(text(3, 5))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in call:
                    pass
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "model 'transformer' is overloaded: text requests wait over 200 ms" in (refused.value.details() or "")
            assert dict(refused.value.trailing_metadata() or ()).get(RETRY_PUSHBACK_KEY) == str(HINT_MS)
            while await first.read() is not grpc.aio.EOF:
                pass
            assert await first.code() == grpc.StatusCode.OK
            assert (await waiting)[0] == grpc.StatusCode.OK
            assert feeder.start_wait(time.perf_counter()) == 0.0
            assert (await outcome(stub, text(4, 5)))[0] == grpc.StatusCode.OK  # drained: admitted again
    assert counter(srv, "genserve_overload_refusals_total", reason="start") == 1
    assert counter(srv, "genserve_requests_total", model="transformer", rpc="Generate", code="OK") == 3
