"""Serving benchmark: the gRPC server beside a bare grpc.aio echo of the same call shapes, in one run.

    scripts/bench_setup.sh                       # once: installs h2load (Debian: nghttp2-client)
    python -m bench.serve [--quick] [--duration S] [--overload-duration S] [--json FILE] [--server-args "..."]

    --quick               1-2 s points, 5 s of overload, open loop at 0.5 and 0.8 (a couple of minutes)
    --duration S          measured seconds per point (default 10; --quick 2)
    --overload-duration S seconds of the 2x overload (default 30; --quick 5)
    --server-args "..."   more flags for python -m server (e.g. "--front-limit 64": the HAProxy front, server/runtime/front.py)
    --json FILE           every figure, and the per-status accounting, as JSON

Two servers run as subprocesses on free 127.0.0.1 ports: the server under test (``python -m
server``, its flags from ``--server-args``) and ``bench.echo``, which answers every call at once
and so measures the ceiling of grpc.aio itself on this machine. Both expose their counters, which
account for every plain call by its gRPC status (bench/accounting.py). The servers and the load
share the same cores, so every point is run against the echo and then the server, never both at
once; ratios are only meaningful within one run.

  closed loop   Generate by h2load (bench/h2load.py: the Python client cost more per call than the
                server under test): c calls in flight on one connection, one image request each
                (vae, n=1). GenerateStream by the Python client (bench/loadgen.py): w requests in
                flight over as many streams as the credit needs; the echo's row shows the client
                is not the limit.
  open loop     Generate at a fraction of that side's best closed-loop rate: h2load on 4
                connections, and a Python probe at <= 200 calls/s inside the load that tells
                admitted calls from refused ones (h2load sees only HTTP 200) and times them from
                their scheduled start.
  text          transformer, prompt "ROMEO:": time to first token with one stream at a time,
                tokens/s with 32 streams (Python client).
  overload      the open loop at twice the side's maximum: goodput, latency of the admitted and of
                the refusals (RESOURCE_EXHAUSTED), every call's status, and the resident memory
                (VmRSS of the server and its children, read every second).

Every Generate row prints "sent N, answered M (cut at the end K): OK a, RESOURCE_EXHAUSTED b, ...;
adds up": K calls were still open when h2load stopped (the side counts those it had picked up as
CANCELLED); "ENDED BY GRPC CORE" counts answered calls no counter of the side saw. The targets
are issue 11's, checked on the server under test.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np

from bench.accounting import front_refusals, scrape, settled, tally
from bench.figures import Calls, closed_figures, h2load_closed_figures, h2load_open_figures, text_figures
from bench.h2load import H2Load
from bench.loadgen import DROPPED, MB, UNFINISHED, Clients, Job, die_with_parent
from bench.report import print_closed, print_details, print_header, print_open, print_overload, print_targets, print_text, targets

ROOT = Path(__file__).resolve().parent.parent


# -- the harness (the benchmark's own process) ----------------------------------------------------


def http_off(tree: Path = ROOT) -> list[str]:
    """``--http-port 0`` for a tree whose server has the HTTP edge (on by default at 8000: two servers
    of one run would share it); nothing for an older tree, which would refuse the flag."""
    return ["--http-port", "0"] if "http_port" in (tree / "server" / "config.py").read_text() else []


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (all bound at once, so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def main_thread_cpu_s(pid: int) -> float:
    """CPU time (user + system) of process ``pid``'s main thread: an asyncio server's event loop."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def loops_cpu_s(pid: int) -> float:
    """The event loops' CPU of a server: its main thread's, plus its child processes' main threads
    (``--workers N``: the supervisor's loop idles, each worker's serves)."""
    total = main_thread_cpu_s(pid)
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a child that has just exited
            total += main_thread_cpu_s(int(child))
    return total


