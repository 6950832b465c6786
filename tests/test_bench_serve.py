"""The serving benchmark's load generators against bench.echo, in one event loop: every kind of point gives sane figures."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import pytest_asyncio

from bench import echo, figures, loadgen
from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)

CREDITS = 16


@pytest_asyncio.fixture
async def echo_port() -> AsyncIterator[int]:
    server = grpc.aio.server()
    pb_grpc.add_GeneratorServicer_to_server(echo.EchoGenerator(CREDITS), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(None)


def job(kind: str, port: int, **load: float) -> loadgen.Job:
    return loadgen.Job(kind, port, start=time.monotonic() + 0.05, warm_s=0.05, dur_s=0.3, drain_s=2.0, **load)  # type: ignore[arg-type]


async def run(j: loadgen.Job) -> figures.Calls:
    payload = await loadgen.execute(j)
    assert "error" not in payload
    return figures.Calls.merge([payload])


@pytest.mark.asyncio
async def test_closed_generate(echo_port: int) -> None:
    j = job("unary", echo_port, concurrency=4)
    f = figures.closed_figures(await run(j), j)
    assert f["req_s"] > 0
    assert f["p50_ms"] <= f["p99_ms"]
    assert f["not_ok"] == {}


@pytest.mark.asyncio
async def test_closed_stream_keeps_within_credit(echo_port: int) -> None:
    j = job("stream", echo_port, window=3 * CREDITS + 1)  # needs 4 streams of at most 16 each
    calls = await run(j)
    f = figures.closed_figures(calls, j)
    assert f["req_s"] > 0
    assert figures.code_counts(calls.code) == {}  # no RESOURCE_EXHAUSTED: never sent beyond the credit
    assert f["requests_per_msg_out"] > 1


@pytest.mark.asyncio
async def test_open_loop_sends_on_schedule(echo_port: int) -> None:
    j = job("open", echo_port, rate=200.0, cap=100)
    calls = await run(j)
    f = figures.open_figures(calls, j, 200.0)
    assert 150 <= f["sent_req_s"] <= 250
    assert f["refused"] == 0
    assert np.all(np.diff(np.sort(calls.due)) > 0)


@pytest.mark.asyncio
async def test_text_counts_tokens(echo_port: int) -> None:
    j = job("text", echo_port, concurrency=2, max_tokens=5)
    calls = await run(j)
    f = figures.text_figures(calls, j)
    assert f["tokens_s"] > 0
    assert set(calls.tokens.tolist()) == {5}
    assert f["ttft_p50_ms"] < 1000


@pytest.mark.asyncio
async def test_echo_refuses_beyond_credit(echo_port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}") as channel:
        call = pb_grpc.GeneratorStub(channel).GenerateStream()
        first = await call.read()
        assert first.credits == CREDITS
        requests = [pb.GenerateRequest(model="vae", id=str(i), image=pb.ImageParams(n=1)) for i in range(CREDITS + 2)]
        await call.write(pb.StreamRequest(requests=requests))
        reply = await call.read()
        finishes = {r.id: r.finish.code for r in reply.results if r.HasField("finish")}
        assert reply.credits == CREDITS
        assert [finishes[str(i)] for i in range(CREDITS, CREDITS + 2)] == [grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]] * 2
        assert sum(code == 0 for code in finishes.values()) == CREDITS
        await call.done_writing()


def test_percentiles_count_unfinished_as_infinite() -> None:
    assert figures.pct_ms(np.array([0.001, 0.002, np.inf]), 99) == float("inf")
    assert figures.pct_ms(np.array([0.001, 0.002, np.inf]), 50) == pytest.approx(2.0)
    assert np.isnan(figures.pct_ms(np.array([]), 50))
