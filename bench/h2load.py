"""h2load (nghttp2's C HTTP/2 load generator) as the benchmark's driver of plain Generate calls.

Why not a Python client: on the project's 2-core machine a grpc.aio client process reached 2.9k
Generate calls/s against the bare echo, where h2load drove the same echo to 7.7-8.0k (issue 11):
the Python client was the bottleneck, so "server/echo" measured the client. h2load sends a gRPC
call as an HTTP/2 POST (body: the 5-byte gRPC frame header and the serialized request; headers
``content-type: application/grpc`` and ``te: trailers``).

h2load knows HTTP, not gRPC: every call it finishes is "2xx", whatever its grpc-status (a trailer).
Statuses are counted by bench/accounting.py from the servers' metrics; this module gives what h2load
itself knows: how many calls it started and finished, and each finished call's duration
(``--log-file``: start in us since the epoch, HTTP status, duration in us).

Install: ``scripts/bench_setup.sh`` (Debian/Ubuntu: ``apt-get install -y nghttp2-client``).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from genserve.v1 import generator_pb2 as pb

INSTALL_HINT = "h2load not found: run scripts/bench_setup.sh (it runs apt-get install -y nghttp2-client), or install nghttp2's h2load"
GENERATE_PATH = "/genserve.v1.Generator/Generate"
HEADERS = ("content-type: application/grpc", "te: trailers")
_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout")


def find() -> str:
    """The path of h2load, or RuntimeError saying how to install it."""
    path = shutil.which("h2load")
    if path is None:
        raise RuntimeError(INSTALL_HINT)
    return path


def grpc_frame(request: pb.GenerateRequest) -> bytes:
    """One gRPC message on the wire: uncompressed flag, 4-byte big-endian length, the bytes."""
    body = request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


def one_image_request() -> pb.GenerateRequest:
    """The benchmark's plain call: one VAE sample. One fixed seed: h2load sends the same body every time."""
    return pb.GenerateRequest(model="vae", image=pb.ImageParams(n=1, seed=1))


@dataclass(frozen=True)
class Run:
    """What h2load reports of one run, and the durations (seconds) of the calls it finished."""

    total: int  # calls it meant to send (its -n, or what the duration allowed)
    started: int
    done: int  # calls that got a complete response (any grpc-status)
    succeeded: int  # ... with HTTP 2xx: for gRPC, every call that had a response
    errored: int  # stream reset or connection lost before a response: no grpc-status at all
    wall_s: float
    durations: np.ndarray  # seconds, one per finished call
    output: str
    statuses: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # HTTP status of each finished call (HTTP peers)

    @property
    def calls_s(self) -> float:
        return self.done / self.wall_s if self.wall_s > 0 else 0.0


def parse(output: str, durations: np.ndarray, statuses: np.ndarray | None = None) -> Run:
    m = _REQUESTS.search(output)
    if m is None:
        raise RuntimeError(f"h2load gave no summary; its output ends:\n{output[-2000:]}")
    total, started, done, succeeded, _failed, errored, _timeout = (int(g) for g in m.groups())
    wall = re.search(r"finished in ([\d.]+)(ms|s),", output)
    wall_s = 0.0 if wall is None else float(wall.group(1)) / (1000.0 if wall.group(2) == "ms" else 1.0)
    return Run(total, started, done, succeeded, errored, wall_s, durations, output, np.zeros(0, np.int32) if statuses is None else statuses)


def read_log(path: Path) -> np.ndarray:
    """Durations in seconds from h2load's --log-file (start us, HTTP status, duration us per line)."""
    return read_log_statuses(path)[0]


def read_log_statuses(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Durations in seconds and HTTP statuses from h2load's --log-file (start us, HTTP status, duration us per line)."""
    text = path.read_text() if path.exists() else ""
    rows = [line.split("\t") for line in text.splitlines() if line.count("\t") == 2]
    durations = np.asarray([int(r[2]) for r in rows], dtype=np.float64) / 1e6
    return durations, np.asarray([int(r[1]) for r in rows], dtype=np.int32)


def command(
    port: int,
    body: Path,
    log_file: Path,
    *,
    duration_s: float | None = None,
    calls: int | None = None,
    connections: int = 1,
    streams: int = 64,
    rps: float | None = None,
    path: str = GENERATE_PATH,
    headers: tuple[str, ...] = HEADERS,
    h1: bool = False,
) -> list[str]:
    """The h2load command line: closed loop (``streams`` calls in flight per connection) or, with
    ``rps``, open loop at ``rps`` calls/s over all ``connections`` (h2load's --rps is per connection).
    ``h1``: HTTP/1.1, one call in flight per connection (no pipelining: ``streams`` is ignored), for HTTP peers."""
    cmd = [find(), "-c", str(connections), "-m", str(1 if h1 else streams), "-t", "1", "-d", str(body), "--log-file", str(log_file)]
    if h1:
        cmd.append("--h1")
    for header in headers:
        cmd += ["-H", header]
    if duration_s is not None:
        cmd += ["-D", f"{max(1, round(duration_s * 1000))}ms"]  # whole units only: "0.5" is refused
    else:
        cmd += ["-n", str(calls or 1)]
    if rps is not None:
        cmd += ["--rps", f"{max(rps / connections, 1.0):.1f}"]
    return [*cmd, f"http://127.0.0.1:{port}{path}"]


class H2Load:
    """Runs h2load against one port with one request body; one temporary folder for its files."""

    def __init__(
        self, request: pb.GenerateRequest | None = None, *, http_body: bytes | None = None, path: str = GENERATE_PATH,
        headers: tuple[str, ...] = HEADERS, h1: bool = False,
    ) -> None:  # fmt: skip
        """gRPC Generate by default; ``http_body`` (with ``path``, ``headers``, ``h1``) for an HTTP peer."""
        find()
        self._dir = tempfile.TemporaryDirectory(prefix="bench-h2load-")
        self.body = Path(self._dir.name) / "request.bin"
        self.body.write_bytes(http_body if http_body is not None else grpc_frame(request or one_image_request()))
        self._target: dict[str, Any] = {"path": path, "headers": headers, "h1": h1}
        self._runs = 0

    def start(self, port: int, **load: float | int | None) -> tuple[subprocess.Popen[str], Path]:
        """Start a run in the background (``command``'s keywords); ``finish`` collects it."""
        self._runs += 1
        log_file = Path(self._dir.name) / f"run-{self._runs}.log"
        cmd = command(port, self.body, log_file, **self._target, **load)  # type: ignore[arg-type]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        return proc, log_file

    def finish(self, started: tuple[subprocess.Popen[str], Path], timeout_s: float) -> Run:
        proc, log_file = started
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            raise RuntimeError(f"h2load ran past {timeout_s:.0f} s; its output ends:\n{output[-2000:]}") from None
        return parse(output, *read_log_statuses(log_file))

    def run(self, port: int, timeout_s: float = 120.0, **load: float | int | None) -> Run:
        return self.finish(self.start(port, **load), timeout_s)

    def close(self) -> None:
        self._dir.cleanup()
