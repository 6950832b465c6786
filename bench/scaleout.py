"""Scale-out benchmark: ``--workers 1`` vs ``2`` over gRPC, and 1 vs 2 servers on one RabbitMQ queue.

    python -m bench.scaleout [--duration S] [--json FILE] [--amqp-url URL]

The same request everywhere: one vae image (n=1, seed 0). Measured side by side in one run:

  grpc      ``python -m server --workers W`` (W = 1, 2), loaded by h2load: ``--connections``
            connections (the kernel spreads connections, not calls, over the workers) with
            ``--streams`` concurrent calls each, for ``--duration`` seconds after a warm-up.
            h2load posts the framed request bytes; one SDK call checks beforehand that they
            are answered OK.
  amqp      S = 1, 2 server processes (``--workers 1``) consuming one queue, loaded by one
            ``--amqp-clients`` client processes, each keeping ``--inflight`` AsyncAmqpClient
            requests in flight.

Everything shares this machine's cores, so the ratios, not the absolute rates, are the result.
Needs h2load (apt-get install nghttp2-client) and a broker for the AMQP half (skipped without).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.serve import free_ports

ROOT = Path(__file__).resolve().parent.parent
REQUEST_PATH = "/genserve.v1.Generator/Generate"
START_S = 180.0


def request_bytes() -> bytes:
    from genserve.v1 import generator_pb2 as pb

    return pb.GenerateRequest(model="vae", image=pb.ImageParams(n=1, seed=0)).SerializeToString()


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed, 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def start_server(models: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "server", "--models-dir", str(models), "--metrics-port", "0", "--log-level", "warning", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_serving(address: str, service: str = "") -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        with grpc.insecure_channel(address) as channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.2)
    raise RuntimeError(f"{address} did not become ready in {START_S:g} s")


def run_h2load(address: str, body: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = ["h2load", "-c", str(args.connections), "-m", str(args.streams), "-t", "1", "-D", str(args.duration)]
    cmd += ["--warm-up-time", str(args.warmup), "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    cmd.append(f"http://{address}{REQUEST_PATH}")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rate = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    counts = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    if rate is None or counts is None:
        raise RuntimeError(f"h2load's output did not parse:\n{out}")
    return {"calls_per_s": float(rate.group(1)), "done": int(counts.group(1)), "failed": int(counts.group(3))}


def check_one_call(address: str) -> None:
    from clients import Client

    with Client(address, timeout=30) as client:
        assert client.generate_images("vae", 1, seed=0).shape == (1, 28, 28)


def bench_grpc(models: Path, workers: int, body: Path, args: argparse.Namespace) -> dict[str, Any]:
    port = free_ports(1)[0]
    address = f"127.0.0.1:{port}"
    proc = start_server(models, "--port", str(port), "--workers", str(workers))
    try:
        wait_serving(address)
        check_one_call(address)
        result = run_h2load(address, body, args)
    finally:
        stop(proc)
    print(f"grpc  workers={workers}: {result['calls_per_s']:9.0f} calls/s ({result['failed']} failed)", flush=True)
    return {"workers": workers, **result}


async def amqp_load(url: str, queue: str, args: argparse.Namespace) -> dict[str, Any]:
    from clients import AsyncAmqpClient

    done = 0
    measuring = False
    async with AsyncAmqpClient(url, queue=queue, timeout=60) as client:

        async def loop() -> None:
            nonlocal done
            while True:
                await client.generate_images("vae", 1, seed=0)
                if measuring:
                    done += 1

        tasks = [asyncio.create_task(loop()) for _ in range(args.inflight)]
        await asyncio.sleep(args.warmup)
        measuring = True
        start = time.perf_counter()
        await asyncio.sleep(args.duration)
        measuring = False
        elapsed = time.perf_counter() - start
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"calls_per_s": done / elapsed, "done": done, "duplicates": client.duplicates, "late": client.late}


def bench_amqp(models: Path, servers: int, url: str, args: argparse.Namespace) -> dict[str, Any]:
    queue = f"bench.scaleout.{uuid.uuid4().hex[:8]}"
    ports = [free_ports(1)[0] for _ in range(servers)]
    env = {"GENSERVE_AMQP_URL": url}
    procs = [start_server(models, "--port", str(p), "--amqp-queue", queue, env=env) for p in ports]
    try:
        for p in ports:
            wait_serving(f"127.0.0.1:{p}", "genserve.amqp")
        # several client processes: one Python client tops out near one server's rate
        with ProcessPoolExecutor(args.amqp_clients) as pool:
            parts = list(pool.map(_amqp_client, [(url, queue, args)] * args.amqp_clients))
        result = {key: sum(p[key] for p in parts) for key in ("calls_per_s", "done", "duplicates", "late")}
    finally:
        for proc in procs:
            stop(proc)
        asyncio.run(_delete_queue(url, queue))
    # late: replies to the calls cut when the clients stopped; duplicates: second replies to one request
    rate, duplicates, late = result["calls_per_s"], result["duplicates"], result["late"]
    print(f"amqp  servers={servers}: {rate:9.0f} calls/s ({duplicates} duplicates, {late} late)", flush=True)
    return {"servers": servers, **result}


def _amqp_client(job: tuple[str, str, argparse.Namespace]) -> dict[str, Any]:
    return asyncio.run(amqp_load(*job))


async def _delete_queue(url: str, queue: str) -> None:
    import aio_pika

    from genserve.v1.amqp import dead_letter_queue

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for q in (queue, dead_letter_queue(queue)):
            await channel.queue_delete(q)


def broker_up(url: str) -> bool:
    from yarl import URL

    parsed = URL(url)
    try:
        with socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 5672), timeout=1):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="measured seconds per point")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of load before each measurement")
    parser.add_argument("--workers", default="1,2", help="gRPC points: worker counts, comma-separated")
    parser.add_argument("--servers", default="1,2", help="AMQP points: server processes, comma-separated")
    parser.add_argument("--connections", type=int, default=8, help="h2load connections")
    parser.add_argument("--streams", type=int, default=32, help="h2load concurrent calls per connection")
    parser.add_argument("--inflight", type=int, default=128, help="AMQP requests each client keeps in flight")
    parser.add_argument("--amqp-clients", type=int, default=2, help="AMQP client processes")
    parser.add_argument("--amqp-url", default=os.environ.get("GENSERVE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if shutil.which("h2load") is None:
        raise SystemExit("h2load is not installed: apt-get install nghttp2-client")
    report: dict[str, Any] = {"cores": len(os.sched_getaffinity(0)), "duration_s": args.duration, "grpc": [], "amqp": []}
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        (models / "vae.safetensors").symlink_to(ROOT / "models" / "vae.safetensors")
        body = Path(tmp) / "request.bin"
        body.write_bytes(grpc_frame(request_bytes()))
        for w in (int(x) for x in args.workers.split(",")):
            report["grpc"].append(bench_grpc(models, w, body, args))
        if broker_up(args.amqp_url):
            for s in (int(x) for x in args.servers.split(",")):
                report["amqp"].append(bench_amqp(models, s, args.amqp_url, args))
        else:
            print("amqp: no broker reachable, skipped", flush=True)
    g, a = report["grpc"], report["amqp"]
    if len(g) >= 2:
        report["grpc_scaling"] = g[-1]["calls_per_s"] / g[0]["calls_per_s"]
        print(f"grpc: workers={g[-1]['workers']} / workers={g[0]['workers']} = {report['grpc_scaling']:.2f}x")
    if a and g:
        report["amqp_vs_grpc"] = a[0]["calls_per_s"] / g[0]["calls_per_s"]
        print(f"amqp (1 server) / grpc (1 worker) = {report['amqp_vs_grpc']:.2f}")
    if len(a) >= 2:
        report["amqp_scaling"] = a[-1]["calls_per_s"] / a[0]["calls_per_s"]
        print(f"amqp: servers={a[-1]['servers']} / servers={a[0]['servers']} = {report['amqp_scaling']:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
