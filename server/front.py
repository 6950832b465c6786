"""An nginx front on the server's port that refuses, in C, the plain calls past a limit (``--front-limit``).

Why: under a flood, what one Python process serves is bounded by what its refusals cost, not by
the policy. A refusal in grpc.aio costs ~45-90 us of the event loop (~90% of it grpc.aio's own
per-call work: py-spy, docs/benchmarks.md), a served call ~130-190 us at the closed loop's best,
so at twice the maximum the loop spends nearly all its time refusing. With r = (a refusal's loop
time) / (a served call's), goodput at 2x is at most (1 - 2r) / (1 - r) of the maximum: ~0.04-0.18
measured here, and >= 0.8 needs r <= 1/6. grpc core itself cannot refuse with a status of ours (its
backlog drops calls as CANCELLED), and grpcio's wheel exports none of grpc core's symbols (only
``PyInit_cygrpc``; stripped), so no extension of ours can refuse in C inside the process.

nginx can (its ``grpc_pass`` proxies HTTP/2 gRPC; the DESIGN's "servers behind a gRPC-aware load
balancer"): ``limit_conn`` counts the Generate calls in progress through the front (each HTTP/2
stream counts), and a call past ``limit`` gets a trailers-only ``RESOURCE_EXHAUSTED`` with
``grpc-retry-pushback-ms`` (the hint the SDK's retry policy honours) without reaching Python.
Everything else (GenerateStream, whose credits already bound it, health, reflection) passes with
no limit. The server behind keeps its own admission (delay, count): the front's limit is a cheap
outer bound. Measured (h2load, one-image VAE calls, 2-core VM, one run each): a closed loop of 64
calls through the front 6,454-6,840 calls/s against 8,412-8,678 direct; 2x of the front's maximum
(13,000/s, 10 s, limit 128) served 5,296/s OK (0.80 of its maximum), 66,849 refused by the front,
10,068 by the server, none ended otherwise; the server alone at 2x its maximum (17,000/s) 2,750/s.

The front counts its refusals in a log of one fixed 2-byte line each (nginx's open-source build has
no counters by status); ``FrontRefusals`` turns its size into ``genserve_front_refusals_total``.
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
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client.metrics_core import CounterMetricFamily, Metric

from engine.logs import get_logger
from server.config import ServerConfig

log = get_logger("server.front")

GENERATE_PATH = "/genserve.v1.Generator/Generate"
REFUSAL_LINE = b"R\n"  # what the front's refusal log gets per refusal: its size / 2 is the count
ROTATE_BYTES = 64 << 20  # the refusal log is rotated past this (32M refusals), nothing lost
INSTALL_HINT = "install nginx (Debian/Ubuntu: apt-get install nginx; macOS: brew install nginx) or name it with --front-nginx"
START_TIMEOUT_S = 10.0


class FrontError(RuntimeError):
    """The front cannot start: the message names what (the nginx binary, the port, its error log)."""


@dataclass(frozen=True)
class FrontPlan:
    """Where the front listens, where the server behind it listens, and what the front refuses."""

    listen_host: str
    listen_port: int
    upstream_port: int  # the server's gRPC port on 127.0.0.1
    limit: int  # Generate calls in progress let through; past it RESOURCE_EXHAUSTED from the front
    retry_after_ms: int
    workdir: Path

    @property
    def refusal_log(self) -> Path:
        return self.workdir / "refusals.log"

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"


def _listen_address(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def nginx_conf(plan: FrontPlan) -> str:
    """The front's whole nginx configuration.

    Timeouts are a day where nginx's defaults (60 s) would cut a long text stream or a quiet
    GenerateStream; the body size is unlimited because the server enforces its own message limit.
    """
    w = plan.workdir
    message = f"the front is at its limit of {plan.limit} Generate calls in progress; retry after {plan.retry_after_ms} ms"
    temp = "\n".join(f"  {name}_temp_path {w / name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""# written by genserve (server/front.py); regenerated at every start
worker_processes 1;
daemon off;
pid {w / "nginx.pid"};
error_log {plan.error_log} warn;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  server_tokens off;
  log_format genserve_refusal "R";
{temp}
  limit_conn_zone $server_port zone=genserve_generate:1m;
  upstream genserve {{
    server 127.0.0.1:{plan.upstream_port};
    keepalive {max(64, 2 * plan.limit)};
    keepalive_requests 1000000000;
    keepalive_timeout 1h;
  }}
  server {{
    listen {_listen_address(plan.listen_host, plan.listen_port)} http2;
    http2_max_concurrent_streams 1024;
    keepalive_requests 1000000000;
    keepalive_timeout 1h;
    client_max_body_size 0;
    client_body_timeout 1d;
    grpc_read_timeout 1d;
    grpc_send_timeout 1d;
    error_page 502 503 504 = @unavailable;
    location = {GENERATE_PATH} {{
      limit_conn genserve_generate {plan.limit};
      limit_conn_status 429;
      error_page 429 = @refused;
      grpc_pass grpc://genserve;
    }}
    location / {{
      grpc_pass grpc://genserve;
    }}
    location @refused {{
      access_log {plan.refusal_log} genserve_refusal;
      default_type application/grpc;
      add_header grpc-status 8 always;
      add_header grpc-message "{message}" always;
      add_header grpc-retry-pushback-ms {plan.retry_after_ms} always;
      return 200 "";
    }}
    location @unavailable {{
      default_type application/grpc;
      add_header grpc-status 14 always;
      add_header grpc-message "the server behind the front did not answer; retry" always;
      return 200 "";
    }}
  }}
}}
"""


