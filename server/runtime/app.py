"""One genserve server: models, engine, pipeline, supervisor, gRPC (with health and reflection),
metrics, and the one drain routine used by signals, by a supervisor that gave up, and by tests.

Health: the service names "" and "genserve.v1.Generator" report readiness (SERVING while new work
is admitted; NOT_SERVING while starting or draining); "liveness" reports SERVING for as long as the
process can answer. A full queue changes neither: it refuses work (RESOURCE_EXHAUSTED) but is healthy.
With --amqp-url, "genserve.amqp" says whether the RabbitMQ ingress is consuming, and "" (the whole
server) needs it too; "genserve.v1.Generator" stays gRPC's alone, so a load balancer keeps sending
gRPC calls while the broker is away. With --workers, each name is SERVING only when it is so in
every worker (server/runtime/workers.py), whichever worker answers the check.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import anyio
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from engine import Engine, KindError, ModelRegistry, choose_device, load_kind_modules
from engine.logs import get_logger
from server.config import ServerConfig
from server.grpc_edge.accept import aio_server, calls_in_progress, grpc_server_options, set_policy
from server.grpc_edge.auth import PUBLIC_SERVICES, BearerTokenAuth, load_tokens, server_credentials
from server.grpc_edge.reflection import enable_reflection
from server.grpc_edge.service import GENERATE_PATH, GeneratorService, register
from server.grpc_edge.wakeups import unblock_completion_writes
from server.metrics import Metrics
from server.pipeline.core import Pipeline
from server.pipeline.stages import Stage
from server.pipeline.statuses import retryable
from server.pipeline.supervisor import Supervisor
from server.runtime.allocator import tune_allocator
from server.runtime.loop_busy import LoopBusyProbe
from server.runtime.model_watch import FileStamp, ModelWatcher, stamp_folder
from server.wire import SERVICE

if TYPE_CHECKING:
    from server.amqp_ingress import AmqpIngress
    from server.http_edge.listener import HttpListener

log = get_logger("server")

READINESS_NAMES = ("", SERVICE)
LIVENESS_NAME = "liveness"
AMQP_NAME = "genserve.amqp"
READY_GRPC, READY_AMQP = 1, 2  # readiness flags, ANDed over the workers of a group
READINESS_POLL_S = 0.1  # how often readiness that depends on others (broker, other workers) is re-read


def default_threads() -> int:
    """All usable cores but one: the event loop and grpc need a core of their own (docs/scaling.md)."""
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
    def __init__(self, config: ServerConfig, *, reuse_port: bool = False) -> None:
        self.config = config
        self.reuse_port = reuse_port  # --workers: the processes of one group share the port
        self.group_gate: Callable[[int], int] | None = None  # --workers: this worker's readiness flags -> the group's
        self.amqp: AmqpIngress | None = None
        self.http: HttpListener | None = None  # the OpenAI-compatible HTTP edge (--http-port)
        self._serving = False
        self._health: dict[str, bool] = {}
        self._health_task: asyncio.Task[None] | None = None
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
        self._watch_task: asyncio.Task[None] | None = None
        self.watcher: ModelWatcher | None = None
        self._busy_probe: LoopBusyProbe | None = None

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
        """Listen, load the models, start the stages, then serve; returns once the server is ready.

        The listeners are bound first, so a taken port fails in a moment, not after the models
        have loaded. A failed start undoes what it did (stages, engine threads, ports) before it
        raises: a start that failed is not followed by stage restarts.
        """
        async with contextlib.AsyncExitStack() as undo:
            await self._start(undo)
            undo.pop_all()  # started: from now on stop() is the way down

    async def _start(self, undo: contextlib.AsyncExitStack) -> None:
        c = self.config
        # security files first: a wrong path fails in a moment, not after the models have loaded
        credentials = server_credentials(c)
        tokens = load_tokens(c.token_file, os.environ)
        limit = c.max_message_mb << 20
        interceptors = []
        if tokens:
            public = PUBLIC_SERVICES if c.public_health else ()
            interceptors.append(BearerTokenAuth(tokens, public=public, on_refusal=self._on_unauthenticated))
        self.grpc = aio_server(
            accept_ahead=c.accept_ahead,  # calls taken from grpc core as they come (server/grpc_edge/accept.py)
            backlog=c.max_pending_calls,
            interceptors=interceptors or None,  # none at all without tokens: an interceptor costs every call
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # a second server on the same port must fail, not share it; workers of one group share it
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
                *grpc_server_options(c.max_streams_per_connection, c.max_pending_calls),  # grpc core's backlog, bounded
            ],
        )
        undo.push_async_callback(self.grpc.stop, None)
        unblock_completion_writes()  # grpc core hands calls over as fast as they come (server/grpc_edge/wakeups.py)
        self.port = self._listen(credentials)
        http_socket = None
        if c.http_port:  # bound now, served once the pipeline is up
            from server.http_edge.listener import bind

            http_socket = bind(c.http_host or c.host, c.http_port, reuse_port=self.reuse_port)
            undo.callback(http_socket.close)
        if c.metrics_port:
            try:
                self._stop_metrics = self.metrics.serve(c.metrics_bind_host, c.metrics_port)
            except OSError as e:
                raise OSError(
                    f"cannot serve metrics on {c.metrics_bind_host}:{c.metrics_port}: {e.strerror or e}; each server on a machine "
                    "needs its own metrics port: give another with --metrics-port N, or --metrics-port 0 to turn metrics off"
                ) from None
            undo.callback(self._stop_metrics)

        sys.setswitchinterval(c.switch_interval_ms / 1000)  # Python's 5 ms cost text 20-30% of its tokens (docs/design/decode-loop.md)
        tune_allocator()  # before the model loader and the engine start their threads (server/runtime/allocator.py)
        choice = choose_device(c.device, threads=c.threads or default_threads())
        limits = c.image_limits()
        loop = asyncio.get_running_loop()
        if c.kinds:
            try:
                load_kind_modules(c.kinds.split(","))
            except KindError as e:
                raise RuntimeError(f"--kinds (GENSERVE_KINDS): {e}") from None
        before = await loop.run_in_executor(None, _stamps_or_none, Path(c.models_dir))  # before the load: a change during it shows
        self._registry = await loop.run_in_executor(None, lambda: ModelRegistry.from_folder(c.models_dir, choice.device, limits))
        if not len(self.registry):
            if self.registry.failures:
                raise RuntimeError(
                    f"no model could be loaded from {c.models_dir}: every model file was refused (the model_refused lines above)"
                )
            raise RuntimeError(
                f"no model files (*.safetensors) in {os.path.abspath(c.models_dir)}; give a folder of models with --models-dir"
            )
        self._engine = Engine(c.engine_limits())
        self.metrics.step_loops.source = self._engine.step_stats
        undo.push_async_callback(self._close_engine)
        for served in self.registry.served():
            if served.images is not None:
                self.engine.calibrate(served)
        self._pipeline = Pipeline(c, self.registry, self.engine, self.metrics)
        self._supervisor = Supervisor(
            self.pipeline.stages,
            intensity=c.restart_intensity,
            period=c.restart_period_s,
            on_give_up=self._give_up,
            on_restart=self._on_restart,
        )
        # Everything loaded so far lives as long as the server: move it out of the collector's
        # sight, so collections triggered by per-request garbage do not rescan it every time
        gc.collect()
        gc.freeze()
        ready = asyncio.Event()
        self._supervisor_task = asyncio.create_task(self._run_supervisor(ready), name="supervisor")
        undo.push_async_callback(self._stop_supervisor)
        await ready.wait()

        self.service = GeneratorService(c, self.pipeline, self.metrics)
        register(self.service, self.grpc)
        if not interceptors:  # with tokens, a caller hears UNAUTHENTICATED before anything about load
            set_policy(self.grpc, self.service)
        # A batch that holds every Generate call in progress closes at once; one still being read or
        # admitted is waited for (server/pipeline/stages/batcher.py, Batcher._alone)
        self.pipeline.calls_in_progress = calls_in_progress(self.grpc, GENERATE_PATH)
        self._busy_probe = LoopBusyProbe(self.metrics.loop_busy.set)  # genserve_loop_busy_ratio
        self._busy_probe.start()
        undo.callback(self._busy_probe.stop)
        self.health = HealthServicer()
        # grpc's HealthServicer starts "" as SERVING: readiness says NOT_SERVING until start ends
        await self.health.set(LIVENESS_NAME, health_pb2.HealthCheckResponse.SERVING)
        for name in READINESS_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        enable_reflection((SERVICE, "grpc.health.v1.Health"), self.grpc)
        await self.grpc.start()
        if c.amqp_url:
            from server.amqp_ingress import AmqpIngress  # aio-pika only when asked for

            self.amqp = AmqpIngress(c, self.pipeline, self.metrics)
            await self.amqp.start()
        if http_socket is not None:
            from server.http_edge.app import HttpEdge  # starlette and uvicorn only when asked for
            from server.http_edge.listener import HttpListener

            edge = HttpEdge(self.pipeline, self.metrics, tokens=tokens, public_health=c.public_health, ready=lambda: self._serving)
            assert http_socket is not None
            self.http = HttpListener(
                edge.app,
                http_socket,
                c.http_host or c.host,  # behind a front: the public host, with the TLS files the front took for gRPC
                tls_cert=c.http_tls_cert or c.tls_cert,
                tls_key=c.http_tls_key or c.tls_key,
                tls_client_ca=c.http_tls_client_ca or c.tls_client_ca,
            )
            undo.push_async_callback(self.http.stop)
            await self.http.start()
        self._serving = True
        await self._refresh_health()
        if self.amqp is not None or self.group_gate is not None:
            self._health_task = asyncio.create_task(self._watch_health(), name="readiness")
        metrics = f"http://{c.metrics_bind_host}:{c.metrics_port}/metrics" if c.metrics_port else "off"
        if self.group_gate is not None:  # a worker of a group: its metrics are in the parent's /metrics
            metrics = "the group's"
        log.info(
            "server_ready" if self.group_gate is None else "worker_ready",  # a group's parent logs its own server_ready
            address=self.address,
            models=[f"{m.name}@{m.version}" for m in self.registry.list_models()],
            refused=[str(f.path) for f in self.registry.failures],
            metrics=metrics,
            http=self.http.url if self.http else "off",
            batch_size=c.batch_size,
            batch_timeout_ms=c.batch_timeout_ms,
            processors=c.processors,
            tls="on" if credentials is not None else "at the front" if c.front_tls else "off",
            mtls="on" if c.tls_client_ca else "off",
            auth=f"on, {len(tokens)} tokens" if tokens else "off",
            public_health=c.public_health or not tokens,  # without tokens every service is open
            **({"front": c.front_address} if c.front_address else {}),  # clients use this one, not ``address``
        )
        if tokens and credentials is None and not c.front_tls:
            log.warning("tokens_in_cleartext", hint="bearer tokens travel unencrypted without TLS: set --tls-cert and --tls-key")
        self.watcher = ModelWatcher(
            c.models_dir,
            self.registry,
            self.engine,
            self.pipeline,
            self.supervisor,
            self.metrics,
            poll_s=c.models_poll_s,
            settle_s=c.models_settle_s,
            grace_s=c.grace_s,
        )
        self.watcher.adopt(before)
        self._watch_task = asyncio.create_task(self.watcher.run(), name="model-watch")

    def rescan_models(self) -> None:
        """Look at the models folder now (SIGHUP) rather than at the next poll."""
        if self.watcher is not None:
            self.watcher.rescan()

    def _listen(self, credentials: grpc.ServerCredentials | None) -> int:
        """Bind the gRPC port (it is served from ``grpc.start()``); an error names the address and the flag."""
        address = self.config.address
        try:
            port = self.grpc.add_insecure_port(address) if credentials is None else self.grpc.add_secure_port(address, credentials)
        except RuntimeError:  # grpc's "Failed to bind to address ...": the cause is only in its C++ log line
            port = 0
        if port == 0:
            raise OSError(
                f"cannot listen for gRPC on {address}: the port is in use (another server?) or the address is not this "
                "machine's; give another with --port N (0: any free port) or --host"
            )
        return port

    def readiness(self) -> dict[str, bool]:
        """Health name -> SERVING (True) or NOT_SERVING, from this server and, in a group, every worker."""
        flags = (READY_GRPC if self._serving else 0) | (READY_AMQP if self.amqp is None or self.amqp.up else 0)
        if self.group_gate is not None:
            flags = self.group_gate(flags)
        states = {name: bool(flags & READY_GRPC) for name in READINESS_NAMES}
        if self.amqp is not None:
            states[""] = flags == READY_GRPC | READY_AMQP
            states[AMQP_NAME] = bool(flags & READY_AMQP)
        return states

    async def _refresh_health(self) -> None:
        for name, serving in self.readiness().items():
            if self._health.get(name) != serving:
                self._health[name] = serving
                status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
                await self.health.set(name, status)
        self.metrics.ready.set(1 if self._serving else 0)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(READINESS_POLL_S)
            await self._refresh_health()

    async def _run_supervisor(self, ready: asyncio.Event) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self.supervisor.run)
            ready.set()

    async def _stop_supervisor(self) -> None:
        """End the stages as a shutdown, not a fault: the supervisor stops restarting first."""
        self.supervisor.stop()
        if self._supervisor_task is not None:
            self._supervisor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor_task

    async def _close_engine(self) -> None:
        if self._engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._engine.close)

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
        self._serving = False
        if self.amqp is not None:
            await self.amqp.stop_consuming()  # what it had taken but not admitted goes back to the queue
        await self._refresh_health()
        if self._watch_task is not None:  # no model comes or goes during the drain
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        if self.watcher is not None:
            await self.watcher.close()
        inflight = len(self.pipeline.inflight)
        log.info("draining", inflight=inflight, grace_s=grace)
        finished_in_time = True
        try:
            async with asyncio.timeout(grace):
                await self.pipeline.wait_idle()
        except TimeoutError:
            finished_in_time = False
        failed = self.pipeline.fail_all(*retryable("server shut down before the request finished"))
        if self._busy_probe is not None:
            self._busy_probe.stop()
        if self.amqp is not None:
            await self.amqp.close()  # after the last replies are published and acknowledged
        if self._health_task is not None:
            self._health_task.cancel()
        await self.grpc.stop(grace=1.0)  # lets the handlers send the outcomes just decided
        if self.http is not None:
            await self.http.stop()
        await self._stop_supervisor()
        await self._close_engine()
        if self._stop_metrics is not None:
            self._stop_metrics()
        log.info("stopped", drained=inflight - failed, failed=failed, in_time=finished_in_time, exit_code=self.exit_code)
        self._stopped.set()


def _stamps_or_none(folder: Path) -> dict[Path, FileStamp]:
    """The folder's stamps; empty when it cannot be read (the load that follows says why)."""
    try:
        return stamp_folder(folder)
    except OSError:
        return {}
