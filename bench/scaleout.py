"""Scale-out benchmark: ``--workers 1`` vs ``2`` over gRPC, and 1 vs 2 servers on one RabbitMQ queue.

    python -m bench.scaleout [--duration S] [--json FILE] [--amqp-url URL]

The same request everywhere: one vae image (n=1, seed 0). Measured side by side in one run:

  grpc      ``python -m server --workers W`` (W = 1, 2), loaded by h2load: ``--connections``
            connections (the kernel spreads connections, not calls, over the workers) with
            ``--streams`` concurrent calls each, for ``--duration`` seconds after a warm-up
            (bench/h2load.py). h2load cannot see a grpc-status, so calls are counted by their
            status from the group's /metrics (bench/accounting.py): the rate is of OK calls,
            and refusals or calls ended by grpc core are printed beside it.
  amqp      S = 1, 2 server processes (``--workers 1``) consuming one queue. ``--amqp-driver
            node`` (the default where scripts/bench_setup.sh installed it): one
            bench/amqp/load.mjs process keeps ``--inflight`` x ``--amqp-clients`` requests in
            flight; the rate is of its replies, times the OK share of the statuses the servers
            counted (rpc "Amqp"), as the gRPC half counts from /metrics. ``python``:
            ``--amqp-clients`` processes of ``--inflight`` AsyncAmqpClient calls each (the SDK's
            client costs about what the server spends per request, so on shared cores it
            measures the client too).

Everything shares this machine's cores, so the ratios, not the absolute rates, are the result.
Needs h2load (apt-get install nghttp2-client) and a broker for the AMQP half (skipped without).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.accounting import scrape, settled, statuses, tally
from bench.h2load import H2Load
from bench.serve import free_ports, http_off
from genserve.v1 import generator_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
START_S = 180.0


def start_server(models: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "server", "--models-dir", str(models), "--metrics-port", "0", *http_off(), "--log-level", "warning", *args]
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


def check_one_call(address: str) -> None:
    from clients import Client

    with Client(address, timeout=30) as client:
        assert client.generate_images("vae", 1, seed=0).shape == (1, 28, 28)


def bench_grpc(models: Path, workers: int, h2load: H2Load, args: argparse.Namespace) -> dict[str, Any]:
    port, metrics_port = free_ports(2)
    proc = start_server(models, "--port", str(port), "--metrics-port", str(metrics_port), "--workers", str(workers))
    try:
        wait_serving(f"127.0.0.1:{port}")
        check_one_call(f"127.0.0.1:{port}")
        load = {"connections": args.connections, "streams": args.streams}
        h2load.run(port, duration_s=args.warmup, **load)
        before = settled(metrics_port)
        run = h2load.run(port, duration_s=args.duration, **load)
        calls = tally(before, settled(metrics_port), run.started, run.done)
    finally:
        stop(proc)
    ok = calls.count("OK")
    # started: h2load's calls; done: those it saw answered; ok may exceed done by the calls cut when it
    # stopped that the server still finished OK
    result = {"calls_per_s": ok / run.wall_s, "started": run.started, "done": run.done, "ok": ok, "by_status": calls.by_status}
    result["unseen"] = calls.unseen
    others = {k: v for k, v in calls.by_status.items() if k != "OK"}
    print(
        f"grpc  workers={workers}: {result['calls_per_s']:9.0f} OK calls/s (not OK: {others or 'none'}, by grpc core {calls.unseen})",
        flush=True,
    )
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
    ports = [free_ports(2) for _ in range(servers)]
    env = {"GENSERVE_AMQP_URL": url}
    procs = [start_server(models, "--port", str(p), "--metrics-port", str(m), "--amqp-queue", queue, env=env) for p, m in ports]
    driver = args.amqp_driver
    try:
        for p, _ in ports:
            wait_serving(f"127.0.0.1:{p}", "genserve.amqp")
        if driver == "node":
            result = node_load(url, queue, [m for _, m in ports], args)
        else:
            # several client processes: one Python client tops out near one server's rate
            with ProcessPoolExecutor(args.amqp_clients) as pool:
                parts = list(pool.map(_amqp_client, [(url, queue, args)] * args.amqp_clients))
            result = {key: sum(p[key] for p in parts) for key in ("calls_per_s", "done", "duplicates", "late")}
    finally:
        for proc in procs:
            stop(proc)
        asyncio.run(_delete_queue(url, queue))
    # late: replies to the calls cut when the clients stopped; duplicates: second replies to one request
    rate, duplicates, late = result["calls_per_s"], result["duplicates"], result.get("late", 0)
    statuses = f", by status {result['by_status']}" if "by_status" in result else ""
    print(f"amqp  servers={servers} ({driver} client): {rate:9.0f} OK calls/s ({duplicates} duplicates, {late} late{statuses})", flush=True)
    return {"servers": servers, "driver": driver, **result}


NODE_LOAD = ROOT / "bench" / "amqp" / "load.mjs"


def node_available() -> bool:
    """node on PATH and bench/amqp's amqplib installed (scripts/bench_setup.sh)."""
    return shutil.which("node") is not None and (NODE_LOAD.parent / "node_modules" / "amqplib").is_dir()