def find_nginx(name: str) -> str:
    """The nginx binary: ``name`` as a path or on PATH (and /usr/sbin, where Debian puts it)."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]))
    if found is None:
        raise FrontError(f"front_nginx={name}: no such program; {INSTALL_HINT}")
    return found


def _die_with_parent() -> None:
    """In the forked child, before nginx runs: SIGTERM (nginx's fast shutdown) when the server dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class FrontRefusals:
    """``genserve_front_refusals_total``: the refusal log's size, rotated past ``ROTATE_BYTES``
    (renamed, nginx told to reopen: SIGUSR1; the old file is counted until the next rotation)."""

    def __init__(self, plan: FrontPlan, master_pid: Callable[[], int | None]) -> None:
        self.plan = plan
        self.master_pid = master_pid
        self.rotated_bytes = 0  # of files already counted and removed
        self.lock = threading.Lock()

    def _size(self, path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    def count(self) -> int:
        with self.lock:
            log_path = self.plan.refusal_log
            old = log_path.with_suffix(".log.1")
            current = self._size(log_path)
            if current > ROTATE_BYTES and (pid := self.master_pid()) is not None:
                self.rotated_bytes += self._size(old)  # written to long ago: nginx reopened after the last rotation
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
                os.rename(log_path, old)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)
            return (self.rotated_bytes + self._size(old) + self._size(log_path)) // len(REFUSAL_LINE)

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(
            "genserve_front_refusals_total", "Plain calls the nginx front refused past --front-limit", labels=["rpc", "code"]
        )
        family.add_metric(["Generate", "RESOURCE_EXHAUSTED"], self.count())
        return [family]


class Front:
    """The nginx process in front of the server: started before it, stopped after it, watched in between."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.nginx = find_nginx(config.front_nginx)
        self.workdir = Path(tempfile.mkdtemp(prefix="genserve-front-"))
        listen_port = config.port or free_port(config.host.strip("[]") if ":" not in config.host else "127.0.0.1")
        self.plan = FrontPlan(
            listen_host=config.host,
            listen_port=listen_port,
            upstream_port=free_port(),
            limit=config.front_limit,
            retry_after_ms=max(1, round(config.admission_interval_ms)),
            workdir=self.workdir,
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.died = False
        self.refusals = FrontRefusals(self.plan, lambda: None if self.process is None else self.process.pid)

    def server_config(self) -> ServerConfig:
        """The server's own settings behind the front: 127.0.0.1 on the upstream port, the rest unchanged."""
        c = self.config
        return replace(c, host="127.0.0.1", port=self.plan.upstream_port, front_limit=0, metrics_host=c.metrics_bind_host)

    def _check_port(self, address: str) -> None:
        """Refuse a taken port before nginx tries it (nginx retries a failed bind for ~2.5 s, and the
        readiness check would take the other listener for nginx)."""
        host = self.plan.listen_host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nginx binds: a TIME_WAIT port is free
            try:
                probe.bind((host, self.plan.listen_port))
            except OSError as e:
                shutil.rmtree(self.workdir, ignore_errors=True)
                raise FrontError(f"cannot listen on {address}: {e.strerror or e}; give another with --port N") from None

    def start(self) -> None:
        address = _listen_address(self.plan.listen_host, self.plan.listen_port)
        self._check_port(address)
        conf = self.workdir / "nginx.conf"
        conf.write_text(nginx_conf(self.plan))
        # nginx started as root runs its worker as nobody: it must reach the temp folders (big bodies)
        self.workdir.chmod(0o711)
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.workdir / name).mkdir(exist_ok=True)
            (self.workdir / name).chmod(0o777)
        cmd = [self.nginx, "-p", str(self.workdir), "-e", str(self.plan.error_log), "-c", str(conf)]
        try:
            # A session of its own: Ctrl-C in a terminal reaches the whole foreground group, and nginx
            # would stop at once while the server drains; the server stops it after draining instead.
            # With the server killed outright, the kernel ends nginx too (Linux: PR_SET_PDEATHSIG).
            self.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as e:
            raise FrontError(f"front_nginx={self.nginx}: {e}") from e
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace").strip() if self.process.stderr else ""
                if not err and self.plan.error_log.exists():
                    err = self.plan.error_log.read_text(errors="replace").strip()
                shutil.rmtree(self.workdir, ignore_errors=True)
                raise FrontError(f"the front (nginx) on {address} exited at start: {err.splitlines()[-1] if err else 'no message'}")
            if (self.workdir / "nginx.pid").exists() and self._listening():  # nginx writes its pid once it has bound the port
                break
            time.sleep(0.05)
        else:
            self.stop()
            raise FrontError(f"the front (nginx) did not listen on {address} within {START_TIMEOUT_S:g} s; see {self.plan.error_log}")
        threading.Thread(target=self._watch, name="front-watch", daemon=True).start()
        log.info(
            "front_ready",
            address=address,
            server=f"127.0.0.1:{self.plan.upstream_port}",
            limit=self.plan.limit,
            nginx=self.nginx,
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

    def _watch(self) -> None:
        """nginx gone while serving: the server drains and exits non-zero (a process manager takes over)."""
        assert self.process is not None
        code = self.process.wait()
        if self.stopping:
            return
        self.died = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # its worker, if the master alone died
        log.error("front_exited", code=code, action="draining the server", error_log=str(self.plan.error_log))
        os.kill(os.getpid(), signal.SIGTERM)

    def stop(self) -> None:
        """Stop nginx (SIGQUIT: it finishes what it proxies; SIGKILL after 5 s) and remove its folder."""
        self.stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(5.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            # a worker outlives a master that was killed (it keeps the port): end the whole group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        shutil.rmtree(self.workdir, ignore_errors=True)
