"""Step-level against request-level batching for an iterative model (flow), under an open loop.

    python -m bench.flow [--quick] [--duration S] [--p99-bound-ms MS] [--json FILE]

For each batching mode (``--step-batching step``, the default, and ``request``) one server runs
as a subprocess (only the iterative model, on a free port); each rate is measured on every mode
in turn. A Python client (the SDK's AsyncClient on one channel) sends Generate calls at Poisson
arrival times, open loop (a late answer never delays the next call): each asks for ``n`` in 1..4
samples and ``steps`` drawn from {4, 8, 16, 32, 64}, with a fixed random seed, so both modes see
the same requests. A call's latency runs from its scheduled start to its last sample; a refused
or failed call counts as infinitely late. The offered rate rises by ``--factor`` from
``--start-rate``; a mode leaves the sweep once its p99 has passed the bound twice in a row.

After the sweep the same client and schedules go to ``bench.echo`` (a server that answers at once,
no model) at the sweep's highest rate and at twice it: what the client alone can drive, from the
same run, beside the figures it measured.

Printed for each mode: every point (offered and answered rates, p50 and p99, the p50 of the short
requests, <= 8 steps, and of the long ones, >= 32), the highest rate whose p99 stays under the
bound, and the short requests' p50 there. The target (issue 33): step-level sustains >= 1.5x the
request-level rate at the same bound, and a short request's latency does not grow with the long
ones beside it. Both servers and the client share the machine's cores; only the ratio between the
modes of one run means anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.serve import ROOT, Server, free_ports, http_off

STEPS = (4, 8, 16, 32, 64)
SHORT, LONG = 8, 32  # a short request takes at most SHORT steps, a long one at least LONG


@dataclass(frozen=True)
class Call:
    at: float  # seconds from the start of the point
    n: int
    steps: int
    seed: int


def schedule(rate: float, duration: float, seed: int) -> list[Call]:
    """Poisson arrivals at ``rate`` for ``duration`` s; every draw from one seeded generator (runs repeat)."""
    rng = random.Random(seed)
    calls: list[Call] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return calls
        calls.append(Call(t, rng.randint(1, 4), rng.choice(STEPS), rng.getrandbits(62)))


@dataclass
class Point:
    rate: float
    sent: int = 0
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    p50_ms: float = math.inf
    p99_ms: float = math.inf
    short_p50_ms: float = math.inf
    long_p50_ms: float = math.inf
    answered_per_s: float = 0.0


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile; a refused call's infinity counts as the slowest."""
    if not values:
        return math.inf
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def run_point(address: str, model: str, calls: list[Call], timeout: float) -> tuple[list[float], list[Call], dict[str, int]]:
    from clients import AsyncClient, GenserveError

    latencies: list[float] = [math.inf] * len(calls)
    failed: dict[str, int] = {}
    async with AsyncClient(address, retry=None) as client:
        await client.list_models()  # connected before the clock starts
        start = time.perf_counter()

        async def one(i: int, call: Call) -> None:
            await asyncio.sleep(max(0.0, start + call.at - time.perf_counter()))
            try:
                await client.generate_images(model, call.n, seed=call.seed, steps=call.steps, timeout=timeout)
            except GenserveError as e:
                name = type(e).__name__
                failed[name] = failed.get(name, 0) + 1
                return
            latencies[i] = time.perf_counter() - (start + call.at)

        await asyncio.gather(*(one(i, c) for i, c in enumerate(calls)))
    return latencies, calls, failed


def figures(rate: float, duration: float, latencies: list[float], calls: list[Call], failed: dict[str, int]) -> Point:
    ms = [x * 1000 for x in latencies]
    done = [x for x in ms if math.isfinite(x)]
    short = [x for x, c in zip(ms, calls, strict=True) if c.steps <= SHORT]
    long = [x for x, c in zip(ms, calls, strict=True) if c.steps >= LONG]
    return Point(
        rate=rate,
        sent=len(calls),
        ok=len(done),
        failed=failed,
        p50_ms=percentile(ms, 50),
        p99_ms=percentile(ms, 99),
        short_p50_ms=percentile(short, 50),
        long_p50_ms=percentile(long, 50),
        answered_per_s=len(done) / duration,
    )


def start_server(mode: str, models: Path, args: argparse.Namespace, log_dir: Path) -> Server:
    port, = free_ports(1)  # fmt: skip
    cmd = [
        sys.executable, "-m", "server", "--port", str(port), "--metrics-port", "0", *http_off(),
        "--models-dir", str(models), "--step-batching", mode, "--step-rows", str(args.rows),
        "--threads", str(args.threads), "--request-timeout-s", str(args.timeout), "--log-format", "json",
        *(["--kinds", args.kinds] if args.kinds else []),
    ]  # fmt: skip
    server = Server(f"genserve ({mode})", cmd, port, (log_dir / f"{mode}.log").open("wb"))
    server.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        server.check_alive()
        if b'"server_ready"' in Path(server.log.name).read_bytes():
            return server
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} did not get ready: {server.tail()}")


def sweep(modes: list[str], models: Path, args: argparse.Namespace, log_dir: Path) -> dict[str, list[Point]]:
    """Every mode's server at once (an idle one costs nothing); each rate measured on every mode in
    turn, the order alternating, so that a change in the machine's load hits all modes alike. A
    mode leaves the sweep once its p99 has passed the bound twice in a row."""
    servers = {mode: start_server(mode, models, args, log_dir) for mode in modes}
    points: dict[str, list[Point]] = {mode: [] for mode in modes}
    over = dict.fromkeys(modes, 0)
    try:
        rate, k = args.start_rate, 0
        while rate <= args.max_rate and any(n < 2 for n in over.values()):
            order = [m for m in (modes if k % 2 == 0 else modes[::-1]) if over[m] < 2]
            for mode in order:
                calls = schedule(rate, args.duration, args.seed)
                address = f"127.0.0.1:{servers[mode].port}"
                latencies, calls, failed = asyncio.run(run_point(address, args.model, calls, args.timeout))
                point = figures(rate, args.duration, latencies, calls, failed)
                points[mode].append(point)
                print(row(mode, point), flush=True)
                over[mode] = over[mode] + 1 if point.p99_ms > args.p99_bound_ms else 0
                time.sleep(0.5)  # the queue of the last point drains
            rate, k = round(rate * args.factor, 2), k + 1
    finally:
        for server in servers.values():
            server.stop(10)
    return points


