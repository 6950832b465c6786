"""A/B of the per-request cost: the server of two source trees beside the bare echo, alternating, in one run.

    python -m bench.ab --baseline DIR [--rounds 3] [--duration 2] [--stream-window 512] [--server-args "..."]

``bench.serve`` measures every row once per side; a change to the per-request path moves the
ratio server/echo by less than the noise of a shared machine between two such runs. Here three
servers run at once, idle but for the one being measured: the echo, the server of ``--baseline``
(another checkout, e.g. a worktree of main: ``python -m server`` started there runs its code)
and the server of this tree; each round measures each of them, in a rotating order, with the same
load generator: Generate by h2load (64 in flight on one connection, one-image VAE requests) and,
unless ``--stream-window 0``, GenerateStream by the Python client (bench/loadgen.py). It prints
each round's calls/s and the ratios to the echo of the same round, and the median of the ratios.
Calls/s here are finished calls as h2load counts them (any status): run ``bench.serve`` for the
accounting by status.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.figures import Calls, closed_figures
from bench.h2load import H2Load
from bench.loadgen import Clients, Job
from bench.serve import ROOT, Server, free_ports


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
    args = parser.parse_args(argv)

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
        cmd = [sys.executable, "-m", "server", "--port", str(p), "--metrics-port", str(m), *base]
        if name == "A":
            cmd += shlex.split(args.baseline_args)
        sides.append(Server(name, cmd, p, open(Path(logs.name) / f"{name}.log", "wb"), m))  # noqa: SIM115
        cwd[name] = tree
    h2 = H2Load()
    clients: Clients | None = None
    rows: dict[str, dict[str, list[float]]] = {"Generate": {}, "GenerateStream": {}}
    try:
        for s in sides:
            s.cmd = ["env", "-C", str(cwd[s.name]), *s.cmd]  # `python -m server` from that tree runs its code
            s.start()
        clients = Clients(1)
        for s in sides:
            clients.run([Job("ready", s.port, timeout_s=120.0)], sides)
        for r in range(args.rounds):
            order = sides[r % len(sides) :] + sides[: r % len(sides)]
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


if __name__ == "__main__":
    raise SystemExit(main())
