"""The HAProxy front (``--front-limit N``, ``--front-queue Q``, server/runtime/front.py): N Generate calls in
the server, Q more waiting in the front, and past them a call is refused by HAProxy with
RESOURCE_EXHAUSTED and the retry hint, counted in the server's /metrics; everything else passes;
a front that dies takes the server down non-zero; what it needs and lacks is named.

Without haproxy the tests that run it skip, naming scripts/front_setup.sh; with CI=true they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.accounting import parse
from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.config import ServerConfig, parse_args
from server.runtime.front import GENERATE_PATH, FrontPlan, FrontStats, free_port, haproxy_cfg, sweep_stale_workdirs
from tests.paths import ROOT
from tests.pki import make_ca, make_leaf
from tests.serving import ServerProcess, haproxy_or_skip, run_server_cli

pytestmark = pytest.mark.timeout(120)


def plan(tmp_path: Path, limit: int = 7, queue: int = 3, host: str = "127.0.0.1", upstreams: int = 1) -> FrontPlan:
    return FrontPlan(
        listen_host=host,
        listen_port=free_port(),
        upstream_port=free_port(),
        limit=limit,
        queue=queue,
        retry_after_ms=250,
        workdir=tmp_path,
        upstreams=upstreams,
    )


def section(conf: str, start: str) -> str:
    """One section of a HAProxy config: from its first line to the next blank line."""
    text = conf[conf.index(start) :]
    return text[: text.index("\n\n")] if "\n\n" in text else text


def test_the_config_limits_generate_only_queues_a_few_and_refuses_with_the_hint(tmp_path: Path) -> None:
    conf = haproxy_cfg(plan(tmp_path, upstreams=1))
    front = section(conf, "frontend genserve")
    [refusal] = [line for line in front.splitlines() if "http-request return" in line]
    assert "grpc-status 8" in refusal and "grpc-retry-pushback-ms 250" in refusal
    assert "limit of 7 Generate calls in progress and 3 waiting; retry after 250 ms" in refusal
    assert refusal.endswith("if generate { queue(generate) ge 3 } { be_conn(generate) ge 7 }")
    assert f"acl generate path {GENERATE_PATH}" in front and "use_backend generate if generate" in front
    assert "default_backend other" in front
    generate = section(conf, "\nbackend generate")
    assert generate.count("maxconn 7") == 1 and "proto h2" in generate  # 7 in the server, the next ones wait in its queue
    assert "maxconn" not in section(conf, "\nbackend other")  # GenerateStream, health and reflection pass without a limit
    # with --workers: several lines (connections for the kernel to spread), their slots adding up to the limit
    spread = section(haproxy_cfg(plan(tmp_path, limit=10, upstreams=4)), "\nbackend generate")
    assert spread.count(" maxconn 3") == 4
    assert "bind ipv6@:::" in haproxy_cfg(plan(tmp_path, host="::"))


def test_with_tls_the_front_terminates_it_offering_h2(tmp_path: Path) -> None:
    p = replace(plan(tmp_path), tls_pem=tmp_path / "tls.pem", client_ca="/ca.pem")
    [bind] = [line for line in haproxy_cfg(p).splitlines() if line.startswith("  bind ")]
    assert bind.endswith(f"ssl crt {tmp_path / 'tls.pem'} alpn h2 ca-file /ca.pem verify required")
    assert "proto h2" in next(line for line in haproxy_cfg(plan(tmp_path)).splitlines() if line.startswith("  bind "))


def test_haproxy_accepts_the_config(tmp_path: Path) -> None:
    haproxy = haproxy_or_skip()
    p = plan(tmp_path)
    p.config_file.write_text(haproxy_cfg(p))
    result = subprocess.run([haproxy, "-c", "-f", str(p.config_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr


class FakeStatsSocket:
    """A unix socket answering ``show stat`` as HAProxy does, with the frontend's figures given."""

    def __init__(self, path: Path, intercepted: int, queued: int) -> None:
        self.path = path
        self.intercepted, self.queued = intercepted, queued
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                if conn.recv(100) != b"show stat\n":  # a probe that only connects (the sweep's)
                    continue
                conn.sendall(
                    b"# pxname,svname,qcur,scur,intercepted,\n"
                    + f"genserve,FRONTEND,,0,{self.intercepted},\n".encode()
                    + f"generate,genserve0,{self.queued},7,,\n".encode()
                    + f"generate,BACKEND,{self.queued},7,,\n".encode()
                    + b"other,BACKEND,0,0,,\n\n"
                )

    def close(self) -> None:
        self.sock.close()
        self.path.unlink()