def echo_points(rates: list[float], args: argparse.Namespace, log_dir: Path) -> list[Point]:
    """The same client and schedules against bench.echo (answers at once, no model): the client's own
    ceiling, measured in the same run as the servers it drove."""
    port, = free_ports(1)  # fmt: skip
    echo = Server("echo", [sys.executable, "-m", "bench.echo", "--port", str(port)], port, (log_dir / "echo.log").open("wb"))
    echo.start()
    try:
        deadline = time.monotonic() + 60
        while True:  # listening?
            echo.check_alive()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bench.echo did not listen: {echo.tail()}") from None
                time.sleep(0.2)
        points = []
        for rate in rates:
            calls = schedule(rate, args.duration, args.seed)
            latencies, calls, failed = asyncio.run(run_point(f"127.0.0.1:{port}", args.model, calls, args.timeout))
            points.append(figures(rate, args.duration, latencies, calls, failed))
            print(row("echo", points[-1]), flush=True)
        return points
    finally:
        echo.stop(10)


def row(mode: str, p: Point) -> str:
    fails = ", ".join(f"{k} {v}" for k, v in sorted(p.failed.items())) or "none"
    return (
        f"{mode:8} {p.rate:7.1f}/s  answered {p.answered_per_s:7.1f}/s  p50 {p.p50_ms:8.0f} ms  p99 {p.p99_ms:8.0f} ms  "
        f"short p50 {p.short_p50_ms:7.0f} ms  long p50 {p.long_p50_ms:7.0f} ms  failed: {fails}"
    )


def best(points: list[Point], bound: float) -> Point | None:
    """The highest offered rate whose p99 is within the bound (no failed call counts as within)."""
    within = [p for p in points if p.p99_ms <= bound]
    return max(within, key=lambda p: p.rate) if within else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flow", help="the iterative model to load (default flow)")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models", help="where MODEL.safetensors is (default models/)")
    parser.add_argument("--kinds", default="", help="--kinds for the server (a kind module that is not built in)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per point (default 20; --quick 6)")
    parser.add_argument("--start-rate", type=float, default=2.0, help="the first offered rate, calls/s (default 2)")
    parser.add_argument("--factor", type=float, default=1.4, help="each point's rate over the last (default 1.4)")
    parser.add_argument("--max-rate", type=float, default=2000.0, help="stop the sweep here (default 2000)")
    parser.add_argument(
        "--p99-bound-ms", type=float, default=3000.0, help="the latency bound a rate must keep its p99 under (default 3000)"
    )
    parser.add_argument("--rows", type=int, default=64, help="--step-rows of the servers (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="--threads of the servers (default 1: the client has the other core)")
    parser.add_argument("--timeout", type=float, default=30.0, help="each call's deadline, s (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrivals and requests (default 0)")
    parser.add_argument("--modes", default="step,request", help="batching modes to compare (default step,request)")
    parser.add_argument("--quick", action="store_true", help="6 s points, a coarser sweep: a smoke run")
    parser.add_argument("--no-echo", action="store_true", help="skip the bare echo (bench.echo) at the highest rate and twice it")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.factor = 6.0, 2.0
    source = args.models_dir / f"{args.model}.safetensors"
    if not source.is_file():
        parser.error(f"--models-dir: {source} does not exist")
    print(
        f"bench.flow: {args.model}, {platform.processor() or platform.machine()} x{os.cpu_count()}, "
        f"{args.duration:g} s points, p99 bound {args.p99_bound_ms:g} ms, step rows {args.rows}, threads {args.threads}",
        flush=True,
    )
    results: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        shutil.copy(source, models / source.name)
        swept = sweep(args.modes.split(","), models, args, Path(tmp))
        for mode, points in swept.items():
            top = best(points, args.p99_bound_ms)
            results["modes"][mode] = {"points": [asdict(p) for p in points], "best": asdict(top) if top else None}
        highest = max(p.rate for points in swept.values() for p in points)
        echo = echo_points([highest, 2 * highest], args, Path(tmp)) if not args.no_echo else []
        results["echo"] = [asdict(p) for p in echo]
    print()
    tops = {mode: r["best"] for mode, r in results["modes"].items()}
    for mode, top in tops.items():
        if top is None:
            print(f"{mode:8} no rate kept p99 under {args.p99_bound_ms:g} ms")
        else:
            print(f"{mode:8} best rate {top['rate']:.1f}/s (p99 {top['p99_ms']:.0f} ms), short p50 there {top['short_p50_ms']:.0f} ms")
    if tops.get("step") and tops.get("request"):
        ratio = tops["step"]["rate"] / tops["request"]["rate"]
        results["ratio"] = ratio
        print(f"step / request sustained rate at p99 <= {args.p99_bound_ms:g} ms: {ratio:.2f}x (target >= 1.5x)")
    for p in echo:
        print(f"echo     at {p.rate:.1f}/s answered {p.answered_per_s:.1f}/s, p99 {p.p99_ms:.0f} ms: the client's own share of the figures")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))  # an unmet figure is Infinity
    return 0


if __name__ == "__main__":
    sys.exit(main())
