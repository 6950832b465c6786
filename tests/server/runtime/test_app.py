"""The server's life (server/runtime/app.py), each test on a server of its own: readiness while it
starts, health when it is full, a killed stage restarted, a failed start, the metrics port, the drain."""

from __future__ import annotations

import asyncio
import shutil
import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.runtime.app import GenServer
from tests.decode_spy import StepSpy
from tests.server.grpc_calls import MODELS, collect, image, read_rest, status_of, text, wait_until
from tests.serving import make_config, running_server

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]


async def test_a_killed_stage_is_restarted_and_serving_goes_on() -> None:
    async with running_server(models_dir=MODELS, restart_intensity=10) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        stages = ("batcher-vae", "producer", "processor-0", "processor-1", "router", "text-transformer")
        for name in stages:
            srv.supervisor.kill(name)
            await asyncio.sleep(0)
            assert (await collect(stub, image(n=2, seed=1)))[-1].finish.code == 0
            assert (await collect(stub, text(max_new_tokens=3)))[-1].finish.code == 0
        assert all(srv.supervisor.restart_count[name] == 1 for name in stages)
        assert srv.metrics.registry.get_sample_value("genserve_stage_restarts_total", {"stage": "router"}) == 1
        assert not srv.supervisor.gave_up


async def test_work_held_by_a_killed_stage_is_failed_with_unavailable_not_lost() -> None:
    async with running_server(models_dir=MODELS, batch_timeout_ms=5000, batch_size=64) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.GeneratorStub(ch)
        # A text call held in flight: with every unfinished request in the batch a batch closes at
        # once (Batcher._alone), so without another request the image calls could leave the open batch
        spy = StepSpy(srv.engine.decode_thread(srv.registry.get("transformer")).loop)
        held = stub.Generate(text(max_new_tokens=512, seed=99))
        await held.read()  # admitted and generating
        spy.pause()
        try:
            calls = [asyncio.ensure_future(collect(stub, image(n=1, seed=i))) for i in range(3)]
            # all three in the open batch
            await wait_until(lambda: len(srv.pipeline.inflight) == 4 and not len(srv.pipeline.image_links["vae"]))
            srv.supervisor.kill("batcher-vae")
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAVAILABLE for r in results)
            assert "may be retried" in str(results[0])
            assert (await collect(stub, image(n=64)))[-1].finish.code == 0  # the restarted batcher serves (a full batch: no 5 s wait)
        finally:
            spy.restore()
            held.cancel()


async def test_a_failed_start_stops_its_stages_without_restarting_them(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise RuntimeError("injected: registering the service failed")

    monkeypatch.setattr("server.runtime.app.register", fail)  # fails after the supervisor has started every stage
    srv = GenServer(make_config(models_dir=MODELS))
    with pytest.raises(RuntimeError, match="injected"):
        await srv.start()
    assert srv._supervisor_task is not None and srv._supervisor_task.done()
    assert sum(srv.supervisor.restart_count.values()) == 0 and not srv.supervisor.gave_up
    assert srv.metrics.registry.get_sample_value("genserve_stage_restarts_total", {"stage": "router"}) is None


async def test_full_server_refuses_at_once() -> None:
    async with running_server(models_dir=MODELS, max_inflight=2) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        spy = StepSpy(srv.engine.decode_thread(srv.registry.get("transformer")).loop)
        calls = [stub.Generate(text(max_new_tokens=512, seed=i)) for i in range(2)]
        for call in calls:
            await call.read()  # both admitted and generating
        spy.pause()  # neither can finish, however fast the machine
        # at once: a call parked instead of refused would meet its deadline, not RESOURCE_EXHAUSTED
        code, details = await status_of(stub, image(n=1), timeout=10)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 2" in details
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "genserve.v1.Generator", "liveness"):  # README: a full queue is not unhealthy
            assert (await health.Check(health_pb2.HealthCheckRequest(service=name))).status == health_pb2.HealthCheckResponse.SERVING
        spy.resume()
        for call in calls:
            call.cancel()
        await wait_until(lambda: not srv.pipeline.inflight)
        assert (await collect(stub, image(n=1)))[-1].finish.code == 0


