"""`python -m server` as a process (server/runtime/process.py): start-up errors named, SIGTERM under
load, a second signal, a log pipe that closes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from tests.paths import ROOT
from tests.serving import ServerProcess, run_server_cli

pytestmark = pytest.mark.timeout(120)


class ReadyServer(ServerProcess):
    """A server process that has logged ``server_ready``; its address from that line."""

    def __init__(self, *args: str) -> None:
        super().__init__(*args)
        try:
            self.address = str(self.wait_for("server_ready", 60)["address"])
        except AssertionError:
            self.stop()
            raise


@pytest.fixture
def server_process(request: pytest.FixtureRequest) -> Iterator[ReadyServer]:
    proc = ReadyServer(*getattr(request, "param", ()))
    yield proc
    proc.stop()


@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--http-port"])
def test_a_taken_port_is_named_with_its_flag_and_no_stage_restarts(flag: str) -> None:
    with socket.socket() as taken:  # what a first server holds
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--port": "0", "--metrics-port": "0", "--http-port": "0", flag: str(port)}
        result = run_server_cli(*[a for pair in ports.items() for a in pair])
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and f"another with {flag} N" in result.stderr
    assert "stage_restarted" not in result.stderr and "model_loaded" not in result.stderr  # it failed before loading anything


def test_an_empty_models_folder_is_named(tmp_path: Path) -> None:
    result = run_server_cli("--models-dir", str(tmp_path), "--port", "0", "--metrics-port", "0")
    assert result.returncode == 1 and f"no model files (*.safetensors) in {tmp_path}" in result.stderr
    assert "model_refused" not in result.stderr


def _generate(address: str, request: pb.GenerateRequest, results: list[object]) -> None:
    with grpc.insecure_channel(address) as channel:
        try:
            messages = list(pb_grpc.GeneratorStub(channel).Generate(request, timeout=30))
            results.append(messages[-1].finish)
        except grpc.RpcError as e:
            results.append(e.code())


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """A bounded poll of a condition (no sleep standing in for one)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s")
        time.sleep(0.005)


def readiness(channel: grpc.Channel) -> int:
    return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)


# 600 tokens: ~3 s at 5 ms a token on this shared 2-core machine. The checks after the signal take
# milliseconds, so the request is still in flight during them on any machine short of ~50x faster.
LONG = 600


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("server_process", [("--grace-s", "60")], indirect=True)
def test_a_signal_drains_in_flight_work_refuses_new_work_and_exits_zero(server_process: ReadyServer, sig: signal.Signals) -> None:
    """A first SIGTERM or SIGINT: readiness NOT_SERVING, new calls UNAVAILABLE, in-flight work finishes within --grace-s.

    With the signal path draining for 0 s instead, the in-flight request would fail with UNAVAILABLE.
    """
    ready = next(e for e in server_process.events if e.get("event") == "server_ready")
    assert (ready["auth"], ready["public_health"]) == ("off", True)  # no tokens: health is open, and the line says so
    request = pb.GenerateRequest(model="transformer", text=pb.TextParams(prompt="ROMEO:", max_new_tokens=LONG, seed=1))
    with grpc.insecure_channel(server_process.address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        assert readiness(channel) == health_pb2.HealthCheckResponse.SERVING
        call = stub.Generate(request, timeout=60)
        assert next(call).HasField("text")  # admitted and generating
        server_process.proc.send_signal(sig)
        wait_for(lambda: readiness(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, "readiness NOT_SERVING")
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(model="vae", image=pb.ImageParams(n=1, seed=1)), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in (info.value.details() or "")
        rest = list(call)
        assert rest[-1].finish.code == 0 and rest[-1].finish.reason == pb.FINISH_REASON_LENGTH and rest[-1].finish.n_generated == LONG
    assert server_process.wait_exit(30) == 0
    stopped = [e for e in server_process.events if e.get("event") == "stopped"]
    assert stopped and stopped[0]["failed"] == 0 and stopped[0]["in_time"] is True
    assert "signal_received" in server_process.names() and "draining" in server_process.names()


@pytest.mark.parametrize("server_process", [("--grace-s", "60", "--max-new-tokens", "4000")], indirect=True)
def test_a_second_signal_forces_the_exit(server_process: ReadyServer) -> None:
    results: list[object] = []
    request = pb.GenerateRequest(model="transformer", text=pb.TextParams(prompt="ROMEO:", max_new_tokens=4000, seed=1))
    with grpc.insecure_channel(server_process.address) as channel:
        call = pb_grpc.GeneratorStub(channel).Generate(request, timeout=60)
        assert next(call).HasField("text")  # admitted: the drain must wait for it
        server_process.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining" in server_process.names(), "the drain began")
        assert server_process.proc.poll() is None  # draining: waits for the long request
        server_process.proc.send_signal(signal.SIGINT)
        assert server_process.wait_exit(10) == 1
        with pytest.raises(grpc.RpcError):
            results.extend(call)
    assert "forced_exit" in server_process.names()


def _metric(port: int, name: str) -> float:
    """The sum of every sample of ``name`` on the /metrics at ``port`` (0 when there is none)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name) and not line.startswith("#"))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_closed_log_pipe_neither_stops_serving_nor_deafens_the_server_to_sigterm(tmp_path: Path, workers: str) -> None:
    """Issue 31: a log call that raised on a pipe with no reader kept SIGTERM from scheduling the
    drain (the server stayed up until kill -9). Lines that cannot be written are dropped and counted."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "vae.safetensors").symlink_to(ROOT / "models" / "vae.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "server", "--port", "0", "--metrics-port", str(metrics_port), "--http-port", "0", "--log-format", "json"]
    cmd += ["--models-dir", str(models), "--workers", workers, "--models-poll-s", "0.2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        ready: dict[str, Any] = {}
        for line in proc.stdout:  # up to the one readiness line (a group's: once every worker serves)
            if '"server_ready"' in line:
                ready = json.loads(line)
                break
        assert ready, "the server never logged server_ready"
        assert ready["metrics"] == f"http://127.0.0.1:{metrics_port}/metrics"
        if workers == "2":
            assert ready["workers"] == 2
        address = str(ready["address"])
        proc.stdout.close()  # the log pipe now has no reader: every write gets EPIPE
        (models / "broken.safetensors").write_bytes(b"not a model")  # the watcher logs its refusal: dropped

        deadline = time.monotonic() + 30
        while _metric(metrics_port, "genserve_log_lines_dropped_total") < 1:
            assert time.monotonic() < deadline, "no log line was counted as dropped"
            time.sleep(0.2)
        port = address.rsplit(":", 1)[1]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # still serving
            call = pb_grpc.GeneratorStub(channel).Generate(pb.GenerateRequest(model="vae", image=pb.ImageParams(n=2, seed=1)), timeout=30)
            assert sum(r.images.count for r in call) == 2
        assert _metric(metrics_port, "genserve_stage_restarts_total") == 0

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
