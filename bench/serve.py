"""Serving benchmark: the gRPC server beside a bare grpc.aio echo of the same call shapes, in one run.

    python -m bench.serve [--quick] [--duration S] [--clients N] [--json FILE] [--server-args "..."]

Two servers run as subprocesses on free 127.0.0.1 ports: the server under test (``python -m
server``, its flags from ``--server-args``) and ``bench.echo``, which answers every call at once
and so measures the ceiling of grpc.aio itself on this machine. The load comes from ``--clients``
separate processes (grpc.aio, on uvloop when installed); the servers and the load share the same
cores, so every point is run against the echo and then the server, never both at once.

  closed loop   Generate: c calls in flight, one image request each (vae, n=1), a new call as
                soon as one ends. GenerateStream: w requests in flight over as many streams as the
                server's credit needs, each message carrying every request the credit allows.
  open loop     Generate calls started on a fixed schedule (a fraction of that side's best
                closed-loop Generate rate, its "maximum sustained rate"); latency runs from the
                scheduled start, so a client that falls behind does not hide the queueing.
  text          transformer, prompt "ROMEO:": time to first token with one stream at a time,
                tokens/s with 32 streams.
  overload      Generate offered at twice the side's maximum: goodput, latency of the admitted,
                how fast refusals (RESOURCE_EXHAUSTED) come back, and the resident memory (VmRSS
                of the server and its children, read every second) over the run.

A point is a warm-up and a measured window; throughput counts the requests finishing inside the
window, latencies those started (or due) inside it; calls still open at the end get a few seconds
to finish and then count as unfinished (infinite latency). The targets are issue 4's, checked on
the server under test. This module is longer than most: it holds the process harness, the load
generators and the report, which only make sense together.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import ctypes
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
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np

from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
OK = 0
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
NO_FINISH = -1  # the call ended OK without a Finish
UNFINISHED = -2  # still open when the drain time ran out: infinite latency
DROPPED = -3  # open loop: not sent, the client already had its cap of calls open
CODE_NAMES = {NO_FINISH: "NO_FINISH", UNFINISHED: "UNFINISHED", DROPPED: "DROPPED"} | {s.value[0]: s.name for s in grpc.StatusCode}
PROMPT = "ROMEO:"
MB = 1024 * 1024


# -- jobs: what one load-generator process is asked to do ----------------------------------------


@dataclass(frozen=True)
class Job:
    """One process's share of a point. Times are time.monotonic() (CLOCK_MONOTONIC: one clock for every process)."""

    kind: str  # "ready", "unary", "stream", "open", "text"
    port: int
    start: float = 0.0  # the load begins
    warm_s: float = 0.0  # then the measured window: [start + warm_s, start + warm_s + dur_s)
    dur_s: float = 0.0
    concurrency: int = 0  # unary, text: calls in flight
    window: int = 0  # stream: requests in flight
    rate: float = 0.0  # open: calls started per second
    cap: int = 0  # open: the most calls open at once; beyond it a call is dropped (DROPPED)
    max_tokens: int = 0  # text: new tokens per request
    phase: float = 0.0  # open: this process's calls are due at start + (i + phase) / rate (processes interleave)
    seed0: int = 0  # seeds are distinct across processes and calls
    drain_s: float = 5.0  # after the window, time for open calls to finish
    timeout_s: float = 30.0  # each call's deadline

    @property
    def window_start(self) -> float:
        return self.start + self.warm_s

    @property
    def window_end(self) -> float:
        return self.start + self.warm_s + self.dur_s


class Records:
    """One row per request: when it was due, sent, first answered and finished, its status code and tokens."""

    def __init__(self) -> None:
        self.cols = {name: array.array("d") for name in ("due", "sent", "first", "end")}
        self.code = array.array("i")
        self.tokens = array.array("i")
        self.counts = {"msgs_out": 0, "msgs_in": 0, "tokens_in_window": 0}
        self.details: dict[str, str] = {}  # status code name -> the first details string seen with it

    def failed(self, e: grpc.aio.AioRpcError) -> int:
        """The status code of a failed call; its details kept for the report."""
        code = e.code()
        self.details.setdefault(code.name, str(e.details()))
        return int(code.value[0])

    def add(self, due: float, sent: float, first: float, end: float, code: int, tokens: int = 0) -> None:
        c = self.cols
        c["due"].append(due)
        c["sent"].append(sent)
        c["first"].append(first)
        c["end"].append(end)
        self.code.append(code)
        self.tokens.append(tokens)

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v.tobytes() for k, v in self.cols.items()}
        out["code"] = self.code.tobytes()
        out["tokens"] = self.tokens.tobytes()
        out["counts"] = dict(self.counts)
        out["details"] = dict(self.details)
        return out