def tree_rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` and its descendants (a server may run workers in child processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


@dataclass
class Server:
    """A server subprocess, its output in a log file; in its own session, so Ctrl-C reaches only us."""

    name: str
    cmd: list[str]
    port: int
    log: IO[bytes]
    metrics_port: int = 0  # its Prometheus counters: how bench/accounting.py tells what became of each call
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}; its log ends:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        self.log.flush()
        with open(self.log.name, "rb") as f:
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM, then SIGKILL after ``grace_s``; the exit code (None if it was never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


OPEN_CONNECTIONS = 4  # h2load connections in the open loop (as many clients)
PROBE_RATE = 200.0  # calls/s of the Python probe beside h2load: enough for a p99 in seconds, cheap beside the load


def plain_closed(bench: Bench, h2: H2Load, side: Server, in_flight: int) -> dict[str, Any]:
    """Closed loop of plain Generate calls by h2load: ``in_flight`` calls on one connection."""
    h2.run(side.port, duration_s=bench.warm_s, streams=in_flight)  # warm-up: not counted
    before = settled(side.metrics_port)
    r = h2.run(side.port, duration_s=bench.dur_s, streams=in_flight)
    t = tally(before, settled(side.metrics_port), r.started, r.done)
    return {"call": "Generate", "side": side.name, "in_flight": in_flight} | h2load_closed_figures(r, t)


def plain_open(
    bench: Bench, h2: H2Load, side: Server, rate: float, dur_s: float, tick: Callable[[], None] | None = None
) -> tuple[dict[str, Any], Job]:
    """Open loop at ``rate`` calls/s: h2load on OPEN_CONNECTIONS connections, and a Python probe
    (part of the rate) that tells admitted from refused calls; every call accounted for."""
    probe_rate = min(PROBE_RATE, max(rate * 0.05, 10.0))
    before = settled(side.metrics_port)
    # h2load runs from now to the end of the probe's window (which opens 0.5 s + warm-up from now)
    started = h2.start(
        side.port, duration_s=0.5 + bench.warm_s + dur_s, connections=OPEN_CONNECTIONS, streams=100_000, rps=rate - probe_rate
    )
    probe, job = bench.point("open", side, tick=tick, dur_s=dur_s, rate=probe_rate, cap=max(4 * int(probe_rate), 64))
    r = h2.finish(started, timeout_s=dur_s + 60.0)
    probe_sent = int((probe.code != DROPPED).sum())
    probe_done = int(((probe.code != DROPPED) & (probe.code != UNFINISHED)).sum())
    t = tally(before, settled(side.metrics_port), r.started + probe_sent, r.done + probe_done)
    return h2load_open_figures(r, t, probe, job, rate), job


def overload(bench: Bench, h2: H2Load, side: Server, rate: float, dur_s: float) -> dict[str, Any]:
    """Open loop at ``rate`` for ``dur_s``; the resident memory of ``side`` read every second."""
    rss: list[tuple[float, int]] = []
    rss_before = tree_rss_bytes(side.pid)

    def sample_rss() -> None:
        rss.append((time.monotonic(), tree_rss_bytes(side.pid)))

    loop_cpu = loops_cpu_s(side.pid)
    front_before = front_refusals(scrape(side.metrics_port))
    figures, job = plain_open(bench, h2, side, rate, dur_s, tick=sample_rss)
    loop_cpu = loops_cpu_s(side.pid) - loop_cpu
    # every call the side's own processes answered, warm-up included as the CPU is (not those its HAProxy front refused)
    answered = sum(figures["accounting"]["by_status"].values()) - (front_refusals(scrape(side.metrics_port)) - front_before)
    during = [b for t, b in rss if job.window_start <= t <= job.window_end + 1.0] or [rss_before]
    return (
        {"side": side.name, "duration_s": dur_s}
        | figures
        | {
            # what one answered call (nearly all refusals, for the server) costs the event loop: the figure
            # that bounds what a process can still serve under a flood (docs/design/haproxy-front.md)
            "loop_us_per_call": loop_cpu / answered * 1e6 if answered else None,
            "rss_before_mb": rss_before / MB,
            "rss_peak_mb": max(during) / MB,
            "rss_end_mb": during[-1] / MB,
            "rss_growth_mb": (max(during) - rss_before) / MB,
            "rss_samples_mb": [round(b / MB, 1) for _, b in rss],
        }
    )


def measure_batch_ms(models_dir: str, batch: int, threads: int) -> float:
    """One VAE batch of ``batch`` one-sample requests through the engine (inputs prepared beforehand): median ms."""
    import torch

    from engine.images import ImageGenerator, ImageRequest
    from engine.limits import ImageLimits
    from engine.modelfile import load_model

    if threads > 0:
        torch.set_num_threads(threads)
    gen = ImageGenerator(load_model(Path(models_dir) / "vae.safetensors"), ImageLimits(max_n=1, max_batch=max(batch, 1)))
    chunks = [gen.prepare(ImageRequest(n=1, seed=i)) for i in range(batch)]
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        gen.run(chunks)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[5:])) * 1000.0


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Bench:
    """What every point shares: the load generators, the servers to watch, the timing."""

    clients: Clients
    n_clients: int
    servers: list[Server]
    warm_s: float
    dur_s: float
    drain_s: float
    seed: itertools.count[int] = field(default_factory=lambda: itertools.count(0, 1_000_000))

    def point(
        self, kind: str, server: Server, tick: Callable[[], None] | None = None, dur_s: float | None = None, **load: Any
    ) -> tuple[Calls, Job]:
        """Run one point: its load (concurrency, window, rate, cap) split between the client processes."""
        start = time.monotonic() + 0.5  # each process opens its channel first
        jobs = []
        for i in range(self.n_clients):
            share: dict[str, Any] = {}
            for key, total in load.items():
                if key in ("concurrency", "window", "cap"):
                    share[key] = total // self.n_clients + (1 if i < total % self.n_clients else 0)
                elif key == "rate":
                    share[key] = total / self.n_clients
                    share["phase"] = i / self.n_clients
                else:
                    share[key] = total
            job = Job(kind, server.port, start, self.warm_s, dur_s or self.dur_s, seed0=next(self.seed), drain_s=self.drain_s, **share)
            if job.concurrency or job.window or job.rate:  # concurrency 1 runs in one process
                jobs.append(job)
        return Calls.merge(self.clients.run(jobs, self.servers, tick=tick)), jobs[0]


def run(args: argparse.Namespace, server_cmd: list[str], cfg: Any) -> dict[str, Any]:
    quick = args.quick
    dur_s = args.duration or (2.0 if quick else 10.0)
    warm_s = 0.5 if quick else 1.0
    overload_s = args.overload_duration or (5.0 if quick else 30.0)
    concurrencies = (1, 16, 64)
    windows = (64, 512, 2048)
    fractions = (0.5, 0.8) if quick else (0.25, 0.5, 0.8)
    ttft_tokens, text_tokens, text_streams = 16, (64 if quick else 100), 32

    batch_ms = args.batch_compute_ms
    if batch_ms is None:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
            batch_ms = ex.submit(measure_batch_ms, args.models_dir, cfg.batch_size, cfg.threads).result(timeout=300)

    h2 = H2Load()  # before any server starts: a missing h2load fails at once, saying how to install it
    logs = tempfile.TemporaryDirectory(prefix="bench-serve-")
    ports = free_ports(4)
    echo_port, sut_port, echo_metrics, sut_metrics = ports
    echo_cmd = [sys.executable, "-m", "bench.echo", "--port", str(echo_port), "--credits", str(cfg.stream_credits)]
    echo_cmd += ["--metrics-port", str(echo_metrics)]
    sut_cmd = [a.replace("{port}", str(sut_port)).replace("{metrics_port}", str(sut_metrics)) for a in server_cmd]
    if args.only_echo:
        sut_cmd = [sys.executable, "-m", "bench.echo", "--port", str(sut_port), "--credits", str(cfg.stream_credits)]
        sut_cmd += ["--metrics-port", str(sut_metrics)]
    echo = Server("echo", echo_cmd, echo_port, open(Path(logs.name) / "echo.log", "wb"), echo_metrics)  # noqa: SIM115 (closed with logs)
    sut = Server("server", sut_cmd, sut_port, open(Path(logs.name) / "server.log", "wb"), sut_metrics)  # noqa: SIM115
    sides = [echo, sut]
    clients: Clients | None = None
    out: dict[str, Any] = {}
    try:
        for s in sides:
            s.start()
        clients = Clients(args.clients, use_uvloop=args.client_loop == "uvloop")
        bench = Bench(clients, args.clients, sides, warm_s, dur_s, drain_s=3.0 if quick else 5.0)
        ready = {}
        for s in sides:
            [r] = clients.run([Job("ready", s.port, timeout_s=args.ready_timeout)], sides)
            ready[s.name] = r["models"]
        has_text = "transformer" in ready["server"]
        rss_idle = tree_rss_bytes(sut.pid)
        out = {
            "machine": {
                "cpu_count": os.cpu_count(),
                "affinity": len(os.sched_getaffinity(0)),
                "processor": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "grpcio": grpc.__version__,
                "uvloop": uvloop_version() if args.client_loop == "uvloop" else None,
                "load_generator_processes": args.clients,
                "quick": quick,
            },
            "setup": {
                "server_cmd": shlex.join(sut_cmd),
                "echo_cmd": shlex.join(echo_cmd),
                "server_models": ready["server"],
                "warm_s": warm_s,
                "duration_s": dur_s,
                "overload_s": overload_s,
                "batch_size": cfg.batch_size,
                "batch_timeout_ms": cfg.batch_timeout_ms,
                "batch_compute_ms": batch_ms,
                "max_inflight": cfg.max_inflight,
                "stream_credits": cfg.stream_credits,
                "server_rss_idle_mb": rss_idle / MB,
            },
            "closed": [],
            "open": [],
            "text": [],
        }
        print_header(out)

        for c in concurrencies:
            for s in sides:
                out["closed"].append(plain_closed(bench, h2, s, c))
        for w in windows:
            for s in sides:
                calls, job = bench.point("stream", s, window=w)
                out["closed"].append({"call": "GenerateStream", "side": s.name, "in_flight": w} | closed_figures(calls, job))
        print_closed(out["closed"])

        best = {s.name: max(r["req_s"] for r in out["closed"] if r["side"] == s.name and r["call"] == "Generate") for s in sides}
        for frac in fractions:
            for s in sides:
                rate = max(best[s.name] * frac, 1.0)
                figures, _ = plain_open(bench, h2, s, rate, dur_s)
                out["open"].append({"side": s.name, "fraction": frac} | figures)
        print_open(out)

        for s in sides:
            if s is sut and not has_text:
                continue
            calls, job = bench.point("text", s, concurrency=1, max_tokens=ttft_tokens)
            out["text"].append({"side": s.name, "streams": 1, "max_new_tokens": ttft_tokens} | text_figures(calls, job))
            calls, job = bench.point("text", s, concurrency=text_streams, max_tokens=text_tokens)
            out["text"].append({"side": s.name, "streams": text_streams, "max_new_tokens": text_tokens} | text_figures(calls, job))
        print_text(out["text"], ttft_tokens, text_tokens)

        out["overload"] = [overload(bench, h2, side, 2 * best[side.name], overload_s) for side in sides]
        out["server_rss_after_mb"] = tree_rss_bytes(sut.pid) / MB
        print_overload(out)
        print_details(out)
    finally:
        if clients is not None:
            clients.close()
        codes = {s.name: s.stop(grace_s=15.0) for s in sides}
        if out:
            out["exit_codes"] = codes
        for s in sides:
            if codes[s.name] not in (0, None, -signal.SIGTERM):
                print(f"\nWARNING: {s.name} exited with code {codes[s.name]}; its log ends:\n{s.tail()}", file=sys.stderr)
            s.log.close()
        logs.cleanup()
        h2.close()
    out["targets"] = targets(out)
    print_targets(out["targets"])
    return out


def plain(x: Any) -> Any:
    """``x`` for strict JSON: numpy numbers as Python's, nan (no sample) as null, inf (unfinished) as "inf"."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else "inf" if math.isinf(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def uvloop_version() -> str | None:
    try:
        return importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        return None


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 s per point, 5 s of overload, open loop at 0.5 and 0.8 (minutes)")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per point (default 10; --quick 2)")
    parser.add_argument("--overload-duration", type=float, default=None, help="seconds of overload (default 30; --quick 5)")
    parser.add_argument("--clients", type=int, default=1, choices=(1, 2), help="load-generator processes")
    parser.add_argument("--client-loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop of the load generators")
    parser.add_argument("--models-dir", default="models", help="the server's --models-dir")
    parser.add_argument("--server-args", default="", help='more flags for python -m server, e.g. "--batch-timeout-ms 1 --max-inflight 512"')
    parser.add_argument(
        "--target-cmd", default=None, help="serve with this command instead of python -m server ({port} and {metrics_port} are replaced)"
    )
    parser.add_argument("--only-echo", action="store_true", help="a second echo server stands in for the server under test")
    parser.add_argument("--batch-compute-ms", type=float, default=None, help="one batch's compute time (default: measured on the engine)")
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for each server to serve")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    for name in ("duration", "overload_duration"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")

    from server.config import ServerConfig, parse_args

    extra = shlex.split(args.server_args)
    base = ["--port", "{port}", "--metrics-port", "{metrics_port}", "--models-dir", args.models_dir, "--log-level", "warning"]
    server_cmd = [sys.executable, "-m", "server", *http_off(), *base, *extra]
    if args.target_cmd is not None:
        server_cmd = shlex.split(args.target_cmd)
    # The server's own parser gives the settings the report needs (batch timeout, credit, ...), environment included.
    cfg = ServerConfig() if args.only_echo else parse_args(["--models-dir", args.models_dir, *extra])

    def on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through run()'s cleanup

    signal.signal(signal.SIGTERM, on_sigterm)
    t0 = time.perf_counter()
    try:
        out = run(args, server_cmd, cfg)
    except KeyboardInterrupt:
        print("interrupted; servers and load generators stopped", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"bench.serve: {e}", file=sys.stderr)
        return 1
    out["total_s"] = time.perf_counter() - t0
    print(f"\ntotal {out['total_s']:.1f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(plain(out), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
