"""The Python load generators of the serving benchmark: grpc.aio clients in their own processes.

Used where a Python client is not the bottleneck (GenerateStream: one message carries hundreds of
requests; text: a call lasts thousands of tokens; the latency probe beside h2load) and by the
tests. Plain Generate at full speed is driven by h2load (bench/h2load.py): this client costs more
per call than the server under test.

  unary   closed loop: c calls in flight, a new call as soon as one ends.
  stream  closed loop over GenerateStream: w requests in flight over as many streams as the credit
          needs, each message carrying every request the credit allows.
  open    calls started on a fixed schedule; latency runs from the scheduled start.
  text    closed loop of text requests (tokens counted as they arrive).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import itertools
import math
import multiprocessing as mp
import signal
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

import grpc

from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc

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


class Watched(Protocol):
    """A server process the load generators watch while they run (bench.serve.Server)."""

    def check_alive(self) -> None: ...


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
        self, jobs: Sequence[Job], servers: Sequence[Watched], every_s: float = 1.0, tick: Callable[[], None] | None = None
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
            # Without a tick, wait the whole period: next_tick never moves then, and a timeout counted to it
            # was 0, a busy loop that took ~90% of a core from the server under test on two cores.
            timeout = every_s if tick is None else max(0.0, min(every_s, next_tick - time.monotonic()))
            for ready in wait([self.conns[i] for i in waiting.values()], timeout=timeout):
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
