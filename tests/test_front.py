"""The nginx front (``--front-limit``, server/front.py): past its limit a Generate call is refused by
nginx with RESOURCE_EXHAUSTED and the retry hint, counted in the server's /metrics; everything else
passes; a front that dies takes the server down non-zero; what it needs and lacks is named.

Without nginx the tests that run it skip, naming scripts/front_setup.sh; with CI=true they fail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.accounting import front_refusals, parse, statuses
from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.config import ServerConfig, parse_args
from server.front import GENERATE_PATH, FrontPlan, FrontRefusals, find_nginx, free_port, nginx_conf
from tests.serving import ServerProcess

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


def nginx_or_skip() -> str:
    try:
        return find_nginx("nginx")
    except RuntimeError as e:
        reason = f"{e} (scripts/front_setup.sh)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true requires the front's tests")
        pytest.skip(reason)


def plan(tmp_path: Path, limit: int = 7, host: str = "127.0.0.1") -> FrontPlan:
    return FrontPlan(
        listen_host=host, listen_port=free_port(), upstream_port=free_port(), limit=limit, retry_after_ms=250, workdir=tmp_path
    )


def test_the_config_limits_generate_only_and_refuses_with_the_hint(tmp_path: Path) -> None:
    conf = nginx_conf(plan(tmp_path))
    generate = conf[conf.index(f"location = {GENERATE_PATH}") :]
    generate = generate[: generate.index("}")]
    assert "limit_conn genserve_generate 7;" in generate and "error_page 429 = @refused;" in generate
    refused = conf[conf.index("location @refused") :]
    assert "grpc-status 8 always" in refused and "grpc-retry-pushback-ms 250 always" in refused
    assert "limit of 7 Generate calls in progress; retry after 250 ms" in refused
    assert conf.count("limit_conn ") == 1  # GenerateStream, health and reflection pass without a limit
    assert "listen [::]:" in nginx_conf(plan(tmp_path, host="::"))


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx = nginx_or_skip()
    p = plan(tmp_path)
    (tmp_path / "nginx.conf").write_text(nginx_conf(p))
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / name).mkdir()
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-e", str(p.error_log), "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_refusals_are_counted_from_the_log_across_a_rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = plan(tmp_path)
    counter = FrontRefusals(p, master_pid=lambda: os.getpid())
    assert counter.count() == 0  # no log yet: nothing refused
    p.refusal_log.write_bytes(b"R\n" * 5)
    assert counter.count() == 5
    monkeypatch.setattr("server.front.ROTATE_BYTES", 4)
    reopened: list[int] = []
    monkeypatch.setattr("server.front.os.kill", lambda pid, sig: reopened.append(sig))
    assert counter.count() == 5 and reopened == [signal.SIGUSR1]  # rotated: nginx told to reopen, nothing lost
    with p.refusal_log.open("ab") as log:  # nginx writes the new file
        log.write(b"R\n" * 3)
    assert counter.count() == 8
    [sample] = [s for family in counter.collect() for s in family.samples]
    assert sample.name == "genserve_front_refusals_total" and sample.value == 8
    assert sample.labels == {"rpc": "Generate", "code": "RESOURCE_EXHAUSTED"}


def test_the_benchmarks_accounting_counts_the_fronts_refusals() -> None:
    sample = parse(
        'genserve_requests_total{code="OK",model="vae",rpc="Generate"} 10\n'
        'genserve_front_refusals_total{code="RESOURCE_EXHAUSTED",rpc="Generate"} 4\n'
        'genserve_rejections_total{code="RESOURCE_EXHAUSTED",rpc="Generate"} 1\n'
    )
    assert statuses(sample) == {"OK": 10, "RESOURCE_EXHAUSTED": 5}
    assert front_refusals(sample) == 4


def test_a_front_with_tls_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="front_limit=4 with tls_cert"):
        ServerConfig(front_limit=4, tls_cert="c.pem", tls_key="k.pem")
    assert parse_args(["--front-limit", "8"]).front_limit == 8


def test_a_missing_nginx_is_named_before_anything_loads() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "--port", "0", "--metrics-port", "0", "--front-limit", "4", "--front-nginx", "/no/such/nginx"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "front_nginx=/no/such/nginx: no such program" in result.stderr and "install nginx" in result.stderr
    assert "model_loaded" not in result.stderr


def test_a_taken_port_is_named() -> None:
    nginx_or_skip()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "server", "--port", str(port), "--metrics-port", "0", "--front-limit", "4"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "another with --port N" in result.stderr
    assert "model_loaded" not in result.stderr


@pytest.fixture
def front_server() -> Iterator[tuple[ServerProcess, str, int]]:
    nginx_or_skip()
    metrics_port = free_port()
    proc = ServerProcess("--front-limit", "1", "--metrics-port", str(metrics_port))
    try:
        front = proc.wait_for("front_ready", 30)
        proc.wait_for("server_ready", 60)
        yield proc, str(front["address"]), metrics_port
    finally:
        proc.stop()


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return sum(v for (n, _), v in parse(response.read().decode()).items() if n == name)


def one_image(stub: pb_grpc.GeneratorStub) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(model="vae", image=pb.ImageParams(n=1, seed=3)), timeout=10))


def test_past_its_limit_the_front_refuses_with_resource_exhausted_and_dies_loudly(front_server: tuple[ServerProcess, str, int]) -> None:
    proc, address, metrics_port = front_server
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        assert one_image(stub)  # served through the front
        # One text call in progress holds the front's only Generate slot (1024 tokens take ~1 s or more).
        holder = stub.Generate(pb.GenerateRequest(model="transformer", text=pb.TextParams(prompt="ROMEO:", max_new_tokens=1024, seed=1)))
        next(holder)
        with pytest.raises(grpc.RpcError) as refused:
            one_image(stub)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 1 Generate calls in progress" in str(refused.value.details())
        assert ("grpc-retry-pushback-ms", "100") in [(m.key, m.value) for m in refused.value.trailing_metadata() or ()]
        # Not limited: health, and the other RPCs.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        holder.cancel()
        deadline = time.monotonic() + 10
        while True:  # the slot comes back once nginx has seen the held call end
            try:
                assert one_image(stub)
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.05)
    assert metric(metrics_port, "genserve_front_refusals_total") >= 1
    assert metric(metrics_port, "genserve_rejections_total") == 0  # the server itself refused nothing

    workdir = Path(str(proc.find("front_ready")[0]["workdir"]))
    master = int((workdir / "nginx.pid").read_text())
    worker = int(Path(f"/proc/{master}/task/{master}/children").read_text().split()[0])
    os.kill(master, signal.SIGKILL)  # the front dies under the server
    assert proc.wait_exit(30) == 1
    deadline = time.monotonic() + 5
    while alive(worker):
        assert time.monotonic() < deadline, "the front's worker outlived it (and would keep the port)"
        time.sleep(0.05)
    assert "front_exited" in proc.names()
    assert not workdir.exists()