def test_refusals_and_queued_calls_are_read_from_the_stats_socket(tmp_path: Path) -> None:
    p = plan(tmp_path)
    stats = FrontStats(p)
    assert stats.read() == (0, 0)  # no socket yet: nothing refused, nothing waiting
    fake = FakeStatsSocket(p.stats_socket, intercepted=5, queued=2)
    assert stats.read() == (5, 2)
    fake.intercepted, fake.queued = 8, 0
    families = {f.name: f for f in stats.collect()}
    [refused] = families["genserve_front_refusals"].samples
    assert refused.name == "genserve_front_refusals_total" and refused.value == 8
    assert refused.labels == {"rpc": "Generate", "code": "RESOURCE_EXHAUSTED"}
    assert families["genserve_front_queued_calls"].samples[0].value == 0
    fake.close()
    assert stats.read() == (8, 0)  # haproxy gone: the last figures stay (a counter never goes back)


def test_folders_of_fronts_killed_outright_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    stale, live, young = (tmp_path / f"genserve-front-{name}" for name in ("stale", "live", "young"))
    for folder in (stale, live, young):
        folder.mkdir()
    (stale / "stats.sock").touch()  # its haproxy is gone: nobody listens
    FakeStatsSocket(live / "stats.sock", intercepted=0, queued=0)
    now = time.time()
    for folder in (stale, live):
        os.utime(folder, (now - 120, now - 120))
    assert sweep_stale_workdirs(tmp_path, now=now) == [stale]
    assert not stale.exists() and live.exists() and young.exists()  # young: maybe a front still starting


def test_the_fronts_settings_are_checked_by_name() -> None:
    with pytest.raises(ValueError, match="front_queue must be >= 0"):
        ServerConfig(front_limit=4, front_queue=-2)
    config = parse_args(["--front-limit", "8"])
    assert config.front_limit == 8 and config.front_queue_calls == 4  # the queue defaults to half the limit
    assert parse_args(["--front-limit", "8", "--front-queue", "0"]).front_queue_calls == 0


def test_a_missing_haproxy_is_named_before_anything_loads() -> None:
    result = run_server_cli("--port", "0", "--metrics-port", "0", "--front-limit", "4", "--front-haproxy", "/no/such/haproxy")
    assert result.returncode == 1
    assert "front_haproxy=/no/such/haproxy: no such program" in result.stderr and "install haproxy" in result.stderr
    assert "model_loaded" not in result.stderr


def test_a_taken_port_is_named() -> None:
    haproxy_or_skip()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_server_cli("--port", str(port), "--metrics-port", "0", "--front-limit", "4")
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "another with --port N" in result.stderr
    assert "model_loaded" not in result.stderr


@pytest.fixture
def front_server() -> Iterator[tuple[ServerProcess, str, int]]:
    haproxy_or_skip()
    metrics_port = free_port()
    proc = ServerProcess("--front-limit", "1", "--front-queue", "1", "--metrics-port", str(metrics_port))
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


def one_image(stub: pb_grpc.GeneratorStub, seed: int = 3, timeout: float = 10) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(model="vae", image=pb.ImageParams(n=1, seed=seed)), timeout=timeout))


