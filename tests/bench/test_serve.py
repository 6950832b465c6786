"""The serving benchmark's load generators against bench.echo, in one event loop: every kind of point gives sane figures."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry, start_http_server

from bench import accounting, echo, figures, h2load, loadgen
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
    calls = await run(j)
    f = figures.closed_figures(calls, j)
    assert f["req_s"] > 0 and 0 < f["p50_ms"] < float("inf")
    assert f["not_ok"] == {}
    assert set(calls.code.tolist()) == {loadgen.OK}


def test_closed_figures_count_ok_calls_ending_in_the_window() -> None:
    """The figures on known records: only OK calls that end inside the window count, each by its own latency."""
    j = loadgen.Job("unary", 0, start=10.0, warm_s=1.0, dur_s=2.0)  # window [11, 13)
    ends = np.array([10.5, 11.0, 11.5, 12.0, 12.9, 13.0, 12.5])
    sent = ends - np.array([9, 1, 2, 3, 4, 5, 6]) / 1000  # latencies 9, 1, 2, 3, 4, 5 and 6 ms
    codes = np.array([0, 0, 0, 0, 0, 0, loadgen.RESOURCE_EXHAUSTED], dtype=np.int32)
    zero = np.zeros(7)
    calls = figures.Calls(zero, sent, sent, ends, codes, np.zeros(7, dtype=np.int32), {}, {})
    f = figures.closed_figures(calls, j)
    assert f["req_s"] == 4 / 2.0  # 11.0, 11.5, 12.0, 12.9: not 10.5 (warm-up), 13.0 (after), nor the refusal
    assert (f["p50_ms"], f["p90_ms"], f["p99_ms"]) == pytest.approx((2.0, 4.0, 4.0))
    assert f["not_ok"] == {"RESOURCE_EXHAUSTED": 1}


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
    # call i is due at start + i / rate whatever the client's lag (a late client sends late, and it shows as lag)
    np.testing.assert_allclose(np.diff(np.sort(calls.due)), 1 / 200.0, rtol=1e-6)
    due = (calls.due >= j.window_start) & (calls.due < j.window_end)
    assert abs(int(due.sum()) - 200.0 * j.dur_s) <= 1
    dropped = int((due & (calls.code == loadgen.DROPPED)).sum())
    assert f["sent_req_s"] == pytest.approx((int(due.sum()) - dropped) / j.dur_s)
    assert f["refused"] == 0


@pytest.mark.asyncio
async def test_text_counts_tokens(echo_port: int) -> None:
    j = job("text", echo_port, concurrency=2, max_tokens=5)
    calls = await run(j)
    f = figures.text_figures(calls, j)
    assert f["tokens_s"] > 0
    assert set(calls.tokens.tolist()) == {5}
    assert 0 < f["ttft_p50_ms"] < float("inf")  # every call saw a first token (no speed asked of the machine)


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


# -- plain calls by h2load, accounted for by the side's counters ------------------------------------


def test_a_tally_finds_the_calls_grpc_core_answered() -> None:
    before = accounting.parse('genserve_requests_total{model="vae",rpc="Generate",code="OK"} 5\n')
    after = accounting.parse(
        'genserve_requests_total{model="vae",rpc="Generate",code="OK"} 95\n'
        'genserve_requests_total{model="vae",rpc="Generate",code="CANCELLED"} 2\n'
        'genserve_rejections_total{rpc="Generate",code="RESOURCE_EXHAUSTED"} 30\n'
        'genserve_rejections_total{rpc="GenerateStream",code="RESOURCE_EXHAUSTED"} 7\n'
    )
    t = accounting.tally(before, after, sent=130, done=126)  # 4 cut at the end, 2 of them picked up (CANCELLED)
    assert t.by_status == {"CANCELLED": 2, "OK": 90, "RESOURCE_EXHAUSTED": 30}
    assert t.cut == 4 and t.unseen == 6 and not t.adds_up  # 126 answered, 120 by the side: 6 by grpc core
    assert "ENDED BY GRPC CORE 6" in figures.statuses_text(t)
    assert accounting.tally(before, after, sent=130, done=120).adds_up


@pytest.mark.skipif(shutil.which("h2load") is None, reason=h2load.INSTALL_HINT)
@pytest.mark.asyncio
async def test_h2load_calls_add_up_to_the_echos_count() -> None:
    registry = CollectorRegistry()
    server = grpc.aio.server()
    pb_grpc.add_GeneratorServicer_to_server(echo.EchoGenerator(CREDITS, registry), server)
    port = server.add_insecure_port("127.0.0.1:0")
    httpd, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    metrics_port = httpd.server_port
    await server.start()
    driver = h2load.H2Load()
    try:
        before = await asyncio.to_thread(accounting.settled, metrics_port)
        run = await asyncio.to_thread(driver.run, port, calls=200, streams=8)  # h2load in a thread: the echo shares this loop
        t = accounting.tally(before, await asyncio.to_thread(accounting.settled, metrics_port), run.started, run.done)
    finally:
        driver.close()
        httpd.shutdown()
        httpd.server_close()
        await server.stop(None)
    assert (run.started, run.done, run.errored) == (200, 200, 0)
    assert t.by_status == {"OK": 200} and t.adds_up
    assert run.durations.size == 200 and figures.h2load_closed_figures(run, t)["req_s"] > 0


def test_waiting_for_the_load_generators_does_not_spin() -> None:
    """The bench's own process shares the cores with the server under test: while it waits for the load
    generators (no tick), it must sleep, not poll. A busy wait here once took ~90% of a core from the
    server in every Python-client row (stream, open loop, text)."""
    import multiprocessing as mp
    import threading

    class Alive:
        checks = 0

        def check_alive(self) -> None:
            Alive.checks += 1

    parent, child = mp.Pipe()
    clients = loadgen.Clients.__new__(loadgen.Clients)  # no processes: one pipe stands for a load generator
    clients.conns, clients.procs = [parent], [None]

    def generator() -> None:
        child.recv()  # the job
        time.sleep(0.6)
        child.send({"done": True})

    threading.Thread(target=generator, daemon=True).start()
    cpu = time.process_time()
    [result] = clients.run([loadgen.Job("ready", 1)], [Alive()], every_s=0.2)
    cpu = time.process_time() - cpu
    assert result == {"done": True}
    assert cpu < 0.2, f"waited 0.6 s using {cpu:.2f} s of CPU"
    assert Alive.checks <= 10  # the servers are still checked, about every every_s
