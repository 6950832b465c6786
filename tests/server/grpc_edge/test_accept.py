"""Accepting calls ahead of need (server/grpc_edge/accept.py): every call still gets one answer, the policy's
refusals reach the client with their code, details and hint before any handler runs, and the
seam into grpc.aio's internals is there in the pinned grpcio (a grpcio that moves it fails here,
not silently in production)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from server.grpc_edge import accept
from server.grpc_edge.accept import EagerAcceptServer, Refusal, aio_server, grpc_server_options, set_policy
from server.grpc_edge.codes import RETRY_PUSHBACK_KEY

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

SERVICE = "test.Echo"
ECHO, SLOW = f"/{SERVICE}/Echo".encode(), f"/{SERVICE}/Slow".encode()


class RecordingHandlers:
    """The handlers: each call is counted; Slow holds its answer until released."""

    def __init__(self) -> None:
        self.handled: list[str] = []
        self.release = asyncio.Event()
        self.held = 0  # Slow calls in their handler
        self.all_held = asyncio.Event()  # set when ``held`` reaches ``expect_held``
        self.expect_held = 0

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.handled.append("Echo")
        return request

    async def slow(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.handled.append("Slow")
        if request.startswith(b"release"):
            accept.release_call()  # a long call for its own reasons: out of the count of calls in progress
        self.held += 1
        if self.held == self.expect_held:
            self.all_held.set()
        await self.release.wait()
        return request


class FakePolicy:
    """Refuses what ``refuse`` names, at arrival; records each hand-over's wait."""

    def __init__(self) -> None:
        self.refuse: set[bytes | None] = set()
        self.waits: list[float] = []
        self.in_progress: list[tuple[bytes | None, int]] = []

    def refusal_at_arrival(self, method: bytes | None, in_progress: int, queued_s: float) -> Refusal | None:
        self.in_progress.append((method, in_progress))
        if method in self.refuse:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded: retry later", ((RETRY_PUSHBACK_KEY, "250"),)
        return None

    def refusal_at_handover(self, method: bytes | None, waited_s: float) -> Refusal | None:
        self.waits.append(waited_s)
        return None