def wait_until(check: object, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def test_past_its_limit_and_queue_the_front_refuses_with_resource_exhausted_and_dies_loudly(
    front_server: tuple[ServerProcess, str, int],
) -> None:
    proc, address, metrics_port = front_server
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        assert one_image(stub)  # served through the front
        # One text call in progress holds the front's only Generate slot (1024 tokens take ~1 s or more).
        holder = stub.Generate(pb.GenerateRequest(model="transformer", text=pb.TextParams(prompt="ROMEO:", max_new_tokens=1024, seed=1)))
        next(holder)
        # The next call waits in the front's queue (its one place) and is served once the slot is free.
        queued: list[object] = []
        waiter = threading.Thread(target=lambda: queued.append(one_image(stub, seed=4, timeout=60)))
        waiter.start()
        wait_until(lambda: metric(metrics_port, "genserve_front_queued_calls") == 1, "the second call waits in the front")
        # The one after finds the slot taken and the queue full: refused by HAProxy, at once, with the hint.
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            one_image(stub)
        assert time.monotonic() - started < 2.0
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 1 Generate calls in progress and 1 waiting" in str(refused.value.details())
        assert ("grpc-retry-pushback-ms", "100") in [(m.key, m.value) for m in refused.value.trailing_metadata() or ()]
        # Not limited: health, and the other RPCs.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        assert not queued  # still waiting behind the text call
        holder.cancel()
        waiter.join(30)
        assert len(queued) == 1 and queued[0]  # the queued call went in and was served
        assert one_image(stub)  # and the slot is free again
    assert metric(metrics_port, "genserve_front_refusals_total") == 1
    assert metric(metrics_port, "genserve_front_queued_calls") == 0
    assert metric(metrics_port, "genserve_rejections_total") == 0  # the server itself refused nothing

    workdir = Path(str(proc.find("front_ready")[0]["workdir"]))
    [haproxy] = [int(pid) for pid in Path(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children").read_text().split()]
    assert "haproxy" in Path(f"/proc/{haproxy}/cmdline").read_text()
    os.kill(haproxy, signal.SIGKILL)  # the front dies under the server
    assert proc.wait_exit(30) == 1
    assert "front_exited" in proc.names()
    assert not alive(haproxy)
    assert not workdir.exists()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_the_front_terminates_mutual_tls_and_the_server_behind_it_speaks_plaintext(tmp_path: Path) -> None:
    haproxy_or_skip()
    ca = make_ca(tmp_path, "ca")
    server, client = make_leaf(tmp_path, "server", ca, server=True), make_leaf(tmp_path, "client", ca, server=False)
    args = ["--front-limit", "4", "--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-client-ca", str(ca.cert)]
    proc = ServerProcess(*args)
    try:
        front = proc.wait_for("front_ready", 30)
        ready = proc.wait_for("server_ready", 60)
        assert front["tls"] == "mutual" and ready["tls"] == "at the front" and ready["front"] == front["address"]
        assert sorted(p.name for p in Path(str(front["workdir"])).iterdir()) == ["stats.sock"]  # no copy of the key left
        address = str(front["address"])
        request = pb.GenerateRequest(model="vae", image=pb.ImageParams(n=1, seed=3))
        trusted = grpc.ssl_channel_credentials(ca.pem, client.key.read_bytes(), client.pem)
        with grpc.secure_channel(address, trusted) as channel:
            assert list(pb_grpc.GeneratorStub(channel).Generate(request, timeout=10))  # mutual TLS through the front
        without_cert = grpc.ssl_channel_credentials(ca.pem)
        for denied in (grpc.secure_channel(address, without_cert), grpc.insecure_channel(address)):
            with denied, pytest.raises(grpc.RpcError) as refused:
                list(pb_grpc.GeneratorStub(denied).Generate(request, timeout=10))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # the server behind the front speaks plaintext on 127.0.0.1 only
        with grpc.insecure_channel(str(ready["address"])) as channel:
            assert list(pb_grpc.GeneratorStub(channel).Generate(request, timeout=10))
        assert str(ready["address"]).startswith("127.0.0.1:")
    finally:
        proc.stop()


def test_a_bad_certificate_for_the_front_is_named(tmp_path: Path) -> None:
    haproxy_or_skip()
    bogus = tmp_path / "cert.pem"
    bogus.write_text("not a certificate")
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    result = run_server_cli("--port", "0", "--metrics-port", "0", "--front-limit", "4", "--tls-cert", str(bogus), "--tls-key", str(key))
    assert result.returncode == 1
    assert f"tls_cert: {bogus} holds no PEM certificate" in result.stderr
    assert "model_loaded" not in result.stderr


def test_front_setup_never_prompts_and_names_what_it_skipped_without_root(tmp_path: Path) -> None:
    """scripts/test.sh ran `sudo apt-get install haproxy`, which asked for a password. Not root and
    no password-less sudo: one line naming what was skipped, exit 0, and no prompt."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls"
    for name, body in {
        "id": "echo 1000",
        "sudo": f'echo "sudo $*" >> {calls}; [ "$1" = "-n" ] && exit 1; read -r password; exit 0',  # without -n: a prompt
        "apt-get": f'echo "apt-get $*" >> {calls}; exit 100',
    }.items():
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "GENSERVE_FRONT_HAPROXY": str(tmp_path / "no-haproxy")}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "front_setup.sh")], env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.PIPE
    )
    assert result.returncode == 0
    assert "front_setup: skipped installing haproxy (not root, and sudo would ask for a password" in result.stderr
    assert "apt-get" not in calls.read_text()  # never ran it without permission