def node_load(url: str, queue: str, metrics_ports: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """One bench/amqp/load.mjs process keeps ``inflight x amqp_clients`` requests in flight; the
    servers' counters (rpc "Amqp") say what became of the requests of the measured window."""
    from server.amqp_ingress import RPC  # the rpc label of AMQP requests in the servers' counters

    body = pb.GenerateRequest(model="vae", image=pb.ImageParams(n=1, seed=0)).SerializeToString().hex()
    inflight = args.inflight * args.amqp_clients
    cmd = ["node", str(NODE_LOAD), url, queue, str(inflight), str(args.warmup), str(args.duration), body]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(args.warmup)
    before = [scrape(m) for m in metrics_ports]
    window = time.perf_counter()
    try:
        out, err = proc.communicate(timeout=args.duration + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"bench/amqp/load.mjs failed ({proc.returncode}): {err.strip()[-2000:]}")
    elapsed = time.perf_counter() - window
    by_status: Counter[str] = Counter()
    for m, b in zip(metrics_ports, before, strict=True):
        delta = statuses(settled(m), RPC)
        delta.subtract(statuses(b, RPC))
        by_status.update(delta)
    report = json.loads(out.strip().splitlines()[-1])
    # The client's window is exact (its own clock, warm-up excluded); the servers' counts span a
    # little more (its connect, the drain after it stopped). So: the replies of the client's window
    # per second, times the OK share of what the servers counted (a request a full server put back
    # on the queue counts there too, so the share errs low, never high).
    ok = by_status.get("OK", 0)
    ok_share = ok / max(1, sum(by_status.values()))
    return {
        "calls_per_s": report["done"] / report["elapsed"] * ok_share,
        "window_s": elapsed,
        "done": report["done"],
        "replies_per_s": report["done"] / report["elapsed"],
        "duplicates": report["duplicates"],
        "late": 0,
        "by_status": {k: v for k, v in sorted(by_status.items()) if v},
    }


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
    parser.add_argument("--workers", default="1,2", help="gRPC points: worker counts, comma-separated (empty: none)")
    parser.add_argument("--servers", default="1,2", help="AMQP points: server processes, comma-separated (empty: none)")
    parser.add_argument("--connections", type=int, default=8, help="h2load connections")
    parser.add_argument("--streams", type=int, default=32, help="h2load concurrent calls per connection")
    parser.add_argument("--inflight", type=int, default=128, help="AMQP requests each client keeps in flight")
    parser.add_argument("--amqp-clients", type=int, default=2, help="AMQP client processes (python driver)")
    parser.add_argument(
        "--amqp-driver",
        choices=("node", "python"),
        default="node" if node_available() else "python",
        help="AMQP load: bench/amqp/load.mjs (cheap; scripts/bench_setup.sh installs it) or the SDK's AsyncAmqpClient",
    )
    parser.add_argument("--amqp-url", default=os.environ.get("GENSERVE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    try:
        h2load = H2Load(pb.GenerateRequest(model="vae", image=pb.ImageParams(n=1, seed=0)))
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    report: dict[str, Any] = {"cores": len(os.sched_getaffinity(0)), "duration_s": args.duration, "grpc": [], "amqp": []}
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        (models / "vae.safetensors").symlink_to(ROOT / "models" / "vae.safetensors")
        try:
            for w in (int(x) for x in args.workers.split(",") if x):
                report["grpc"].append(bench_grpc(models, w, h2load, args))
        finally:
            h2load.close()
        if broker_up(args.amqp_url):
            for s in (int(x) for x in args.servers.split(",") if x):
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
