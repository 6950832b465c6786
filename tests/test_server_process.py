"""`python -m server` as a process: its --help, its errors, SIGTERM under load, a second signal."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


def run_server_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args], cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60
    )


class ServerProcess:
    """python -m server on a free port, JSON logs read on a thread; the address from its ready line."""

    def __init__(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "server", "--port", "0", "--metrics-port", "0", "--log-format", "json", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.events: list[dict[str, object]] = []
        self.ready = threading.Event()
        self.address = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(60):
            self.proc.kill()
            raise AssertionError(f"server did not become ready: {self.events[-5:]}")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.events.append(event)
            if event.get("event") == "server_ready":
                self.address = str(event["address"])
                self.ready.set()

    def names(self) -> list[object]:
        return [e.get("event") for e in self.events]


@pytest.fixture
def server_process(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    proc = ServerProcess(*getattr(request, "param", ()))
    yield proc
    if proc.proc.poll() is None:
        proc.proc.kill()
        proc.proc.wait()


def test_help_lists_every_option_with_its_environment_variable() -> None:
    result = run_server_cli("--help")
    assert result.returncode == 0
    for flag, env in [
        ("--batch-size", "GENSERVE_BATCH_SIZE"),
        ("--grace-s", "GENSERVE_GRACE_S"),
        ("--metrics-port", "GENSERVE_METRICS_PORT"),
    ]:
        assert flag in result.stdout and env in result.stdout
    assert "--restart-intensity" in result.stdout and "--stream-credits" in result.stdout


def test_bad_settings_are_refused_with_a_clear_message() -> None:
    result = run_server_cli(env={"GENSERVE_BATCH_SIZE": "lots"})
    assert result.returncode != 0 and "GENSERVE_BATCH_SIZE='lots' is not a valid int" in result.stderr
    result = run_server_cli("--batch-size", "0")
    assert result.returncode == 2 and "batch_size must be >= 1" in result.stderr
    result = run_server_cli("--models-dir", "no/such/folder", "--port", "0", "--metrics-port", "0")
    assert result.returncode == 1 and "no/such/folder" in result.stderr


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_taken_port_is_named_with_its_flag_and_no_stage_restarts(flag: str) -> None:
    with socket.socket() as taken:  # what a first server holds
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--port": "0", "--metrics-port": "0", flag: str(port)}
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


def test_sigterm_under_load_finishes_in_flight_work_and_exits_zero(server_process: ServerProcess) -> None:
    ready = next(e for e in server_process.events if e.get("event") == "server_ready")
    assert (ready["auth"], ready["public_health"]) == ("off", True)  # no tokens: health is open, and the line says so
    results: list[object] = []
    requests = [pb.GenerateRequest(model="transformer", text=pb.TextParams(prompt="ROMEO:", max_new_tokens=150, seed=i)) for i in range(6)]
    requests += [pb.GenerateRequest(model="vae", image=pb.ImageParams(n=500, seed=i)) for i in range(4)]
    threads = [threading.Thread(target=_generate, args=(server_process.address, r, results)) for r in requests]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(e.get("event") == "decode_loop_started" for e in server_process.events):
        time.sleep(0.01)
    time.sleep(0.3)  # the requests are in flight
    server_process.proc.send_signal(signal.SIGTERM)
    assert server_process.proc.wait(30) == 0
    for t in threads:
        t.join(10)
    assert len(results) == len(requests)
    # each one finished, or (had it not been admitted before the signal) was refused with UNAVAILABLE
    assert all((isinstance(r, pb.Finish) and r.code == 0) or r == grpc.StatusCode.UNAVAILABLE for r in results), results
    assert sum(isinstance(r, pb.Finish) for r in results) >= 1
    names = server_process.names()
    assert "signal_received" in names and "draining" in names and "stopped" in names


@pytest.mark.parametrize("server_process", [("--grace-s", "60", "--max-new-tokens", "4000")], indirect=True)
def test_a_second_signal_forces_the_exit(server_process: ServerProcess) -> None:
    results: list[object] = []
    request = pb.GenerateRequest(model="transformer", text=pb.TextParams(prompt="ROMEO:", max_new_tokens=4000, seed=1))
    thread = threading.Thread(target=_generate, args=(server_process.address, request, results))
    thread.start()
    time.sleep(1.0)
    server_process.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert server_process.proc.poll() is None  # draining: waits for the long request
    server_process.proc.send_signal(signal.SIGINT)
    assert server_process.proc.wait(10) == 1
    thread.join(10)
    assert "forced_exit" in server_process.names()