# -- load generators (run in the client processes) ------------------------------------------------


async def sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.monotonic()))


async def image_call(stub: Any, rec: Records, due: float, seed: int, timeout: float) -> None:
    """One Generate call for one VAE sample, recorded whatever its outcome."""
    sent = time.monotonic()
    first = 0.0
    code = NO_FINISH
    try:
        call = stub.Generate(pb.GenerateRequest(model="vae", image=pb.ImageParams(n=1, seed=seed)), timeout=timeout)
        async for resp in call:
            if not first:
                first = time.monotonic()
            if resp.HasField("finish"):
                code = resp.finish.code
    except grpc.aio.AioRpcError as e:
        code = rec.failed(e)
    except asyncio.CancelledError:
        now = time.monotonic()
        rec.add(due, sent, first or now, now, UNFINISHED)
        raise
    end = time.monotonic()
    rec.add(due, sent, first or end, end, code)


async def run_unary(stub: Any, job: Job, rec: Records) -> None:
    """Closed loop: ``concurrency`` callers, each starting its next call when the last one ends."""
    seeds = itertools.count(job.seed0)
    end = job.window_end

    async def caller() -> None:
        while (now := time.monotonic()) < end:
            await image_call(stub, rec, now, next(seeds), job.timeout_s)

    await sleep_until(job.start)
    await bounded(asyncio.gather(*(caller() for _ in range(job.concurrency))), end + job.drain_s)


async def run_open(stub: Any, job: Job, rec: Records) -> None:
    """Open loop: call i is due at start + (i + phase) / rate, started then (or as soon as the client can)."""
    open_calls: set[asyncio.Task[None]] = set()
    seeds = itertools.count(job.seed0)
    t0 = job.start + job.phase / job.rate
    i = 0
    await sleep_until(t0)
    while (now := time.monotonic()) < job.window_end:
        due_by_now = int((now - t0) * job.rate) + 1
        while i < due_by_now:
            due = t0 + i / job.rate
            i += 1
            if len(open_calls) >= job.cap:
                rec.add(due, now, now, now, DROPPED)
                continue
            task = asyncio.create_task(image_call(stub, rec, due, next(seeds), job.timeout_s))
            open_calls.add(task)
            task.add_done_callback(open_calls.discard)
        await sleep_until(t0 + i / job.rate)
    if open_calls:
        _, pending = await asyncio.wait(set(open_calls), timeout=job.drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def run_text(stub: Any, job: Job, rec: Records) -> None:
    """Closed loop of text requests: ``concurrency`` streams of ``max_tokens`` new tokens each."""
    seeds = itertools.count(job.seed0)
    w0, w1 = job.window_start, job.window_end

    async def caller() -> None:
        while (sent := time.monotonic()) < w1:
            first = 0.0
            code = NO_FINISH
            tokens = 0
            params = pb.TextParams(prompt=PROMPT, max_new_tokens=job.max_tokens, seed=next(seeds))
            try:
                async for resp in stub.Generate(pb.GenerateRequest(model="transformer", text=params), timeout=job.timeout_s):
                    now = time.monotonic()
                    kind = resp.WhichOneof("payload")
                    if kind == "text":
                        first = first or now
                        k = len(resp.text.token_ids) or 1
                        tokens += k
                        if w0 <= now < w1:
                            rec.counts["tokens_in_window"] += k
                    elif kind == "finish":
                        code = resp.finish.code
            except grpc.aio.AioRpcError as e:
                code = rec.failed(e)
            end = time.monotonic()
            rec.add(sent, sent, first or end, end, code, tokens)

    await sleep_until(job.start)
    await bounded(asyncio.gather(*(caller() for _ in range(job.concurrency))), w1 + job.drain_s)


@dataclass
class Stream:
    """One open GenerateStream and the credit its first message granted."""

    call: Any
    credit: int


async def open_stream(stub: Any) -> Stream:
    call = stub.GenerateStream()
    try:
        first = await asyncio.wait_for(call.read(), 10.0)
    except TimeoutError:
        call.cancel()
        raise RuntimeError("GenerateStream: no first message (the credit grant) within 10 s") from None
    if first is grpc.aio.EOF:
        raise RuntimeError(f"GenerateStream ended before granting credit: {await call.code()} {await call.details()}")
    return Stream(call, first.credits)


async def drive_stream(stream: Stream, share: int, job: Job, rec: Records, seeds: Iterator[int]) -> None:
    """Keep ``share`` requests in flight on one stream (never beyond its credit), as few messages as it allows."""
    call = stream.call
    credit = stream.credit
    in_flight: dict[str, float] = {}  # id -> sent
    wake = asyncio.Event()

    async def read() -> None:
        nonlocal credit
        while (msg := await call.read()) is not grpc.aio.EOF:
            now = time.monotonic()
            rec.counts["msgs_in"] += 1
            credit += msg.credits
            for r in msg.results:
                if r.HasField("finish"):
                    sent = in_flight.pop(r.id, None)
                    if sent is not None:
                        rec.add(sent, sent, now, now, r.finish.code)
            wake.set()

    reader = asyncio.create_task(read())
    next_id = 0
    try:
        while (now := time.monotonic()) < job.window_end and not reader.done():
            room = min(credit, share - len(in_flight))
            if room <= 0:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), job.window_end - now)
                continue
            requests = []
            for _ in range(room):
                rid = str(next_id)
                next_id += 1
                requests.append(pb.GenerateRequest(model="vae", id=rid, image=pb.ImageParams(n=1, seed=next(seeds))))
                in_flight[rid] = now
            credit -= room
            await call.write(pb.StreamRequest(requests=requests))
            rec.counts["msgs_out"] += 1
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.done_writing()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), job.drain_s)
        if reader.done() and reader.exception() is not None:
            raise RuntimeError(f"GenerateStream failed: {reader.exception()}")
    finally:
        reader.cancel()
        call.cancel()
        now = time.monotonic()
        for sent in in_flight.values():
            rec.add(sent, sent, now, now, UNFINISHED)