async def serve(depth: int) -> tuple[grpc.aio.Server, int, RecordingHandlers]:
    calls = RecordingHandlers()
    server = aio_server(options=[], accept_ahead=depth)
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(calls.echo),
        "Slow": grpc.unary_unary_rpc_method_handler(calls.slow),
    }
    server.add_registered_method_handlers(SERVICE, handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, calls


@pytest_asyncio.fixture
async def ahead() -> AsyncIterator[tuple[grpc.aio.Server, grpc.aio.Channel, RecordingHandlers]]:
    server, port, calls = await serve(depth=64)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield server, channel, calls
    calls.release.set()
    await server.stop(1.0)


async def test_the_seam_into_grpc_aio_is_there() -> None:
    assert accept.supported(), f"grpcio {grpc.__version__} moved grpc.aio's accept internals: see server/grpc_edge/accept.py"


async def test_one_at_a_time_is_grpc_aios_own_server() -> None:
    server = aio_server(options=[], accept_ahead=1)
    assert not isinstance(server._server, EagerAcceptServer)
    assert not set_policy(server, FakePolicy())
    await server.stop(None)


async def test_a_burst_of_calls_each_gets_its_one_answer_and_the_lane_asks_further_ahead(
    ahead: tuple[grpc.aio.Server, grpc.aio.Channel, RecordingHandlers],
) -> None:
    server, channel, calls = ahead
    echo = channel.unary_unary(ECHO.decode())
    slow = channel.unary_unary(SLOW.decode())
    held = [asyncio.ensure_future(slow(b"s%d" % i)) for i in range(200)]  # 200 calls in the handler at once
    replies = await asyncio.gather(*(echo(b"e%d" % i) for i in range(300)))
    assert replies == [b"e%d" % i for i in range(300)]
    assert not any(t.done() for t in held)
    calls.release.set()
    assert await asyncio.gather(*held) == [b"s%d" % i for i in range(200)]
    assert calls.handled.count("Echo") == 300 and calls.handled.count("Slow") == 200
    lanes = server._server.__dict__["_lanes"]
    assert lanes[SLOW].depth > accept.INITIAL_DEPTH  # 200 arrivals at once: grpc core matched every request out
    assert all(not lane.started for lane in lanes.values())  # no call started and left unrun
    # every call was started where it was accepted: grpc.aio's main loop, one call per two turns of the
    # event loop, never got one (its future for each method is the first one it asked for, still pending)
    assert all(lanes[m].waiting is not None and not lanes[m].waiting.done() for m in (ECHO, SLOW))


async def test_a_handover_refusal_reaches_the_client_and_no_handler_runs(
    ahead: tuple[grpc.aio.Server, grpc.aio.Channel, RecordingHandlers],
) -> None:
    """The policy's second question, as a call's task starts: refused there, the call ends with the
    refusal and its handler never runs."""
    server, channel, calls = ahead

    class RefuseAtStart(FakePolicy):
        def refusal_at_handover(self, method: bytes | None, waited_s: float) -> Refusal | None:
            self.waits.append(waited_s)
            return (grpc.StatusCode.RESOURCE_EXHAUSTED, "waited too long", ((RETRY_PUSHBACK_KEY, "100"),)) if method == SLOW else None

    policy = RefuseAtStart()
    assert set_policy(server, policy)
    slow = channel.unary_unary(SLOW.decode())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await slow(b"x")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.details() == "waited too long"
    assert await channel.unary_unary(ECHO.decode())(b"y") == b"y"
    assert calls.handled == ["Echo"] and len(policy.waits) == 2


async def test_a_refusal_at_arrival_reaches_the_client_with_its_hint_and_no_handler_runs(
    ahead: tuple[grpc.aio.Server, grpc.aio.Channel, RecordingHandlers],
) -> None:
    server, channel, calls = ahead
    policy = FakePolicy()
    policy.refuse = {SLOW}
    assert set_policy(server, policy)
    slow = channel.unary_unary(SLOW.decode())
    echo = channel.unary_unary(ECHO.decode())
    for i in range(20):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await slow(b"x")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == "overloaded: retry later"
        assert dict(info.value.trailing_metadata() or ())[RETRY_PUSHBACK_KEY] == "250"
        assert await echo(b"%d" % i) == b"%d" % i  # other methods are served meanwhile
    assert calls.handled == ["Echo"] * 20
    assert len(policy.waits) == 20 and all(0.0 <= w < 5.0 for w in policy.waits)  # each Echo's wait, handed over


async def test_a_stopped_server_answers_every_call_it_had_accepted(
    ahead: tuple[grpc.aio.Server, grpc.aio.Channel, RecordingHandlers],
) -> None:
    server, channel, calls = ahead
    slow = channel.unary_unary(SLOW.decode())
    calls.expect_held = 50
    held = [asyncio.ensure_future(slow(b"%d" % i)) for i in range(50)]
    await calls.all_held.wait()
    stopping = asyncio.create_task(server.stop(0.2))  # grace passes with the 50 still held: grpc cancels them
    outcomes = await asyncio.gather(*held, return_exceptions=True)
    await stopping
    assert len(outcomes) == 50
    assert all(isinstance(o, grpc.aio.AioRpcError) for o in outcomes)  # each one answered, none left hanging


async def test_each_arrival_hears_how_many_calls_of_its_method_are_in_progress_less_the_released(
    ahead: tuple[grpc.aio.Server, grpc.aio.Channel, RecordingHandlers],
) -> None:
    """What the policy's call limit counts: calls started and not finished, per method; a call whose
    handler released itself (a text stream) is not among them."""
    server, channel, calls = ahead
    policy = FakePolicy()
    assert set_policy(server, policy)
    slow, echo = channel.unary_unary(SLOW.decode()), channel.unary_unary(ECHO.decode())
    calls.expect_held = 10
    held = [asyncio.ensure_future(slow(b"%d" % i)) for i in range(10)]
    await calls.all_held.wait()
    assert await echo(b"e") == b"e"
    assert policy.in_progress[-1] == (ECHO, 0)  # Echo's own count: none of the Slow calls
    calls.expect_held = 15
    calls.all_held.clear()
    released = [asyncio.ensure_future(slow(b"release%d" % i)) for i in range(5)]
    await calls.all_held.wait()
    calls.expect_held = 16
    calls.all_held.clear()
    one_more = asyncio.ensure_future(slow(b"x"))
    await calls.all_held.wait()
    assert policy.in_progress[-1] == (SLOW, 10)  # the 10 held, not the 5 released
    calls.release.set()
    await asyncio.gather(*held, *released, one_more)
    assert await echo(b"f") == b"f"
    lanes = server._server.__dict__["_lanes"]
    await asyncio.gather(*server._server.rpc_tasks)  # a call's task ends a moment after its answer (grpc closes the call)
    assert lanes[SLOW].active == 0 and lanes[ECHO].active == 0  # every place given back once, not twice


async def test_calls_in_progress_reads_that_count_for_the_batcher(
    ahead: tuple[grpc.aio.Server, grpc.aio.Channel, RecordingHandlers],
) -> None:
    """The pipeline's batchers wait for calls accepted and not yet admitted: they read the same count
    (``calls_in_progress``), live, and 0 from a server that does not accept ahead."""
    server, channel, calls = ahead
    count = accept.calls_in_progress(server, SLOW)
    assert count() == 0  # no call of the method yet: no lane either
    slow = channel.unary_unary(SLOW.decode())
    calls.expect_held = 3
    held = [asyncio.ensure_future(slow(b"%d" % i)) for i in range(3)]
    await calls.all_held.wait()
    assert count() == 3
    calls.release.set()
    await asyncio.gather(*held)
    await asyncio.gather(*server._server.rpc_tasks)
    assert count() == 0
    stock = aio_server(options=[], accept_ahead=1)  # grpc.aio's own server
    assert accept.calls_in_progress(stock, SLOW)() == 0


async def test_a_call_whose_task_never_ran_leaves_the_queue_and_gives_its_place_back() -> None:
    """A task cancelled before its first step (the loop closing) must not stay at the head of the
    queue, where every later arrival would see it waiting longer and longer."""
    server, _, _ = await serve(depth=4)
    try:
        lane = accept._Lane(server._server, b"/x/Y")
        first, second = accept._Slot(lane, 1.0), accept._Slot(lane, 2.0)
        lane.started.extend([first, second])
        first.ended(asyncio.get_running_loop().create_future())  # ended without running
        assert list(lane.started) == [second] and lane.active == 1
        second.leave()
        second.ended(asyncio.get_running_loop().create_future())  # ran, then ended: given back once
        assert not lane.started and lane.active == 0
    finally:
        await server.stop(None)


async def test_grpc_cores_backlog_is_bounded_by_configuration() -> None:
    """Memory is bounded by configuration, never by load: grpc core's backlog of calls not yet picked up too."""
    options = dict(grpc_server_options(0, 100))
    assert options["grpc.server.max_pending_requests"] == 100
    assert options["grpc.server.max_pending_requests_hard_limit"] == 200
    assert "grpc.max_concurrent_streams" not in options
    assert dict(grpc_server_options(32, 100))["grpc.max_concurrent_streams"] == 32
