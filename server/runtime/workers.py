"""``--workers N``: N server processes on one port, supervised by a parent one level up (as in OTP).

    parent (this module: one thread, no torch, no gRPC object)
      |-- fork --> worker 0: a whole GenServer (pipeline, engine, torch threads) on host:port
      |-- fork --> worker 1: the same, on the same port (SO_REUSEPORT)
      '-- /metrics: every worker's metrics, each series labelled worker="i"

Why fork from a bare parent (grpc's examples/python/multiprocessing and its README): gRPC's core
does not survive a fork once a server or channel exists, so each worker is forked before any gRPC
object is made, and the parent never makes one. The parent does not import torch either (its
thread pools are not fork-safe), so a restart forks the same bare process, which loads the models
again. The parent stays single-threaded (its /metrics is served from its own select loop), so no
lock can be held by another thread at a fork.

The kernel spreads *connections* over the workers, not calls: one channel talks to one worker for
its whole life. A client spreads its calls with several channels (the SDK's ``connections=``).

Supervision: a worker that dies after it started serving is forked again, within the server's
restart intensity (``restart_intensity`` restarts in ``restart_period_s``); past it, or when a
worker dies before it ever served (a start failure: bad flags, no models), the parent drains the
others and exits 1. SIGTERM or SIGINT drains every worker within ``grace_s``; a second signal kills
them (SIGKILL) and exits 1. Workers sit in their own process group, so a Ctrl-C at a terminal
reaches the parent alone, and they get SIGTERM if the parent dies (PR_SET_PDEATHSIG).

Readiness: each worker writes its readiness flags to a shared board, and reports the AND of every
worker's (server/runtime/app.py ``group_gate``): SERVING only when every worker is, whichever one the
health check reaches. A dead worker's flags are cleared by the parent until its successor is up.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import http.server
import os
import selectors
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from multiprocessing.sharedctypes import RawArray
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from engine.logs import get_logger
from server.config import ServerConfig
from server.metrics import LogDrops

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from server.runtime.app import GenServer

log = get_logger("server.runtime.workers")

DRAIN_MARGIN_S = 5.0  # beyond grace_s: a worker also stops its listener (1 s) and its engine threads
SCRAPE_TIMEOUT_S = 2.0  # a worker's /metrics that takes longer is left out of that scrape
TICK_S = 0.2  # the parent's loop wakes at least this often (signals and children wake it at once)
PR_SET_PDEATHSIG = 1


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(config: ServerConfig) -> int:
    return config.workers or usable_cores()


def worker_threads(config: ServerConfig, workers: int) -> int:
    """Torch threads per worker: the cores split between the workers, one each kept for the
    event loop (as in a single server, app.default_threads), never fewer than one."""
    return config.threads or max(1, usable_cores() // workers - 1)


class Board:
    """What the workers of a group tell each other, in shared memory inherited through fork.
    One writer per slot (its worker, or the parent once the worker is dead), so no lock."""

    def __init__(self, workers: int) -> None:
        self.flags = RawArray(ctypes.c_int, workers)  # each worker's readiness flags (server/runtime/app.py READY_*)
        self.started = RawArray(ctypes.c_int, workers)  # pid of the worker once it has started serving
        self.metrics_ports = RawArray(ctypes.c_int, workers)  # its private /metrics on 127.0.0.1 (0: none yet)

    def gate(self, index: int) -> Callable[[int], int]:
        """Worker ``index``'s group gate: record its own flags, return those of the whole group."""

        def group_flags(own: int) -> int:
            self.flags[index] = own
            if not self.started[index]:  # the first call comes at the end of GenServer.start
                self.started[index] = os.getpid()
            every = -1
            for flags in self.flags:
                every &= flags
            return every

        return group_flags

    def clear(self, index: int) -> None:
        self.flags[index] = 0
        self.started[index] = 0
        self.metrics_ports[index] = 0


def reserve_port(config: ServerConfig, port: int | None = None, what: str = "") -> tuple[socket.socket, int]:
    """Check that the port is free, then hold it with SO_REUSEPORT for the workers to join.

    Checked without SO_REUSEPORT first: another server, or another group, on the port makes this
    one fail (as a second single server does) instead of silently sharing its connections. Port 0
    becomes a concrete free port here, or each worker would pick a different one.
    """
    host = config.host.strip("[]")
    port = config.port if port is None else port
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as e:
            raise OSError(f"could not listen{what} on {replace(config, port=port).address}: {e.strerror}") from None
        port = probe.getsockname()[1]
    held = socket.socket(family, kind, proto)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind((address[0], port, *address[2:]))  # bound, never listening: it takes no connection
    return held, port