def vae_only(tmp_path: Path) -> str:
    """A models folder of the bundled VAE alone: a server on it starts in a fraction of the time."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(Path(MODELS) / "vae.safetensors", folder)
    return str(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_metrics_are_served_over_http_on_their_own_port(tmp_path: Path) -> None:
    """README: Prometheus metrics on :9464/metrics by default; here on a free port (every other test turns them off)."""
    port = free_port()
    async with running_server(models_dir=vae_only(tmp_path), metrics_port=port) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        assert (await collect(pb_grpc.GeneratorStub(channel), image(n=2)))[-1].finish.code == 0

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                assert response.status == 200
                return str(response.read().decode())

        body = await asyncio.to_thread(scrape)
    assert 'genserve_requests_total{code="OK",model="vae",rpc="Generate"} 1.0' in body
    for family in ("genserve_queue_depth", "genserve_inflight_requests", "genserve_batch_size", "genserve_stage_restarts_total"):
        assert family in body
    busy = float(next(line.split()[1] for line in body.splitlines() if line.startswith("genserve_loop_busy_ratio ")))
    assert 0.0 <= busy <= 1.0  # the event loop's busy share (server/runtime/loop_busy.py), sampled while it serves
    with pytest.raises(OSError):  # and the port is closed with the server
        await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/metrics", timeout=5)


async def test_readiness_is_not_serving_until_the_server_is_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: readiness is NOT_SERVING while starting; seen by a health check the moment the port opens."""
    seen: dict[str, int] = {}
    real_server = grpc.aio.server

    def server(*args: object, **kwargs: object) -> grpc.aio.Server:
        srv = real_server(*args, **kwargs)
        ports: list[int] = []
        real_add, real_start = srv.add_insecure_port, srv.start

        def add(address: str) -> int:
            ports.append(real_add(address))
            return ports[-1]

        async def start() -> None:
            await real_start()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for name in ("", "genserve.v1.Generator", "liveness"):
                    seen[name] = (await health.Check(health_pb2.HealthCheckRequest(service=name))).status

        srv.add_insecure_port, srv.start = add, start
        return srv

    monkeypatch.setattr(grpc.aio, "server", server)
    async with running_server(models_dir=vae_only(tmp_path)) as srv:
        not_serving, serving = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
        assert seen == {"": not_serving, "genserve.v1.Generator": not_serving, "liveness": serving}
        async with grpc.aio.insecure_channel(srv.address) as channel:
            assert (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))).status == serving


async def test_drain_finishes_in_flight_work_and_refuses_new_work() -> None:
    async with running_server(models_dir=MODELS) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        call = stub.Generate(text(max_new_tokens=60, seed=3))
        await call.read()
        stopping = asyncio.create_task(srv.stop(grace=10))
        await wait_until(lambda: not srv.pipeline.accepting)
        assert (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == health_pb2.HealthCheckResponse.NOT_SERVING
        code, details = await status_of(stub, image(n=1))
        assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
        rest = await read_rest(call)
        assert rest[-1].finish.reason == pb.FINISH_REASON_LENGTH and rest[-1].finish.n_generated == 60
        await stopping


async def test_drain_fails_what_outlives_the_grace_period() -> None:
    async with running_server(models_dir=MODELS) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        spy = StepSpy(srv.engine.decode_thread(srv.registry.get("transformer")).loop)
        call = stub.Generate(text(max_new_tokens=512, seed=3))
        await call.read()
        spy.pause()  # it cannot finish within the grace period, however fast the machine
        stopping = asyncio.create_task(srv.stop(grace=0.2))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await read_rest(call)
        # failed by the drain with its reason (not merely cut off when the listener stops)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == "server shut down before the request finished; the request may be retried"
        spy.resume()
        await stopping


async def test_restart_intensity_exceeded_drains_and_exits_non_zero() -> None:
    async with running_server(models_dir=MODELS, restart_intensity=2, restart_period_s=30) as srv:
        for _ in range(3):
            srv.supervisor.kill("router")
            await asyncio.sleep(0.05)
        code = await asyncio.wait_for(srv.serve_forever(), 20)
        assert code == 1 and srv.supervisor.gave_up