async def run_stream(stub: Any, job: Job, rec: Records) -> None:
    """Closed loop over GenerateStream: ``window`` requests in flight, over as many streams as the credit needs."""
    streams = [await open_stream(stub)]
    n = max(1, math.ceil(job.window / max(streams[0].credit, 1)))
    streams += [await open_stream(stub) for _ in range(n - 1)]
    shares = [job.window // n + (1 if i < job.window % n else 0) for i in range(n)]
    seeds = itertools.count(job.seed0)
    await sleep_until(job.start)
    await asyncio.gather(*(drive_stream(s, share, job, rec, seeds) for s, share in zip(streams, shares, strict=True)))


async def bounded(aw: Coroutine[Any, Any, Any] | asyncio.Future[Any], deadline: float) -> None:
    """Await ``aw`` until ``deadline`` (monotonic), then cancel it: no point outlives its time."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(aw, max(0.0, deadline - time.monotonic()))


async def check_ready(port: int, timeout: float) -> dict[str, Any]:
    """Poll health (then ListModels) until the server answers; the names of its models."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    last = "no answer"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health_stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                resp = await health_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    models = await pb_grpc.GeneratorStub(channel).ListModels(pb.ListModelsRequest(), timeout=5.0)
                    return {"models": sorted({m.name for m in models.models})}
                last = f"health status {resp.status}"
            except grpc.aio.AioRpcError as e:
                last = f"{e.code().name}: {e.details()}"
            await asyncio.sleep(0.2)
    return {"error": f"127.0.0.1:{port} not serving after {timeout:.0f} s ({last})"}


CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * MB), ("grpc.max_send_message_length", 64 * MB)]
RUNNERS: dict[str, Callable[[Any, Job, Records], Coroutine[Any, Any, None]]] = {
    "unary": run_unary,
    "open": run_open,
    "text": run_text,
    "stream": run_stream,
}


async def execute(job: Job) -> dict[str, Any]:
    if job.kind == "ready":
        return await check_ready(job.port, job.timeout_s)
    rec = Records()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{job.port}", options=CHANNEL_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10.0)
        await RUNNERS[job.kind](pb_grpc.GeneratorStub(channel), job, rec)
    return rec.payload()


