"""One chaos run: a server in this process, the load, the faults, then the books (``run_chaos``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.runtime.app import READINESS_NAMES, GenServer
from tests.chaos.config import OK, ChaosConfig
from tests.chaos.faults import Injector
from tests.chaos.ledger import code_name
from tests.chaos.load_process import LoadProcess, Plan
from tests.chaos.report import ChaosReport, build_report
from tests.serving import running_server

# -- monitors -------------------------------------------------------------------------------------


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def health_of(address: str, service: str = "") -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class Monitor:
    def __init__(self, address: str) -> None:
        self.address = address
        self.rss_peak = rss_mb()
        self.health_samples = 0
        self.not_serving = 0

    async def run(self, until: float) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < until:
                self.rss_peak = max(self.rss_peak, rss_mb())
                self.health_samples += 1
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.aio.AioRpcError:
                    serving = False
                self.not_serving += not serving
                await asyncio.sleep(0.25)


async def one_of_each(address: str, models: dict[str, str]) -> dict[str, str]:
    """A fresh request to every model: the server serves after the chaos."""
    out = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        for model, kind in models.items():
            if kind == "image":
                message = pb.GenerateRequest(model=model, image=pb.ImageParams(n=4, seed=1))
            else:
                message = pb.GenerateRequest(model=model, text=pb.TextParams(prompt="ROMEO:", max_new_tokens=8, seed=1))
            try:
                replies = [m async for m in stub.Generate(message, timeout=10)]
                out[model] = code_name(replies[-1].finish.code) if replies and replies[-1].HasField("finish") else "NO_FINISH"
            except grpc.aio.AioRpcError as e:
                out[model] = str(e.code().name)
    return out


# -- the run --------------------------------------------------------------------------------------


async def run_chaos(config: ChaosConfig) -> ChaosReport:
    overrides: dict[str, Any] = {
        "models_dir": config.models_dir,
        "threads": config.threads,
        "restart_intensity": 100_000,  # the injected faults must never make the supervisor give up
        "restart_period_s": 1.0,
        **config.server,
    }
    rng = random.Random(config.seed)
    started = time.monotonic()
    async with running_server(**overrides) as server:
        models = {s.name: ("image" if s.info.image is not None else "text") for s in server.registry.served()}  # flow: image
        post = await one_of_each(server.address, models)  # warm-up: every decode loop and pool thread exists
        if any(v != OK for v in post.values()):
            raise RuntimeError(f"the server does not serve before the chaos: {post}")
        gc.collect()
        rss_start = rss_mb()
        injector = Injector(server, config, random.Random(rng.getrandbits(64)))
        monitor = Monitor(server.address)
        client_seed = rng.getrandbits(64)
        load = LoadProcess()
        await load.start()
        try:
            injector.install()
            try:
                until = time.monotonic() + config.duration_s
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(injector.run(until), name="chaos-injector")
                    tg.create_task(monitor.run(until), name="chaos-monitor")
                    tg.create_task(load.run(Plan(server.address, config, models, client_seed, until)), name="chaos-load")
                await injector.settle()
            finally:
                injector.uninstall()

            drain_started = time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(config.drain_timeout_s):
                    await server.pipeline.wait_idle()
            drain_s = time.monotonic() - drain_started
            inflight_after = len(server.pipeline.inflight)
            leftovers = await _leftovers(server)
            health = {name: await health_of(server.address, name) for name in READINESS_NAMES}
            post = await one_of_each(server.address, models)
            supervisor = server.supervisor
            restarts_metric = sum(
                int(server.metrics.registry.get_sample_value("genserve_stage_restarts_total", {"stage": name}) or 0)
                for name in supervisor.stages
            )
            restarts_supervisor = sum(supervisor.restart_count.values())
            kinds = {name: stage.kind for name, stage in supervisor.stages.items()}
            rss_before_gc = rss_mb()
            gc.collect()  # for comparison: the end is checked before it (big buffers must not wait for the collector)
            await asyncio.sleep(0.2)
            rss_end = rss_mb()
            result = await load.books()  # after the measurements: the books are the load's, not the server's
        finally:
            load.kill()
        ledger = result.ledger
        injector.note_admissions(ledger)
    wall = time.monotonic() - started
    return build_report(
        config,
        ledger,
        injector,
        result.errors,
        monitor,
        wall=wall,
        drain_s=drain_s,
        inflight_after=inflight_after,
        leftovers=leftovers,
        health=health,
        post=post,
        restarts=(sum(injector.kills.values()), restarts_supervisor, restarts_metric),
        kinds=kinds,
        rss=(rss_start, max(monitor.rss_peak, rss_before_gc, rss_end), rss_before_gc, rss_end),
    )


async def _leftovers(server: GenServer, timeout: float = 3.0) -> list[str]:
    """What is left in the server once no request is in flight: items in links, jobs held by stages,
    sequences in decode loops. Waits up to ``timeout`` for it to clear (stages drop ended jobs lazily)."""
    engine = server.engine
    stepped = [s for s in server.registry.served() if s.images is None]  # text and iterative models: a decode thread each
    deadline = time.monotonic() + timeout
    while True:
        left = [f"link {name}: {n}" for name, n in ((name, read()) for name, read in server.pipeline.topology.depth_readers().items()) if n]
        for stage in server.supervisor.stages.values():
            held = len(list(stage.holding()))
            if held:
                left.append(f"stage {stage.name} holds {held} jobs")
        for served in stepped:
            loop = engine.decode_thread(served).batch
            if loop is not None and loop.has_work:
                left.append(f"decode loop {served.name}: {loop.active_count} active, {loop.pending_count} waiting")
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.05)
