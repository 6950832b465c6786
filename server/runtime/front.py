"""A HAProxy front on the server's port that holds plain calls past a limit in a short queue and
refuses the rest in C (``--front-limit N``, ``--front-queue Q``).

HAProxy listens on the server's port and the server on a free 127.0.0.1 port behind it.
``maxconn`` on the Generate backend's server line keeps N calls in the server and holds the next
ones in a FIFO; a call that finds Q already waiting is refused by HAProxy itself
(RESOURCE_EXHAUSTED with the retry hint). When k calls end, k queued ones go in together, so the
server batches them. Only Generate is limited; GenerateStream (its credits already bound it),
health and reflection go through a second backend with no limit. The server behind keeps its own
admission. Refusals are read from HAProxy's stats socket (the frontend's ``intercepted``
requests: only the refusal is answered by HAProxy itself) into ``genserve_front_refusals_total``.

Why a front, and why HAProxy (a refusal in grpc.aio costs the event loop a good part of a served
call, and nothing inside the process can refuse in C): docs/design/haproxy-front.md
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine.logs import get_logger
from server.config import ServerConfig
from server.pipeline.statuses import overloaded, retryable

log = get_logger("server.runtime.front")

GENERATE_PATH = "/genserve.v1.Generator/Generate"
INSTALL_HINT = "install haproxy (Debian/Ubuntu: apt-get install haproxy; macOS: brew install haproxy) or name it with --front-haproxy"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
CONNECTIONS_PER_WORKER = 4  # with --workers N: the kernel spreads connections over the workers (SO_REUSEPORT), not calls


class FrontError(RuntimeError):
    """The front cannot start: the message names what (the haproxy binary, the port, its error)."""


@dataclass(frozen=True)
class FrontPlan:
    """Where the front listens, where the server behind it listens, and what the front holds and refuses."""

    listen_host: str
    listen_port: int
    upstream_port: int  # the server's gRPC port on 127.0.0.1
    limit: int  # Generate calls in progress in the server
    queue: int  # Generate calls waiting in the front for one of them; a call that finds this many is refused
    retry_after_ms: int
    workdir: Path
    queue_timeout_s: float = 30.0  # a queued call the server has not taken by then gets UNAVAILABLE (a stuck server)
    upstreams: int = 1  # server lines in the Generate backend (connections to spread over --workers)
    tls_pem: Path | None = None  # the certificate chain and its key in one file (HAProxy's crt): TLS at the front
    client_ca: str = ""  # with tls_pem: client certificates must chain to this CA (mutual TLS)

    @property
    def stats_socket(self) -> Path:
        return self.workdir / "stats.sock"

    @property
    def config_file(self) -> Path:
        return self.workdir / "haproxy.cfg"


def _listen_address(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_address(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"ipv6@{host}:{port}" if ":" in host else f"{host}:{port}"


def _bind_options(plan: FrontPlan) -> str:
    """Plaintext HTTP/2, or TLS offering h2 by ALPN (gRPC's), mutual with a client CA."""
    if plan.tls_pem is None:
        return "proto h2"
    verify = f" ca-file {plan.client_ca} verify required" if plan.client_ca else ""
    return f"ssl crt {plan.tls_pem} alpn h2{verify}"


def haproxy_cfg(plan: FrontPlan) -> str:
    """The front's whole HAProxy configuration.

    Timeouts are a day where a text stream or a quiet GenerateStream may last long; HAProxy streams
    bodies (no size limit of its own), so the server's message limit applies. Errors HAProxy makes
    itself (the server gone: 502/503/504) become UNAVAILABLE, which the SDK retries.
    """
    message = overloaded(
        f"the front is at its limit of {plan.limit} Generate calls in progress and {plan.queue} waiting", plan.retry_after_ms
    ).message
    refuse = (
        f'http-request return status 200 hdr grpc-status 8 hdr grpc-message "{message}" '
        f"hdr grpc-retry-pushback-ms {plan.retry_after_ms} "
        f"if generate {{ queue(generate) ge {plan.queue} }} {{ be_conn(generate) ge {plan.limit} }}"
    )
    unavailable = retryable("the server behind the front did not answer")[1]
    errors = "\n".join(f'  http-error status {code} hdr grpc-status 14 hdr grpc-message "{unavailable}"' for code in (502, 503, 504))
    per_line = -(-plan.limit // plan.upstreams)  # ceil: the lines' slots add up to at least the limit
    generate_servers = "\n".join(
        f"  server genserve{i} 127.0.0.1:{plan.upstream_port} proto h2 maxconn {per_line}" for i in range(plan.upstreams)
    )
    other_servers = "\n".join(f"  server genserve{i} 127.0.0.1:{plan.upstream_port} proto h2" for i in range(plan.upstreams))
    return f"""# written by genserve (server/runtime/front.py); regenerated at every start
global
  nbthread 1
  hard-stop-after {STOP_TIMEOUT_S:g}s
  stats socket {plan.stats_socket} mode 600 level user
  # calls in flight on one client connection (HAProxy's default is 100; gRPC clients multiplex more)
  tune.h2.max-concurrent-streams 1024

defaults
  mode http
  timeout connect 1s
  retries 1
  timeout client 1d
  timeout server 1d
  timeout queue {plan.queue_timeout_s:g}s
{errors}

frontend genserve
  bind {_bind_address(plan.listen_host, plan.listen_port)} {_bind_options(plan)}
  acl generate path {GENERATE_PATH}
  # Refused here, in C, at arrival: every slot in the server taken and {plan.queue} calls already waiting.
  {refuse}
  use_backend generate if generate
  default_backend other

# {plan.limit} Generate calls in the server, the next ones wait here (FIFO) and go in as calls end
backend generate
  http-reuse always
  balance leastconn
{generate_servers}

# GenerateStream, health, reflection, ListModels: no limit here (the server's own admission applies)
backend other
  http-reuse always
  balance leastconn
{other_servers}
"""


def find_haproxy(name: str) -> str:
    """The haproxy binary: ``name`` as a path or on PATH (and /usr/sbin, where Debian puts it)."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]))
    if found is None:
        raise FrontError(f"front_haproxy={name}: no such program; {INSTALL_HINT}")
    return found


def _die_with_parent() -> None:
    """In the forked child, before haproxy runs: SIGTERM (its hard stop) when the server dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def read_stats(path: Path, timeout_s: float = 2.0) -> list[dict[str, str]]:
    """HAProxy's ``show stat`` over its stats socket: one dict per proxy and server line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(str(path))
        s.sendall(b"show stat\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    lines = b"".join(chunks).decode(errors="replace").splitlines()
    if not lines or not lines[0].startswith("# "):
        raise OSError(f"{path}: not HAProxy's stats ({lines[:1]})")
    header = lines[0][2:].split(",")
    return [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]


class FrontStats:
    """The front's figures in the server's /metrics, read from HAProxy's stats socket at each scrape:
    ``genserve_front_refusals_total`` (its frontend's intercepted requests: HAProxy answers nothing
    else itself) and ``genserve_front_queued_calls``. A scrape while HAProxy is gone keeps the last figures."""

    def __init__(self, plan: FrontPlan) -> None:
        self.plan = plan
        self.lock = threading.Lock()
        self.refused = 0
        self.queued = 0

    def read(self) -> tuple[int, int]:
        with self.lock:
            try:
                rows = read_stats(self.plan.stats_socket)
            except OSError:
                return self.refused, self.queued
            for row in rows:
                if row.get("pxname") == "genserve" and row.get("svname") == "FRONTEND":
                    self.refused = max(self.refused, int(row.get("intercepted") or 0))
                if row.get("pxname") == "generate" and row.get("svname") == "BACKEND":
                    self.queued = int(row.get("qcur") or 0)
            return self.refused, self.queued

    def collect(self) -> list[Metric]:
        refused, queued = self.read()
        refusals = CounterMetricFamily(
            "genserve_front_refusals_total",
            "Plain calls the HAProxy front refused past --front-limit and --front-queue",
            labels=["rpc", "code"],
        )
        refusals.add_metric(["Generate", "RESOURCE_EXHAUSTED"], refused)
        waiting = GaugeMetricFamily("genserve_front_queued_calls", "Generate calls waiting in the front for a slot in the server")
        waiting.add_metric([], queued)
        return [refusals, waiting]


WORKDIR_PREFIX = "genserve-front-"
STALE_AFTER_S = 60.0


def sweep_stale_workdirs(parent: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove the folders of fronts whose server was killed outright (nothing ran to remove them):
    older than a minute, and their stats socket answers no one. Returns what it removed."""
    parent = Path(tempfile.gettempdir()) if parent is None else parent
    now = time.time() if now is None else now
    removed = []
    for folder in parent.glob(WORKDIR_PREFIX + "*"):
        try:
            if not folder.is_dir() or now - folder.stat().st_mtime < STALE_AFTER_S:
                continue
        except OSError:
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(folder / "stats.sock"))
                continue  # a live front
            except OSError:
                pass
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


class Front:
    """The haproxy process in front of the server: started before it, stopped after it, watched in between."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.haproxy = find_haproxy(config.front_haproxy)
        sweep_stale_workdirs()
        self.workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        listen_port = config.port or free_port(config.host.strip("[]") if ":" not in config.host else "127.0.0.1")
        self.plan = FrontPlan(
            listen_host=config.host,
            listen_port=listen_port,
            upstream_port=free_port(),
            limit=config.front_limit,
            queue=config.front_queue_calls,
            retry_after_ms=max(1, round(config.admission_interval_ms)),
            workdir=self.workdir,
            queue_timeout_s=config.request_timeout_s,
            upstreams=1 if config.workers <= 1 else CONNECTIONS_PER_WORKER * config.workers,
            tls_pem=self._tls_pem(config),
            client_ca=str(Path(config.tls_client_ca).resolve()) if config.tls_client_ca else "",
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.died = False
        self.stats = FrontStats(self.plan)

    def _tls_pem(self, config: ServerConfig) -> Path | None:
        """--tls-cert and --tls-key checked as the server checks them (each bad file named), then
        written into one file for HAProxy, readable by this user only."""
        if not config.tls_cert:
            return None
        from server.grpc_edge.auth import SecurityError, server_credentials

        try:
            server_credentials(config)
        except SecurityError as e:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise FrontError(str(e)) from None
        pem = self.workdir / "tls.pem"
        pem.touch(mode=0o600)
        chain = Path(config.tls_cert).read_bytes().rstrip(b"\n") + b"\n"
        pem.write_bytes(chain + Path(config.tls_key).read_bytes())
        return pem

    def server_config(self) -> ServerConfig:
        """The server's own settings behind the front: plaintext on 127.0.0.1 (TLS, if any, ends at the
        front), the rest unchanged; it logs the front's address as the one clients use."""
        c = self.config
        return replace(
            c,
            host="127.0.0.1",
            port=self.plan.upstream_port,
            front_limit=0,
            metrics_host=c.metrics_bind_host,
            tls_cert="",
            tls_key="",
            tls_client_ca="",
            front_address=_listen_address(self.plan.listen_host, self.plan.listen_port),
            http_host=c.host,  # the HTTP edge serves beside the front, on the public host with the TLS files given
            http_tls_cert=c.tls_cert,
            http_tls_key=c.tls_key,
            http_tls_client_ca=c.tls_client_ca,
            front_tls=self.plan.tls_pem is not None,
        )

    def _check_port(self, address: str) -> None:
        """Refuse a taken port by name before haproxy tries it (its own message is less plain)."""
        host = self.plan.listen_host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as haproxy binds: a TIME_WAIT port is free
            try:
                probe.bind((host, self.plan.listen_port))
            except OSError as e:
                shutil.rmtree(self.workdir, ignore_errors=True)
                raise FrontError(f"cannot listen on {address}: {e.strerror or e}; give another with --port N") from None

    def start(self) -> None:
        address = _listen_address(self.plan.listen_host, self.plan.listen_port)
        self._check_port(address)
        self.plan.config_file.write_text(haproxy_cfg(self.plan))
        # -db: in the foreground, one process (no master, no daemon): its pid is the one to watch
        cmd = [self.haproxy, "-db", "-f", str(self.plan.config_file)]
        try:
            # A session of its own: Ctrl-C in a terminal reaches the whole foreground group, and haproxy
            # would stop at once while the server drains; the server stops it after draining instead.
            # With the server killed outright, the kernel ends haproxy too (Linux: PR_SET_PDEATHSIG).
            self.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as e:
            raise FrontError(f"front_haproxy={self.haproxy}: {e}") from e
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace").strip() if self.process.stderr else ""
                alerts = [line for line in err.splitlines() if "ALERT" in line] or err.splitlines()
                shutil.rmtree(self.workdir, ignore_errors=True)
                raise FrontError(f"the front (haproxy) on {address} exited at start: {alerts[0] if alerts else 'no message'}")
            if self.plan.stats_socket.exists() and self._listening():  # bound, and its stats socket is up
                break
            time.sleep(0.05)
        else:
            self.stop()
            raise FrontError(f"the front (haproxy) did not listen on {address} within {START_TIMEOUT_S:g} s")
        # HAProxy has read its configuration and certificate: the copy of the key goes now, not at stop
        # (a server killed outright never gets there)
        self.plan.config_file.unlink(missing_ok=True)
        if self.plan.tls_pem is not None:
            self.plan.tls_pem.unlink(missing_ok=True)
        if self.process.stderr is not None:
            threading.Thread(target=self._relay_stderr, name="front-stderr", daemon=True).start()
        threading.Thread(target=self._watch, name="front-watch", daemon=True).start()
        log.info(
            "front_ready",
            address=address,
            server=f"127.0.0.1:{self.plan.upstream_port}",
            limit=self.plan.limit,
            queue=self.plan.queue,
            tls="off" if self.plan.tls_pem is None else "mutual" if self.plan.client_ca else "on",
            haproxy=self.haproxy,
            workdir=str(self.workdir),
        )

    def _listening(self) -> bool:
        host = self.plan.listen_host.strip("[]")
        host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
        try:
            with socket.create_connection((host, self.plan.listen_port), timeout=0.5):
                return True
        except OSError:
            return False

    def _relay_stderr(self) -> None:
        """haproxy's own warnings and alerts into the server's log (and its pipe never fills)."""
        assert self.process is not None and self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode(errors="replace").strip()
            if line and "NOTICE" not in line and not self.stopping:  # its soft stop lists every proxy it stops
                log.warning("front_says", line=line)

    def _watch(self) -> None:
        """haproxy gone while serving: the server drains and exits non-zero (a process manager takes over)."""
        assert self.process is not None
        code = self.process.wait()
        if self.stopping:
            return
        self.died = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # anything it left in its group
        log.error("front_exited", code=code, action="draining the server")
        os.kill(os.getpid(), signal.SIGTERM)

    def stop(self) -> None:
        """Stop haproxy (SIGUSR1: a soft stop, it finishes what it proxies; SIGKILL after 5 s) and remove its folder."""
        self.stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGUSR1)
            try:
                self.process.wait(STOP_TIMEOUT_S + 1.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        shutil.rmtree(self.workdir, ignore_errors=True)