def run_loop(coro: Coroutine[Any, Any, dict[str, Any]], use_uvloop: bool) -> dict[str, Any]:
    """Run ``coro`` on uvloop when asked and installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        use_uvloop = False
    if not use_uvloop:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def die_with_parent() -> None:
    """Linux: get SIGTERM when the benchmark's process dies, however it dies (no orphaned servers or clients)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def client_main(conn: Connection, use_uvloop: bool) -> None:
    """A load-generator process: runs the jobs it is sent, one at a time, until None or EOF."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            result = run_loop(execute(job), use_uvloop)
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {e}"}
        try:
            conn.send(result)
        except (BrokenPipeError, OSError):
            return


# -- the harness (the benchmark's own process) ----------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


class Clients:
    """The load-generator processes (spawned: a fresh interpreter, no inherited gRPC state)."""

    def __init__(self, n: int, use_uvloop: bool = True) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for i in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=client_main, args=(child, use_uvloop), name=f"bench-client-{i}", daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def run(
        self, jobs: Sequence[Job], servers: Sequence[Server], every_s: float = 1.0, tick: Callable[[], None] | None = None
    ) -> list[dict[str, Any]]:
        """Send the jobs to the first len(jobs) processes and gather the results, calling ``tick`` about every ``every_s``."""
        if len(jobs) > len(self.conns):
            raise ValueError(f"{len(jobs)} jobs for {len(self.conns)} load generators")
        for conn, job in zip(self.conns, jobs, strict=False):
            conn.send(job)
        results: dict[int, dict[str, Any]] = {}
        next_tick = time.monotonic()
        while len(results) < len(jobs):
            if tick is not None and time.monotonic() >= next_tick:
                tick()
                next_tick += every_s
            waiting = {id(c): i for i, c in enumerate(self.conns[: len(jobs)]) if i not in results}
            for ready in wait([self.conns[i] for i in waiting.values()], timeout=max(0.0, min(every_s, next_tick - time.monotonic()))):
                i = waiting[id(ready)]
                try:
                    results[i] = self.conns[i].recv()
                except EOFError:
                    raise RuntimeError(f"load generator {i} died (exit code {self.procs[i].exitcode})") from None
            for server in servers:
                server.check_alive()
        errors = [r["error"] for _, r in sorted(results.items()) if "error" in r]
        if errors:
            raise RuntimeError("load generator: " + "; ".join(errors))
        return [results[i] for i in range(len(jobs))]

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(3.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(3.0)
            if proc.is_alive():
                proc.kill()
                proc.join()


# -- figures --------------------------------------------------------------------------------------


@dataclass
class Calls:
    """Every process's records of one point, merged."""

    due: np.ndarray
    sent: np.ndarray
    first: np.ndarray
    end: np.ndarray
    code: np.ndarray
    tokens: np.ndarray
    counts: dict[str, int]
    details: dict[str, str]

    @classmethod
    def merge(cls, payloads: Sequence[dict[str, Any]]) -> Calls:
        def col(name: str, dtype: type) -> np.ndarray:
            return np.concatenate([np.frombuffer(p[name], dtype=dtype) for p in payloads])

        counts: dict[str, int] = {}
        details: dict[str, str] = {}
        for p in payloads:
            for k, v in p["counts"].items():
                counts[k] = counts.get(k, 0) + v
            details = p["details"] | details
        f8, i4 = np.float64, np.int32
        return cls(col("due", f8), col("sent", f8), col("first", f8), col("end", f8), col("code", i4), col("tokens", i4), counts, details)


def pct_ms(seconds: np.ndarray, q: float) -> float:
    """The q-th percentile in ms, no interpolation (so an infinite sample gives inf, not nan); nan when empty."""
    if seconds.size == 0:
        return math.nan
    return float(np.percentile(seconds, q, method="inverted_cdf")) * 1000.0