def merge_metrics(scrapes: Iterable[tuple[int | str, str]]) -> list[Metric]:
    """The families of every worker's exposition, each sample labelled with its worker."""
    families: dict[str, Metric] = {}
    for index, text in scrapes:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(s._replace(labels={**s.labels, "worker": str(index)}) for s in family.samples)
    return list(families.values())


class _WorkerMetrics:
    """A collector that reads every live worker's /metrics at scrape time."""

    def __init__(self, board: Board) -> None:
        self.board = board
        self.own = CollectorRegistry()
        self.own.register(LogDrops())

    def collect(self) -> list[Metric]:
        scrapes: list[tuple[int | str, str]] = [("parent", generate_latest(self.own).decode())]  # the parent's own log drops
        for index, port in enumerate(self.board.metrics_ports):
            if not port:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_S) as response:
                    scrapes.append((index, response.read().decode()))
            except OSError as e:  # a worker that just died or is still starting
                log.debug("worker_scrape_failed", worker=index, error=str(e))
        return merge_metrics(scrapes)


class WorkerGroup:
    """The parent: forks the workers, restarts them, drains them, serves the group's /metrics."""

    def __init__(self, config: ServerConfig) -> None:
        self.size = worker_count(config)
        self.config = config
        self.board = Board(self.size)
        self.pids: dict[int, int] = {}  # pid -> worker index
        self.restarts: collections.deque[float] = collections.deque()
        self.exit_code = 0
        self.http_port = config.http_port
        self.drain_deadline: float | None = None
        self.signals = 0
        self._inherited: list[Any] = []  # what a forked worker must close (the parent's sockets and pipe)
        self.registry = CollectorRegistry()
        self.registry.register(_WorkerMetrics(self.board))
        Gauge("genserve_workers", "Worker processes configured", registry=self.registry).set(self.size)
        ready = Gauge("genserve_workers_ready", "Workers admitting work", registry=self.registry)
        ready.set_function(lambda: sum(1 for flags in self.board.flags if flags & 1))
        self.worker_restarts = Counter("genserve_worker_restarts_total", "Workers forked again after dying", registry=self.registry)

    def worker_config(self, port: int) -> ServerConfig:
        # metrics_port 0: a worker's own /metrics is private (an ephemeral 127.0.0.1 port on the board)
        threads = worker_threads(self.config, self.size)
        return replace(self.config, workers=1, port=port, metrics_port=0, threads=threads, http_port=self.http_port)

    def run(self) -> int:
        c = self.config
        try:
            held, port = reserve_port(c)
            self._inherited.append(held)
            if c.http_port:  # the HTTP edge's port, shared by the workers the same way
                held_http, self.http_port = reserve_port(c, c.http_port, " for HTTP (--http-port)")
                self._inherited.append(held_http)
        except OSError as e:
            log.error("start_failed", error=str(e))
            for thing in self._inherited:
                _close(thing)
            return 1
        self.port = port
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._inherited += [wake_r, wake_w]
        signal.set_wakeup_fd(wake_w)  # a signal (SIGCHLD included) wakes the select below at once
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a handler, so that the wake-up byte is written
        selector = selectors.DefaultSelector()
        self._inherited.append(selector)
        selector.register(wake_r, selectors.EVENT_READ)
        httpd: http.server.HTTPServer | None = None
        if c.metrics_port:
            httpd = _MetricsServer((c.metrics_bind_host.strip("[]"), c.metrics_port), self.registry)
            self._inherited.append(httpd.socket)
            selector.register(httpd.fileno(), selectors.EVENT_READ, data="metrics")
        threads = worker_threads(c, self.size)
        facts = {
            "workers": self.size,
            "address": replace(c, port=port).address,
            "threads_per_worker": threads,
            "metrics": f"http://{c.metrics_bind_host}:{c.metrics_port}/metrics" if c.metrics_port else "off",
            "http": f"{'https' if c.tls_cert else 'http'}://{replace(c, port=self.http_port).address}" if c.http_port else "off",
        }
        log.info("workers_starting", **facts)
        ready_logged = False
        for index in range(self.size):
            self._spawn(index)
        try:
            while self.pids:
                for key, _ in selector.select(TICK_S):
                    if key.data == "metrics" and httpd is not None:
                        httpd.handle_request()
                    else:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 512)
                self._reap()
                if not ready_logged and all(self.board.started) and self.drain_deadline is None:
                    log.info("server_ready", **facts)  # once, when every worker first serves (each logged worker_ready)
                    ready_logged = True
                if self.drain_deadline is not None and time.monotonic() > self.drain_deadline:
                    self._kill_all("drain_timeout")
        finally:
            signal.set_wakeup_fd(-1)
            for thing in self._inherited:
                _close(thing)
        log.info("workers_stopped", exit_code=self.exit_code)
        return self.exit_code

    # -- workers --------------------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        self.board.clear(index)
        config = self.worker_config(self.port)
        parent = os.getpid()
        _flush_std_streams()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            code = 1
            try:
                self._forget_parent()
                code = run_worker(config, index, self.board, parent)
            except BaseException as e:
                log.exception("worker_crashed", worker=index, error=repr(e))
            finally:
                _flush_std_streams()
                os._exit(code)
        self.pids[pid] = index
        log.info("worker_started", worker=index, pid=pid)

    def _forget_parent(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for thing in self._inherited:
            with contextlib.suppress(OSError):
                _close(thing)

    def _reap(self) -> None:
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.pids.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            started = self.board.started[index] == pid
            self.board.clear(index)
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            if self.drain_deadline is not None:
                log.info("worker_stopped", worker=index, pid=pid, how=how)
                continue
            log.warning("worker_died", worker=index, pid=pid, how=how)
            if not started:
                self._give_up(f"worker {index} exited ({how}) before it started serving: see its start_failed line")
                continue
            now = time.monotonic()
            self.restarts.append(now)
            while self.restarts and self.restarts[0] < now - self.config.restart_period_s:
                self.restarts.popleft()
            if len(self.restarts) > self.config.restart_intensity:
                self._give_up(f"{len(self.restarts)} worker restarts within {self.config.restart_period_s:g} s")
                continue
            self.worker_restarts.inc()
            self._spawn(index)

    def _give_up(self, reason: str) -> None:
        log.error("workers_gave_up", reason=reason, action="draining the other workers, then exiting with status 1")
        self.exit_code = 1
        self._drain()

    def _drain(self) -> None:
        if self.drain_deadline is not None:
            return
        self.drain_deadline = time.monotonic() + self.config.grace_s + DRAIN_MARGIN_S
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _kill_all(self, why: str) -> None:
        log.warning("workers_killed", why=why, pids=sorted(self.pids))
        self.exit_code = 1
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _on_signal(self, signum: int, frame: object = None) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals > 1:  # a second signal: stop waiting for the drain
            self._kill_all(f"second signal ({name})")
            return
        self._drain()  # before its log line, so nothing a log sink does can keep it from happening
        log.info("signal_received", signal=name, action=f"draining {len(self.pids)} workers for up to {self.config.grace_s:g} s")


class _MetricsServer(http.server.HTTPServer):
    """/metrics of the group, served one request at a time from the parent's loop (no thread)."""

    timeout = SCRAPE_TIMEOUT_S

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry) -> None:
        self.registry = registry
        super().__init__(address, _MetricsHandler)


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    timeout = SCRAPE_TIMEOUT_S  # a client that sends nothing cannot hold the parent's loop

    def do_GET(self) -> None:
        assert isinstance(self.server, _MetricsServer)
        body = generate_latest(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would drown the server's own log


def _flush_std_streams() -> None:
    """Flush what a fork would copy; a closed pipe or a full disk must not stop a fork or an exit."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def _close(thing: Any) -> None:
    if isinstance(thing, int):
        os.close(thing)
    else:
        thing.close()


def _die_with_parent(parent: int) -> None:
    """SIGTERM (a drain) when the parent dies, even by SIGKILL: no orphan keeps the port (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_worker(config: ServerConfig, index: int, board: Board, parent: int) -> int:
    """A worker's whole life, in the forked child: one server, as ``python -m server`` runs it."""
    from engine.logs import bind_process
    from server.runtime.process import run_loop, run_server

    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the parent alone, which drains each worker once
    _die_with_parent(parent)
    bind_process(worker=index)  # on the lines of every thread, the engine's too

    def setup(server: GenServer) -> None:
        from prometheus_client import start_http_server

        server.reuse_port = True
        server.group_gate = board.gate(index)
        httpd, _ = start_http_server(0, addr="127.0.0.1", registry=server.metrics.registry)
        board.metrics_ports[index] = httpd.server_port

    return run_loop(run_server(config, setup))


def serve_workers(config: ServerConfig, collectors: Sequence[Collector] = ()) -> int:
    """``python -m server --workers N``: run the group until a signal; the parent's exit code.
    ``collectors`` join the group's /metrics (the front's refusals: server/runtime/front.py)."""
    group = WorkerGroup(config)
    for collector in collectors:
        group.registry.register(collector)
    return group.run()
