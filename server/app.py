"""One genserve server: models, engine, pipeline, supervisor, gRPC (with health and reflection),
metrics, and the one drain routine used by signals, by a supervisor that gave up, and by tests.

Health: the service names "" and "genserve.v1.Generator" report readiness (SERVING while new work
is admitted; NOT_SERVING while starting or draining); "liveness" reports SERVING for as long as the
process can answer. A full queue changes neither: it refuses work (RESOURCE_EXHAUSTED) but is healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
from collections.abc import Callable
from typing import TypeVar

import anyio
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from engine.device import choose_device
from engine.engine import Engine
from engine.logs import get_logger
from engine.registry import ModelRegistry
from genserve.v1 import generator_pb2 as pb
from server.allocator import tune_allocator
from server.auth import PUBLIC_SERVICES, BearerTokenAuth, load_tokens, server_credentials
from server.config import ServerConfig
from server.metrics import Metrics
from server.pipeline import Pipeline
from server.service import GeneratorService, register
from server.stages import Stage
from server.supervisor import Supervisor

log = get_logger("server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generator"].full_name  # "genserve.v1.Generator"
READINESS_NAMES = ("", SERVICE_NAME)
LIVENESS_NAME = "liveness"


def default_threads() -> int:
    """All usable cores but one: the event loop and grpc need a core of their own. On this
    project's 2-core machine one torch thread gave 15.5k stream requests/s against 11.0k with two,
    and more tokens/s (2,183 against 1,822 at 32 streams)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, cores - 1)


T = TypeVar("T")


def _started(part: T | None, name: str) -> T:
    if part is None:
        raise RuntimeError(f"GenServer.{name} exists once start() has run")
    return part


class GenServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.port = config.port
        self.exit_code = 0
        self.metrics = Metrics()
        self._shutdown = asyncio.Event()
        self._stopped = asyncio.Event()
        self._closing = False
        self._stop_metrics: Callable[[], None] | None = None
        self._supervisor_task: asyncio.Task[None] | None = None
        # built by start(), in this order; read through the properties below
        self._registry: ModelRegistry | None = None
        self._engine: Engine | None = None
        self._pipeline: Pipeline | None = None
        self._supervisor: Supervisor | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None

    @property
    def registry(self) -> ModelRegistry:
        return _started(self._registry, "registry")

    @property
    def engine(self) -> Engine:
        return _started(self._engine, "engine")

    @property
    def pipeline(self) -> Pipeline:
        return _started(self._pipeline, "pipeline")

    @property
    def supervisor(self) -> Supervisor:
        return _started(self._supervisor, "supervisor")

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::", "[::]") else self.config.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Load the models, start the stages, then listen; returns once the server is ready."""
        c = self.config
        # security files first: a wrong path fails in a moment, not after the models have loaded
        credentials = server_credentials(c)
        tokens = load_tokens(c.token_file, os.environ)
        tune_allocator()  # before the model loader and the engine start their threads (server/allocator.py)
        choice = choose_device(c.device, threads=c.threads or default_threads())
        limits = c.image_limits()
        loop = asyncio.get_running_loop()
        registry = await loop.run_in_executor(None, lambda: ModelRegistry.from_folder(c.models_dir, choice.device, limits))
        if not len(registry):
            raise RuntimeError(f"no model could be loaded from {c.models_dir}; see the model_refused lines above")
        self._registry = registry
        engine = self._engine = Engine(c.engine_limits())
        for served in registry.served():
            if served.images is not None:
                engine.calibrate(served)
        pipeline = self._pipeline = Pipeline(c, registry, engine, self.metrics)
        self._supervisor = Supervisor(
            pipeline.stages,
            intensity=c.restart_intensity,
            period=c.restart_period_s,
            on_give_up=self._give_up,
            on_restart=self._on_restart,
        )
        # Everything loaded so far lives as long as the server: move it out of the collector's
        # sight, so collections triggered by per-request garbage do not rescan it (+12% requests/s)
        gc.collect()
        gc.freeze()
        ready = asyncio.Event()
        self._supervisor_task = asyncio.create_task(self._run_supervisor(ready), name="supervisor")
        await ready.wait()

        limit = c.max_message_mb << 20
        interceptors = []
        if tokens:
            public = PUBLIC_SERVICES if c.public_health else ()
            interceptors.append(BearerTokenAuth(tokens, public=public, on_refusal=self._on_unauthenticated))
        server = self._grpc = grpc.aio.server(
            interceptors=interceptors or None,  # none at all without tokens: an interceptor costs every call
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
            ],
        )
        register(GeneratorService(c, pipeline, self.metrics), server)
        health = self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection((SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME), server)
        if credentials is None:
            self.port = server.add_insecure_port(c.address)
        else:
            self.port = server.add_secure_port(c.address, credentials)
        if self.port == 0:
            raise OSError(f"could not listen on {c.address}")
        await server.start()
        await health.set(LIVENESS_NAME, health_pb2.HealthCheckResponse.SERVING)
        for name in READINESS_NAMES:
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.ready.set(1)
        if c.metrics_port:
            self._stop_metrics = self.metrics.serve(c.host, c.metrics_port)
        log.info(
            "server_ready",
            address=self.address,
            models=[f"{m.name}@{m.version}" for m in registry.list_models()],
            refused=[str(f.path) for f in registry.failures],
            metrics=f"http://{c.host}:{c.metrics_port}/metrics" if c.metrics_port else "off",
            batch_size=c.batch_size,
            batch_timeout_ms=c.batch_timeout_ms,
            processors=c.processors,
            tls="on" if credentials is not None else "off",
            mtls="on" if c.tls_client_ca else "off",
            auth=f"on, {len(tokens)} tokens" if tokens else "off",
            public_health=c.public_health if tokens else None,
        )
        if tokens and credentials is None:
            log.warning("tokens_in_cleartext", hint="bearer tokens travel unencrypted without TLS: set --tls-cert and --tls-key")

    async def _run_supervisor(self, ready: asyncio.Event) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self.supervisor.run)
            ready.set()

    def _on_unauthenticated(self, rpc: str) -> None:
        self.metrics.rejections.labels(rpc, "UNAUTHENTICATED").inc()

    def _on_restart(self, stage: Stage) -> None:
        self.metrics.restarts.labels(stage.name).inc()

    def _give_up(self, reason: str) -> None:
        log.error("supervisor_gave_up", reason=reason, action="draining, then exiting with status 1")
        self.request_shutdown(exit_code=1)

    def request_shutdown(self, exit_code: int = 0) -> None:
        """Begin the drain (signal handlers call this); the first non-zero exit code sticks."""
        if exit_code and not self.exit_code:
            self.exit_code = exit_code
        self._shutdown.set()

    async def serve_forever(self) -> int:
        """Run until a shutdown is requested, drain, and return the exit code."""
        await self._shutdown.wait()
        await self.stop()
        return self.exit_code

    async def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new work, let in-flight work finish within the grace period, fail the rest
        with UNAVAILABLE, then stop the stages, the engine and the listener."""
        if self._closing:
            await self._stopped.wait()
            return
        self._closing = True
        grace = self.config.grace_s if grace is None else grace
        self.pipeline.accepting = False
        self.metrics.ready.set(0)
        for name in READINESS_NAMES:
            await _started(self._health, "health").set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        inflight = len(self.pipeline.inflight)
        log.info("draining", inflight=inflight, grace_s=grace)
        finished_in_time = True
        try:
            async with asyncio.timeout(grace):
                await self.pipeline.wait_idle()
        except TimeoutError:
            finished_in_time = False
        failed = self.pipeline.fail_all(grpc.StatusCode.UNAVAILABLE, "server shut down before the request finished; retry elsewhere")
        await _started(self._grpc, "grpc").stop(grace=1.0)  # lets the handlers send the outcomes just decided
        self.supervisor.stop()
        if self._supervisor_task is not None:
            self._supervisor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor_task
        if self._engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._engine.close)
        if self._stop_metrics is not None:
            self._stop_metrics()
        log.info("stopped", drained=inflight - failed, failed=failed, in_time=finished_in_time, exit_code=self.exit_code)
        self._stopped.set()
