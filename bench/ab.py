"""A/B of the per-request cost: the server of two source trees beside the bare echo, alternating, in one run.

    python -m bench.ab --baseline DIR [--rounds 3] [--duration 2] [--stream-window 512] [--server-args "..."]

``bench.serve`` measures every row once per side; a change to the per-request path moves the
ratio server/echo by less than the noise of a shared machine between two such runs. Here three
servers run at once, idle but for the one being measured: the echo, the server of ``--baseline``
(another checkout, e.g. a worktree of main: ``python -m server`` started there runs its code)
and the server of this tree; each round measures each of them, in the next of every order of the three, with the same
load generator: Generate by h2load (64 in flight on one connection, one-image VAE requests) and,
unless ``--stream-window 0``, GenerateStream by the Python client (bench/loadgen.py). It prints
each round's calls/s and the ratios to the echo of the same round, and the median of the ratios.
Calls/s here are finished calls as h2load counts them (any status): run ``bench.serve`` for the
accounting by status.

``--flood R`` adds an overload row: each side in turn is offered R Generate calls/s in an open loop
(h2load ``--rps`` on 4 connections) for ``--duration`` seconds. Every call is accounted for by the
side's own counters (bench/accounting.py), and the side's event loops (its main thread, and each
worker's with ``--workers``) are timed from /proc: loop CPU per answered call, OK or refused, is what one refusal costs when nearly
all are refused, and what bounds the goodput a process keeps under a flood (docs/design/haproxy-front.md,
"What a refusal costs"). Goodput is the round's OK calls/s over the side's Generate
rate of the same round.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import accounting
from bench.figures import Calls, closed_figures
from bench.h2load import H2Load
from bench.loadgen import Clients, Job
from bench.serve import ROOT, Server, free_ports, http_off, loops_cpu_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, default=None, help="another source tree whose server is side A (default: none)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=2.0, help="measured seconds per point")
    parser.add_argument("--in-flight", type=int, default=64, help="Generate calls in flight (h2load -m)")
    parser.add_argument("--stream-window", type=int, default=512, help="GenerateStream requests in flight (0: no stream rows)")
    parser.add_argument("--models-dir", default=str(ROOT / "models"))
    parser.add_argument("--server-args", default="", help="more flags for both servers")
    parser.add_argument("--baseline-args", default="", help="more flags for side A only (with no --baseline: A is this tree too)")
    parser.add_argument("--flood", type=float, default=0.0, help="also offer this many Generate calls/s, open loop, to each side (0: no)")
    args = parser.parse_args(argv)
    if args.flood < 0:
        parser.error("--flood must be >= 0 calls/s")

    logs = tempfile.TemporaryDirectory(prefix="bench-ab-")
    ports = iter(free_ports(6))
    base = ["--models-dir", str(Path(args.models_dir).resolve()), "--log-level", "warning", *shlex.split(args.server_args)]
    trees = ([("A", (args.baseline or ROOT).resolve())] if args.baseline or args.baseline_args else []) + [("B", ROOT)]
    sides: list[Server] = []
    p, m = next(ports), next(ports)
    echo_cmd = [sys.executable, "-m", "bench.echo", "--port", str(p), "--metrics-port", str(m)]
    sides.append(Server("echo", echo_cmd, p, open(Path(logs.name) / "echo.log", "wb"), m))  # noqa: SIM115 (closed below)
    cwd: dict[str, Path] = {"echo": ROOT}
    for name, tree in trees:
        p, m = next(ports), next(ports)
        cmd = [sys.executable, "-m", "server", "--port", str(p), "--metrics-port", str(m), *http_off(tree), *base]
        if name == "A":
            cmd += shlex.split(args.baseline_args)
        sides.append(Server(name, cmd, p, open(Path(logs.name) / f"{name}.log", "wb"), m))  # noqa: SIM115
        cwd[name] = tree
    h2 = H2Load()
    clients: Clients | None = None
    rows: dict[str, dict[str, list[float]]] = {"Generate": {}, "GenerateStream": {}}
    floods: dict[str, list[Flood]] = {}
    try:
        for s in sides:
            s.cmd = ["env", "-C", str(cwd[s.name]), *s.cmd]  # `python -m server` from that tree runs its code
            s.start()
        clients = Clients(1)
        for s in sides:
            clients.run([Job("ready", s.port, timeout_s=120.0)], sides)
        orders = list(itertools.permutations(sides))
        for r in range(args.rounds):
            # Every order in turn, not a rotation: in a rotation the same side always follows the echo, and
            # in an A/A run (2 cores) that side's stream ratio was the lower in 4 of 5 rounds (docs/design/stream-path.md).
            order = list(orders[r % len(orders)])
            for s in order:
                h2.run(s.port, duration_s=0.5, streams=args.in_flight)  # warm-up
                run = h2.run(s.port, duration_s=args.duration, streams=args.in_flight)
                rows["Generate"].setdefault(s.name, []).append(run.calls_s)
            if args.stream_window:
                for s in order:
                    start = time.monotonic() + 0.5
                    job = Job("stream", s.port, start, 0.5, args.duration, window=args.stream_window, drain_s=2.0)
                    calls = Calls.merge(clients.run([job], sides))
                    rows["GenerateStream"].setdefault(s.name, []).append(closed_figures(calls, job)["req_s"])
            report(rows, r)
            if args.flood:
                for s in order:
                    flood = run_flood(h2, s, args.flood, args.duration, rows["Generate"][s.name][-1])
                    floods.setdefault(s.name, []).append(flood)
                report_floods(floods, args.flood, r)
    finally:
        if clients is not None:
            clients.close()
        for s in sides:
            s.stop(grace_s=10.0)
            s.log.close()
        logs.cleanup()
        h2.close()
    return 0


def report(rows: dict[str, dict[str, list[float]]], r: int) -> None:
    for call, by_side in rows.items():
        if not by_side:
            continue
        echo = by_side["echo"]
        parts = [f"echo {echo[r]:9.0f}/s"]
        for name in sorted(k for k in by_side if k != "echo"):
            ratios = [x / e for x, e in zip(by_side[name], echo, strict=True) if e]
            parts.append(f"{name} {by_side[name][r]:9.0f}/s {ratios[-1]:.3f} (median {statistics.median(ratios):.3f})")
        print(f"round {r + 1} {call:15s} " + "  ".join(parts), flush=True)


@dataclass(frozen=True)
class Flood:
    """One side's overload row: what its counters saw of the calls h2load offered, and its loop's CPU."""

    tally: accounting.Tally
    seconds: float
    loop_cpu_s: float  # the side's event loops (main threads: its own, its workers'), over the run
    closed_calls_s: float  # the side's Generate rate (closed loop) in the same round

    @property
    def ok_s(self) -> float:
        return self.tally.count("OK") / self.seconds

    @property
    def refused_s(self) -> float:
        return self.tally.count("RESOURCE_EXHAUSTED") / self.seconds

    @property
    def goodput(self) -> float:
        return self.ok_s / self.closed_calls_s if self.closed_calls_s else 0.0

    @property
    def loop_us_per_call(self) -> float:
        """Loop CPU per call the side answered itself (OK, refused or another status of its own)."""
        seen = self.tally.seen
        return self.loop_cpu_s / seen * 1e6 if seen else float("nan")


def run_flood(h2: H2Load, side: Server, rate: float, seconds: float, closed_calls_s: float) -> Flood:
    side.check_alive()  # a side that died says so with its log's tail, not as a missing /proc file
    before = accounting.settled(side.metrics_port)
    cpu = loops_cpu_s(side.pid)
    run = h2.run(side.port, duration_s=seconds, connections=4, streams=64, rps=rate)
    side.check_alive()
    cpu = loops_cpu_s(side.pid) - cpu
    tally = accounting.tally(before, accounting.settled(side.metrics_port), run.started, run.done)
    return Flood(tally, run.wall_s or seconds, cpu, closed_calls_s)


def report_floods(floods: dict[str, list[Flood]], rate: float, r: int) -> None:
    parts = []
    for name in sorted(floods, key=lambda n: (n != "echo", n)):
        f = floods[name][r]
        other = ", ".join(f"{code} {n}" for code, n in sorted(f.tally.other.items()))
        if f.tally.unseen:
            other = ", ".join(x for x in (other, f"BY GRPC CORE {f.tally.unseen}") if x)
        median = statistics.median(x.goodput for x in floods[name])
        parts.append(
            f"{name} OK {f.ok_s:6.0f}/s refused {f.refused_s:6.0f}/s goodput {f.goodput:.2f} (median {median:.2f})"
            f" loop {f.loop_us_per_call:5.1f} us/call{' ' + other if other else ''}"
        )
    print(f"round {r + 1} flood {rate:.0f}/s  " + "  ".join(parts), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