def code_counts(codes: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(codes, return_counts=True)
    return {CODE_NAMES.get(int(v), str(int(v))): int(c) for v, c in zip(values, counts, strict=True) if v != OK}


def closed_figures(calls: Calls, job: Job) -> dict[str, Any]:
    """Requests/s finishing OK in the window; latency of those that did; everything else by code."""
    w0, w1 = job.window_start, job.window_end
    in_window = (calls.end >= w0) & (calls.end < w1)
    ok = in_window & (calls.code == OK)
    lat = (calls.end - calls.sent)[ok]
    out: dict[str, Any] = {
        "req_s": float(ok.sum()) / job.dur_s,
        "p50_ms": pct_ms(lat, 50),
        "p90_ms": pct_ms(lat, 90),
        "p99_ms": pct_ms(lat, 99),
        "not_ok": code_counts(calls.code[in_window | (calls.code == UNFINISHED)]),
        "details": calls.details,
    }
    if calls.counts.get("msgs_out"):
        out["msgs_out_s"] = calls.counts["msgs_out"] / (job.warm_s + job.dur_s)
        out["msgs_in_s"] = calls.counts["msgs_in"] / (job.warm_s + job.dur_s)
        out["requests_per_msg_out"] = calls.code.size / calls.counts["msgs_out"]
    return out


def open_figures(calls: Calls, job: Job, offered: float) -> dict[str, Any]:
    """Latency from the scheduled start for the calls due in the window; goodput = OK finishing in it."""
    w0, w1 = job.window_start, job.window_end
    due = (calls.due >= w0) & (calls.due < w1)
    code = calls.code
    admitted = due & ((code == OK) | (code == UNFINISHED))
    lat = np.where(code == UNFINISHED, np.inf, calls.end - calls.due)[admitted]
    refused = due & (code == RESOURCE_EXHAUSTED)
    sent = due & (code != DROPPED)
    return {
        "offered_req_s": offered,
        "sent_req_s": float(sent.sum()) / job.dur_s,
        "goodput_req_s": float(((calls.end >= w0) & (calls.end < w1) & (code == OK)).sum()) / job.dur_s,
        "p50_ms": pct_ms(lat, 50),
        "p90_ms": pct_ms(lat, 90),
        "p99_ms": pct_ms(lat, 99),
        "p99_from_sent_ms": pct_ms(np.where(code == UNFINISHED, np.inf, calls.end - calls.sent)[admitted], 99),
        "client_lag_p99_ms": pct_ms((calls.sent - calls.due)[sent], 99),
        "refused": int(refused.sum()),
        "refused_frac": float(refused.sum()) / max(int(sent.sum()), 1),
        "refusal_p50_ms": pct_ms((calls.end - calls.sent)[refused], 50),
        "refusal_p99_ms": pct_ms((calls.end - calls.sent)[refused], 99),
        "not_ok": code_counts(code[due & ~refused]),
        "details": calls.details,
    }


def text_figures(calls: Calls, job: Job) -> dict[str, Any]:
    w0, w1 = job.window_start, job.window_end
    started = (calls.sent >= w0) & (calls.sent < w1)
    ok = started & (calls.code == OK)
    ttft = (calls.first - calls.sent)[ok]
    return {
        "tokens_s": calls.counts.get("tokens_in_window", 0) / job.dur_s,
        "requests": int(ok.sum()),
        "ttft_p50_ms": pct_ms(ttft, 50),
        "ttft_p99_ms": pct_ms(ttft, 99),
        "ms_per_token_p50": pct_ms((calls.end - calls.first)[ok] / np.maximum(calls.tokens[ok] - 1, 1), 50),
        "not_ok": code_counts(calls.code[started]),
        "details": calls.details,
    }


def overload(bench: Bench, side: Server, rate: float, cap: int, dur_s: float) -> dict[str, Any]:
    """Open loop at ``rate`` for ``dur_s``; the resident memory of ``side`` read every second."""
    rss: list[tuple[float, int]] = []
    rss_before = tree_rss_bytes(side.pid)

    def sample_rss() -> None:
        rss.append((time.monotonic(), tree_rss_bytes(side.pid)))

    calls, job = bench.point("open", side, tick=sample_rss, dur_s=dur_s, rate=rate, cap=cap)
    during = [b for t, b in rss if job.window_start <= t <= job.window_end + 1.0] or [rss_before]
    return (
        {"side": side.name, "duration_s": dur_s}
        | open_figures(calls, job, rate)
        | {
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

    from engine.images import ImageGenerator, ImageLimits, ImageRequest
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


def fmt(x: float, unit: str = "") -> str:
    if isinstance(x, float) and math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf"
    if abs(x) >= 1000:
        return f"{x:,.0f}{unit}"
    if abs(x) >= 100:
        return f"{x:.0f}{unit}"
    if abs(x) >= 10:
        return f"{x:.1f}{unit}"
    return f"{x:.2f}{unit}"


def not_ok_text(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"


def run(args: argparse.Namespace, server_cmd: list[str], cfg: Any) -> dict[str, Any]:
    quick = args.quick
    dur_s = args.duration or (2.0 if quick else 10.0)
    warm_s = 0.5 if quick else 1.0
    overload_s = args.overload_duration or (5.0 if quick else 30.0)
    concurrencies = (1, 16, 64)
    windows = (64, 512, 2048)
    fractions = (0.5,) if quick else (0.25, 0.5, 0.75)
    ttft_tokens, text_tokens, text_streams = 16, (64 if quick else 100), 32

    batch_ms = args.batch_compute_ms
    if batch_ms is None:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
            batch_ms = ex.submit(measure_batch_ms, args.models_dir, cfg.batch_size, cfg.threads).result(timeout=300)

    logs = tempfile.TemporaryDirectory(prefix="bench-serve-")
    echo_port = free_port()
    while (sut_port := free_port()) == echo_port:
        pass
    echo_cmd = [sys.executable, "-m", "bench.echo", "--port", str(echo_port), "--credits", str(cfg.stream_credits)]
    sut_cmd = [a.replace("{port}", str(sut_port)) for a in server_cmd]
    if args.only_echo:
        sut_cmd = [sys.executable, "-m", "bench.echo", "--port", str(sut_port), "--credits", str(cfg.stream_credits)]
    echo = Server("echo", echo_cmd, echo_port, open(Path(logs.name) / "echo.log", "wb"))  # noqa: SIM115 (closed with logs)
    sut = Server("server", sut_cmd, sut_port, open(Path(logs.name) / "server.log", "wb"))  # noqa: SIM115
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
                calls, job = bench.point("unary", s, concurrency=c)
                out["closed"].append({"call": "Generate", "side": s.name, "in_flight": c} | closed_figures(calls, job))
        for w in windows:
            for s in sides:
                calls, job = bench.point("stream", s, window=w)
                out["closed"].append({"call": "GenerateStream", "side": s.name, "in_flight": w} | closed_figures(calls, job))
        print_closed(out["closed"])

        best = {s.name: max(r["req_s"] for r in out["closed"] if r["side"] == s.name and r["call"] == "Generate") for s in sides}
        for frac in fractions:
            for s in sides:
                rate = max(best[s.name] * frac, 1.0)
                calls, job = bench.point("open", s, rate=rate, cap=max(4 * int(rate), 64))
                out["open"].append({"side": s.name, "fraction": frac} | open_figures(calls, job, rate))
        print_open(out)

        for s in sides:
            if s is sut and not has_text:
                continue
            calls, job = bench.point("text", s, concurrency=1, max_tokens=ttft_tokens)
            out["text"].append({"side": s.name, "streams": 1, "max_new_tokens": ttft_tokens} | text_figures(calls, job))
            calls, job = bench.point("text", s, concurrency=text_streams, max_tokens=text_tokens)
            out["text"].append({"side": s.name, "streams": text_streams, "max_new_tokens": text_tokens} | text_figures(calls, job))
        print_text(out["text"], ttft_tokens, text_tokens)

        cap = int(cfg.max_inflight * 1.25) + 256  # above the server's limit, so that it is the server that refuses
        out["overload"] = [overload(bench, side, 2 * best[side.name], cap, overload_s) for side in sides]
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


# -- the report -----------------------------------------------------------------------------------


def print_header(out: dict[str, Any]) -> None:
    m, s = out["machine"], out["setup"]
    loop = f"grpc.aio on uvloop {m['uvloop']}" if m["uvloop"] else "grpc.aio on asyncio"
    print(
        f"genserve serving benchmark{' (--quick)' if m['quick'] else ''}: {m['cpu_count']} CPUs ({m['affinity']} usable, "
        f"{m['processor']}), python {m['python']}, grpcio {m['grpcio']}; load from {m['load_generator_processes']} "
        f"process(es), {loop}, on the same cores"
    )
    print(f"server under test: {s['server_cmd']}")
    print(f"echo (ceiling):    {s['echo_cmd']}")
    print(
        f"each point: {s['warm_s']} s warm-up + {s['duration_s']} s measured, echo then server; batch_size {s['batch_size']}, "
        f"batch_timeout {s['batch_timeout_ms']} ms, VAE batch compute {s['batch_compute_ms']:.2f} ms (batch {s['batch_size']}), "
        f"max_inflight {s['max_inflight']}, stream credit {s['stream_credits']}\n",
        flush=True,
    )


def print_closed(rows: list[dict[str, Any]]) -> None:
    print("closed loop: one-sample VAE requests; req/s finishing OK, latency ms per request")
    head = f"{'call':<15}{'in flight':>10} | {'echo req/s':>11}{'p50':>8}{'p99':>8} | {'server req/s':>13}{'p50':>8}{'p99':>8} | "
    head += f"{'srv/echo':>8}  server not OK"
    print(head)
    print("-" * len(head))
    by = {(r["call"], r["in_flight"], r["side"]): r for r in rows}
    for call, n in dict.fromkeys((r["call"], r["in_flight"]) for r in rows):
        e, s = by[(call, n, "echo")], by[(call, n, "server")]
        print(
            f"{call:<15}{n:>10} | {fmt(e['req_s']):>11}{fmt(e['p50_ms']):>8}{fmt(e['p99_ms']):>8} | "
            f"{fmt(s['req_s']):>13}{fmt(s['p50_ms']):>8}{fmt(s['p99_ms']):>8} | {s['req_s'] / max(e['req_s'], 1e-9):>8.2f}  "
            f"{not_ok_text(s['not_ok'])}"
        )
    streams = [r for r in rows if "msgs_out_s" in r]
    if streams:
        parts = [
            f"{r['side']} {r['in_flight']}: {fmt(r['msgs_out_s'])}, {fmt(r['msgs_in_s'])} ({r['requests_per_msg_out']:.1f})"
            for r in streams
        ]
        print("GenerateStream messages/s out, in (requests per message out): " + "; ".join(parts))
    print(flush=True)


def print_open(out: dict[str, Any]) -> None:
    print(
        "open loop: Generate started on a schedule at a fraction of each side's best closed-loop rate; latency ms from the scheduled start"
    )
    head = f"{'side':<8}{'fraction':>9}{'offered/s':>11}{'sent/s':>9}{'goodput/s':>11}{'p50':>8}{'p90':>8}{'p99':>8}{'lag p99':>9}  not OK"
    print(head)
    print("-" * len(head))
    for r in out["open"]:
        print(
            f"{r['side']:<8}{r['fraction']:>9.2f}{fmt(r['offered_req_s']):>11}{fmt(r['sent_req_s']):>9}{fmt(r['goodput_req_s']):>11}"
            f"{fmt(r['p50_ms']):>8}{fmt(r['p90_ms']):>8}{fmt(r['p99_ms']):>8}{fmt(r['client_lag_p99_ms']):>9}  "
            f"{not_ok_text(r['not_ok'] | ({'RESOURCE_EXHAUSTED': r['refused']} if r['refused'] else {}))}"
        )
    print("(lag: how late the client started calls; with the load on the same cores it is part of every latency)\n", flush=True)


def print_text(rows: list[dict[str, Any]], ttft_tokens: int, text_tokens: int) -> None:
    print(f'text: transformer, prompt "{PROMPT}"; 1 stream x {ttft_tokens} new tokens, 32 streams x {text_tokens} new tokens')
    head = f"{'side':<8}{'streams':>8}{'requests':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'ms/token':>9}{'tokens/s':>10}  not OK"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['side']:<8}{r['streams']:>8}{r['requests']:>9}{fmt(r['ttft_p50_ms']):>10}{fmt(r['ttft_p99_ms']):>10}"
            f"{fmt(r['ms_per_token_p50']):>9}{fmt(r['tokens_s']):>10}  {not_ok_text(r['not_ok'])}"
        )
    print(flush=True)


def print_overload(out: dict[str, Any]) -> None:
    print("overload: Generate offered at 2x each side's best closed-loop rate; latency ms of the admitted from the scheduled start")
    head = f"{'side':<8}{'offered/s':>10}{'sent/s':>9}{'goodput/s':>10}{'p50':>8}{'p99':>8}{'refused':>9}{'ref p50':>9}{'ref p99':>9}"
    head += f"{'lag p99':>9}{'RSS MB':>8}{'peak':>6}{'growth':>7}  other not OK"
    print(head)
    print("-" * len(head))
    for o in out["overload"]:
        print(
            f"{o['side']:<8}{fmt(o['offered_req_s']):>10}{fmt(o['sent_req_s']):>9}{fmt(o['goodput_req_s']):>10}{fmt(o['p50_ms']):>8}"
            f"{fmt(o['p99_ms']):>8}{o['refused']:>9}{fmt(o['refusal_p50_ms']):>9}{fmt(o['refusal_p99_ms']):>9}"
            f"{fmt(o['client_lag_p99_ms']):>9}{o['rss_before_mb']:>8.0f}{o['rss_peak_mb']:>6.0f}{o['rss_growth_mb']:>7.1f}  "
            f"{not_ok_text(o['not_ok'])}"
        )
    s = out["setup"]
    print(
        f"({out['overload'][0]['duration_s']} s each; RSS: VmRSS of the server and its children, before the overload and its peak; "
        f"server idle {s['server_rss_idle_mb']:.0f} MB, after {out['server_rss_after_mb']:.0f} MB)\n",
        flush=True,
    )


def print_details(out: dict[str, Any]) -> None:
    """The details string that came with each failing status code, once per side and code."""
    seen: dict[tuple[str, str], str] = {}
    for section in ("closed", "open", "text", "overload"):
        for r in out[section]:
            for code, details in r.get("details", {}).items():
                seen.setdefault((r["side"], code), details)
    for (side, code), details in seen.items():
        print(f"{side} {code}: {details!r}")
    if seen:
        print()


def targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 4's targets, on the server under test: figure, value, bound, met (None: nothing to judge)."""
    if "overload" not in out:
        return []
    srv = [r for r in out["closed"] if r["side"] == "server"]
    echo64 = next(r for r in out["closed"] if r["side"] == "echo" and r["call"] == "Generate" and r["in_flight"] == 64)
    srv64 = next(r for r in srv if r["call"] == "Generate" and r["in_flight"] == 64)
    half = next((r for r in out["open"] if r["side"] == "server" and r["fraction"] == 0.5), None)
    best = max(r["req_s"] for r in srv if r["call"] == "Generate")
    o, s = next(r for r in out["overload"] if r["side"] == "server"), out["setup"]
    bound_admitted = 3 * (s["batch_timeout_ms"] + s["batch_compute_ms"])
    rows: list[tuple[str, float, str, float]] = [
        ("GenerateStream req/s (best window)", max(r["req_s"] for r in srv if r["call"] == "GenerateStream"), ">=", 15000),
        ("Generate c=64, server/echo", srv64["req_s"] / max(echo64["req_s"], 1e-9), ">=", 0.70),
        ("p99 ms at half the max Generate rate", half["p99_ms"] if half else math.nan, "<=", 20),
        ("overload goodput / max Generate rate", o["goodput_req_s"] / max(best, 1e-9), ">=", 0.90),
        ("overload p99 ms of the admitted", o["p99_ms"], "<=", bound_admitted),
        ("overload refusal p99 ms", o["refusal_p99_ms"], "<=", 10),
        ("overload server RSS growth MB", o["rss_growth_mb"], "<", 100),
    ]
    text = {r["streams"]: r for r in out["text"] if r["side"] == "server"}
    if text:
        rows += [("text TTFT p50 ms (1 stream)", text[1]["ttft_p50_ms"], "<=", 15)]
        rows += [("text tokens/s (32 streams)", text[32]["tokens_s"], ">=", 10000)]
    result = []
    for name, value, op, bound in rows:
        met = None if math.isnan(value) else value >= bound if op == ">=" else value <= bound if op == "<=" else value < bound
        result.append({"figure": name, "value": value, "target": f"{op} {fmt(float(bound))}", "met": met})
    return result


def print_targets(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    print("targets (issue 4), server under test")
    head = f"{'figure':<40}{'value':>10}  {'target':<12}"
    print(head)
    print("-" * (len(head) + 8))
    for r in rows:
        verdict = "n/a (no sample: e.g. nothing was refused)" if r["met"] is None else "met" if r["met"] else "MISSED"
        print(f"{r['figure']:<40}{fmt(r['value']):>10}  {r['target']:<12}{verdict}")
    judged = [r for r in rows if r["met"] is not None]
    print(f"{sum(r['met'] for r in judged)} of {len(judged)} met", flush=True)


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 s per point, 5 s of overload, one open-loop rate (about a minute)")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per point (default 10; --quick 2)")
    parser.add_argument("--overload-duration", type=float, default=None, help="seconds of overload (default 30; --quick 5)")
    parser.add_argument("--clients", type=int, default=1, choices=(1, 2), help="load-generator processes")
    parser.add_argument("--client-loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop of the load generators")
    parser.add_argument("--models-dir", default="models", help="the server's --models-dir")
    parser.add_argument("--server-args", default="", help='more flags for python -m server, e.g. "--batch-timeout-ms 1 --max-inflight 512"')
    parser.add_argument("--target-cmd", default=None, help="serve with this command instead of python -m server ({port} is replaced)")
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
    base = ["--port", "{port}", "--metrics-port", "0", "--models-dir", args.models_dir, "--log-level", "warning"]
    server_cmd = [sys.executable, "-m", "server", *base, *extra]
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
