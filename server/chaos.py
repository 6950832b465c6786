r"""Chaos: a real server under sustained mixed load while faults are injected; then the books are checked.

    python -m server.chaos --duration 60 [--seed S] [--json PATH]

``run_chaos(ChaosConfig(...))`` starts a server in this process (``server.testing.running_server``,
with a restart intensity the injected faults cannot trip), drives it with many clients over real
localhost gRPC channels, and injects, for ``duration_s`` seconds:

- every 100-400 ms, a fault in the next component of a shuffled rotation of every stage task
  (producer, processor-N, batcher-<model>, text-<model>, router: ``Supervisor.kill``) and of every
  text model's decode loop (a thread, not a task: its live ``DecodeLoop.step`` is wrapped to raise
  once, which fails every sequence of that loop; the engine starts a new loop on next use);
- exceptions inside image models' forward passes (``ImageGenerator._forward`` raises, inside
  ``run``, for one armed batch: the engine maps it to UNAVAILABLE "may be retried");
- batches that stall past their deadlines (``Engine.generate_images`` awaits ``asyncio.sleep``
  before running one armed batch, for longer than the latest deadline of the requests in it; an
  asyncio sleep, not ``time.sleep``: small batches run inline on the event loop);
- clients that disconnect mid-stream (a ``GenerateStream`` or a ``Generate`` call cancelled with
  requests in flight), requests cancelled by id on a stream, and requests whose deadline
  (``timeout_ms``, 1 ms up) expires while they are queued or decoding.

The load (all on raw ``grpc.aio`` stubs, so that the books hold what the server itself answered:
the SDK would retry UNAVAILABLE and enforce deadlines on the client, hiding both): closed-loop
``Generate`` clients for images (vae, gan) and text, ``GenerateStream`` sessions keeping a window
of mixed requests in flight within their credits, deadline probes and disconnectors.

The books. Every request has a globally unique id (sent as ``GenerateRequest.id``, so the server's
job has it too) and a ``timeout_ms``. Its terminal outcome is the ``Finish`` (OK, or the Finish's
code on a stream) or the call's status (``Generate``), or CLIENT_CANCELLED when the client itself
gave up on it; a second terminal message, a message after the Finish, or output for an id not in
flight is a duplicate. A request with no outcome ``safety_s`` after its deadline is given up on:
it is lost. Its deadline: ``timeout_ms`` counts from the server's admission (the server cannot
know when a request was sent), so a request is late when its outcome arrives more than
``late_tolerance_s`` after admission + timeout (``Pipeline.admit`` is wrapped to note both), or,
if it was never admitted, after send + timeout. The wait for admission (client and server share
one event loop here) is reported apart, with how many would be late counted from the send.

Which requests a fault touched (the classification rule). A fault's victims are taken at the
moment of the fault, from the component it hits:
- a killed stage: the unfinished jobs in its ``holding()`` just before ``kill`` (the supervisor
  fails exactly those with UNAVAILABLE);
- a failed forward pass or a stalled batch: the request ids of the chunks in that batch;
- a failed decode step: the decode loop holds every text request submitted to it, and its set
  changes on another thread, so every text request in flight at any moment between arming the
  fault and 100 ms after the loop was seen failed is counted as touched.
Deadline probes (deliberately short deadlines) and cancelled requests (by id, or on a stream the
client dropped) are neither touched nor untouched: they are expected to fail and are checked only
for one timely outcome. Every other request is "untouched"; at least ``min_untouched_success`` of
them must succeed (OK). Anything else that fails them (a fault reaching beyond what it held,
overload, a lost wake-up) counts against the server.

After the load: in-flight jobs drain to 0 and nothing is left behind (links empty, no stage holds a
job, decode loops idle), every closed stream got all its credit back, health ("" and
genserve.v1.Generator) is SERVING, the kills counted here equal the supervisor's restarts and the
sum of ``genserve_stage_restarts_total``, every stage kind and decode loop was faulted, fresh
requests of every model succeed, and the process RSS (the server is in-process) is back within
``memory_bound_mb`` of where it was after warm-up (after ``gc.collect()``; the RSS before it and the
peak are reported too). The summary is printed; the exit status is 1 when a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import gc
import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.images import ImageChunk, ImageResult
from engine.logs import configure_logging
from engine.registry import ServedModel
from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.app import READINESS_NAMES, GenServer
from server.jobs import Job
from server.testing import running_server

OK = "OK"
CLIENT_CANCELLED = "CLIENT_CANCELLED"  # the client gave up on it (disconnect, cancelled call): its own terminal outcome
DECODE_LOOP = "decode-loop"
Probe = Literal["", "deadline", "cancel"]
Rpc = Literal["Generate", "GenerateStream"]
Kind = Literal["image", "text"]


# -- configuration and report ----------------------------------------------------------------------


@dataclass
class ChaosConfig:
    duration_s: float = 60.0  # load and injection time
    seed: int = 0
    models_dir: str = "models"
    threads: int = 1  # torch intra-op threads of the server
    fault_interval_s: tuple[float, float] = (0.1, 0.4)  # between two faults of the rotation
    forward_error_p: float = 0.3  # per fault tick: arm one failing forward pass of a random image model
    stall_p: float = 0.1  # per fault tick: arm one stalled batch of a random image model (one at a time per model)
    max_stall_s: float = 5.0
    plain_image_clients: int = 3
    plain_text_clients: int = 2
    sessions: int = 3
    session_window: int = 24  # requests one session keeps in flight
    session_requests: tuple[int, int] = (50, 300)  # requests per stream before it is closed and a new one opened
    session_cancel_p: float = 0.02  # per message: also cancel one in-flight request by id
    deadline_probes: int = 1
    disconnectors: int = 1
    image_timeout_s: dict[str, float] = field(default_factory=lambda: {"vae": 2.0, "gan": 4.0})
    text_timeout_s: float = 8.0
    late_tolerance_s: float = 0.25  # an outcome this long past the deadline is late
    safety_s: float = 5.0  # past its deadline, a request with no outcome is given up on (lost)
    min_untouched_success: float = 0.99
    memory_bound_mb: float = 150.0
    drain_timeout_s: float = 10.0
    server: dict[str, Any] = field(default_factory=dict)  # more ServerConfig overrides


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class ChaosReport:
    seed: int
    duration_s: float
    wall_s: float
    sent: int
    completed: int
    failed: dict[str, int]  # terminal outcomes other than OK, by status (CLIENT_CANCELLED: the client's own)
    lost: int
    duplicates: int
    late: int  # outcome later than its deadline + tolerance, or none (the deadline: see Req.due)
    late_examples: list[str]
    late_by_client_clock: int  # ... counting the deadline from the send instead (info: includes the wait for admission)
    worst_past_deadline_ms: float  # the latest outcome relative to its deadline (negative: all came before)
    admission_delay_ms: dict[str, float]  # send -> admission, as the client saw it
    lost_examples: list[str]
    sent_by_call: dict[str, int]  # "Generate image" etc.
    probes: dict[str, dict[str, int]]  # probe kind -> outcomes
    touched: int
    touched_outcomes: dict[str, int]
    touched_by_fault: dict[str, dict[str, int]]
    untouched: int
    untouched_ok: int
    untouched_success: float
    untouched_failures: dict[str, int]
    untouched_failure_examples: list[str]
    faults: dict[str, int]  # fault kind -> count
    kills_by_stage: dict[str, int]
    kills_skipped: int  # stage had no task at that moment (restarting)
    restarts_injected: int
    restarts_supervisor: int
    restarts_metric: int
    health_after: str
    health_not_serving_samples: int
    health_samples: int
    inflight_after: int
    leftovers: list[str]
    drain_s: float
    post_chaos: dict[str, str]
    rss_start_mb: float
    rss_peak_mb: float
    rss_end_before_gc_mb: float
    rss_end_mb: float  # after gc.collect()
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ok"] = self.ok
        return out


# -- the books ------------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class Req:
    id: str
    model: str
    kind: Kind
    rpc: Rpc
    sent: float  # time.monotonic()
    deadline: float
    probe: Probe = ""
    admitted: float | None = None  # when the server admitted it (None: refused, or never reached the server)
    server_deadline: float | None = None  # the deadline the server gave it at admission
    ended: float | None = None
    outcome: str | None = None
    outcomes: int = 0
    touched: set[str] = field(default_factory=set)

    @property
    def due(self) -> float:
        """Its deadline: the server's (admission + timeout) once admitted, else the client's (send + timeout)."""
        return self.server_deadline if self.server_deadline is not None else self.deadline


class Ledger:
    def __init__(self) -> None:
        self.reqs: dict[str, Req] = {}
        self.duplicates = 0
        self.duplicate_examples: list[str] = []

    def new(self, id: str, model: str, kind: Kind, rpc: Rpc, timeout: float) -> Req:
        now = time.monotonic()
        req = Req(id, model, kind, rpc, now, now + timeout)
        self.reqs[id] = req
        return req

    def end(self, req: Req, outcome: str) -> None:
        req.outcomes += 1
        if req.outcomes == 1:
            req.outcome = outcome
            req.ended = time.monotonic()
        else:
            self.duplicate(f"{req.id}: second outcome {outcome} after {req.outcome}")

    def duplicate(self, what: str) -> None:
        self.duplicates += 1
        if len(self.duplicate_examples) < 5:
            self.duplicate_examples.append(what)


def _code_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return f"CODE_{code}"


# -- faults ---------------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str  # kill, decode-step, forward-error, stall
    target: str  # stage name or model
    start: float
    end: float | None = None
    ids: list[str] = field(default_factory=list)  # exact victims (kill, forward-error, stall)
    window: bool = False  # decode-step: text requests in flight during [start, end] are touched


class Injector:
    """Injects the faults; records each one with its victims."""

    def __init__(self, server: GenServer, ledger: Ledger, config: ChaosConfig, rng: random.Random) -> None:
        self.server = server
        self.ledger = ledger
        self.config = config
        self.rng = rng
        self.faults: list[Fault] = []
        self.kills: collections.Counter[str] = collections.Counter()
        self.kills_skipped = 0
        self._lock = threading.Lock()  # forward-pass arming is read on engine threads
        self._armed_errors: collections.Counter[str] = collections.Counter()
        self._armed_stalls: collections.Counter[str] = collections.Counter()
        self._stalling: set[str] = set()
        self._tls = threading.local()
        self._restore: list[Callable[[], None]] = []
        self._watchers: set[asyncio.Task[None]] = set()
        self._decode_pending: set[str] = set()
        self.image_models = [s for s in server.registry.served() if s.images is not None]
        self.text_models = [s for s in server.registry.served() if s.images is None]

    # patches ---------------------------------------------------------------------------------

    def install(self) -> None:
        for served in self.image_models:
            self._patch_images(served)
        engine = self.server.engine
        assert engine is not None
        original = engine.generate_images

        async def generate_images(served: ServedModel, chunks: Sequence[ImageChunk]) -> list[ImageResult]:
            if self._armed_stalls[served.name] and served.name not in self._stalling:
                self._armed_stalls[served.name] -= 1
                await self._stall(served.name, chunks)
            return await original(served, chunks)

        setattr(engine, "generate_images", generate_images)  # noqa: B010 (an instance attribute shadows the method)
        self._restore.append(lambda: delattr(engine, "generate_images"))

        pipeline = self.server.pipeline
        admit = pipeline.admit
        reqs = self.ledger.reqs

        def admit_and_note(job: Job, timeout: float | None) -> None:  # not a fault: notes when the server admitted a request
            admit(job, timeout)
            req = reqs.get(job.id)
            if req is not None:
                now = time.monotonic()
                req.admitted = now
                req.server_deadline = now + (job.deadline - asyncio.get_running_loop().time())

        setattr(pipeline, "admit", admit_and_note)  # noqa: B010
        self._restore.append(lambda: delattr(pipeline, "admit"))

    def _patch_images(self, served: ServedModel) -> None:
        images = served.images
        assert images is not None
        name = served.name
        run, forward = images.run, images._forward

        def chaos_run(chunks: Sequence[ImageChunk]) -> list[ImageResult]:  # engine thread, or inline on the loop
            with self._lock:
                fail = self._armed_errors[name] > 0
                if fail:
                    self._armed_errors[name] -= 1
            if fail:
                now = time.monotonic()
                self.faults.append(Fault("forward-error", name, now, now, [c.request.request_id for c in chunks]))
            self._tls.fail = fail
            try:
                return run(chunks)
            finally:
                self._tls.fail = False

        def chaos_forward(z: Any, labels: Any) -> Any:
            if getattr(self._tls, "fail", False):
                raise RuntimeError(f"chaos: injected failure in the forward pass of {name}")
            return forward(z, labels)

        setattr(images, "run", chaos_run)  # noqa: B010
        images._forward = chaos_forward

        def restore() -> None:
            delattr(images, "run")
            images._forward = forward

        self._restore.append(restore)

    def uninstall(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
        while self._restore:
            self._restore.pop()()

    async def _stall(self, model: str, chunks: Sequence[ImageChunk]) -> None:
        """Hold this batch past the latest deadline of its requests."""
        now = time.monotonic()
        ids = [c.request.request_id for c in chunks]
        deadlines = [self.ledger.reqs[i].due for i in ids if i in self.ledger.reqs]
        stall = min(max([*deadlines, now]) - now + 0.25, self.config.max_stall_s)
        fault = Fault("stall", model, now, now + stall, ids)
        self.faults.append(fault)
        self._stalling.add(model)
        try:
            await asyncio.sleep(stall)
        finally:
            self._stalling.discard(model)
            fault.end = time.monotonic()

    # the injector's loop -----------------------------------------------------------------------

    def _rotation(self) -> list[str]:
        names = list(self.server.supervisor.stages)
        names += [f"{DECODE_LOOP}:{s.name}" for s in self.text_models]
        self.rng.shuffle(names)
        return names

    async def run(self, until: float) -> None:
        rotation: list[str] = []
        lo, hi = self.config.fault_interval_s
        while True:
            pause = self.rng.uniform(lo, hi)
            extra = self.rng.random()  # drawn every tick: the decisions follow the seed, not the timing
            model = self.rng.choice(self.image_models).name if self.image_models else ""
            if time.monotonic() + pause >= until:
                return
            await asyncio.sleep(pause)
            if not rotation:
                rotation = self._rotation()
            target = rotation.pop()
            if target.startswith(DECODE_LOOP):
                self._fail_decode_step(target.split(":", 1)[1])
            else:
                await self._kill(target)
            if model and extra < self.config.forward_error_p:
                with self._lock:
                    self._armed_errors[model] += 1
            elif model and extra < self.config.forward_error_p + self.config.stall_p and not self._armed_stalls[model]:
                self._armed_stalls[model] += 1

    async def _kill(self, name: str) -> None:
        supervisor = self.server.supervisor
        stage = supervisor.stages[name]
        victims = [j.id for j in stage.holding() if not j.done]
        before = supervisor.restart_count[name]
        try:
            supervisor.kill(name)
        except KeyError:  # between a failure and its restart the stage has no task
            self.kills_skipped += 1
            return
        self.kills[name] += 1
        fault = Fault("kill", name, time.monotonic(), ids=victims)
        self.faults.append(fault)
        with contextlib.suppress(TimeoutError):  # one kill per restart: never two cancels on one run
            async with asyncio.timeout(5.0):
                while supervisor.restart_count[name] == before:
                    await asyncio.sleep(0.001)
        fault.end = time.monotonic()

    def _fail_decode_step(self, model: str) -> None:
        if model in self._decode_pending:  # the last one has not fired yet (no text work since)
            return
        engine = self.server.engine
        assert engine is not None
        worker = engine.text_worker(self.server.registry.get(model))
        loop = worker.loop
        original = loop.step
        fired = threading.Event()

        def step() -> Any:  # the decode thread
            if not fired.is_set():
                fired.set()
                raise RuntimeError(f"chaos: injected failure in a decode step of {model}")
            return original()

        fault = Fault("decode-step", model, time.monotonic(), window=True)
        self.faults.append(fault)
        setattr(loop, "step", step)  # noqa: B010
        self._decode_pending.add(model)

        async def watch() -> None:
            try:
                while worker.failed is None:
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.1)  # the failure reaches the jobs through the event loop
            finally:
                fault.end = time.monotonic()
                self._decode_pending.discard(model)
                if not fired.is_set():
                    with contextlib.suppress(AttributeError):
                        delattr(loop, "step")

        task = asyncio.create_task(watch(), name=f"chaos-watch-{model}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def settle(self) -> None:
        """Let pending decode faults close their windows (or give up on them: no text work came)."""
        if self._watchers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.gather(*self._watchers, return_exceptions=True)


# -- load -----------------------------------------------------------------------------------------

PROMPTS = ("ROMEO:", "JULIET:\n", "\n", "First Citizen:\nBefore we proceed", "KING RICHARD II:\nO")


class Load:
    """Builds requests and runs the clients; every request goes through the ledger."""

    def __init__(self, address: str, ledger: Ledger, config: ChaosConfig, models: dict[str, str]) -> None:
        self.address = address
        self.ledger = ledger
        self.config = config
        self.image_models = [m for m, kind in models.items() if kind == "image"]
        self.text_models = [m for m, kind in models.items() if kind == "text"]
        # most image traffic goes to the fast model (the vae: sub-ms batches); the others (the gan: ~100 ms
        # per full batch on one CPU thread) get 30 % of it, in small requests
        self.main_image = "vae" if "vae" in self.image_models else (self.image_models or [""])[0]
        self.given_up: list[str] = []
        self.errors: list[str] = []  # protocol errors: no credit, credit not all returned, a client that crashed

    async def guard(self, client: Coroutine[Any, Any, None]) -> None:
        """Run a client; a crash is recorded (and fails the run's checks) instead of ending the run."""
        try:
            await client
        except Exception as e:
            self.errors.append(f"a client crashed: {type(e).__name__}: {e}")

    # requests ---------------------------------------------------------------------------------

    def image(self, rng: random.Random, id: str, rpc: Rpc, timeout: float | None = None) -> tuple[Req, Any]:
        model = rng.choice(self.image_models) if rng.random() < 0.3 else self.main_image
        heavy = model != self.main_image
        n = rng.randint(1, 8) if heavy else (rng.randint(150, 300) if rng.random() < 0.05 else rng.randint(1, 24))
        params = pb.ImageParams(n=n, seed=rng.getrandbits(32), want_float=rng.random() < 0.05)
        timeout = self.config.image_timeout_s.get(model, max(self.config.image_timeout_s.values())) if timeout is None else timeout
        req = self.ledger.new(id, model, "image", rpc, timeout)
        return req, pb.GenerateRequest(model=model, id=id, timeout_ms=max(1, round(timeout * 1000)), image=params)

    def text(self, rng: random.Random, id: str, rpc: Rpc, timeout: float | None = None, tokens: int = 0) -> tuple[Req, Any]:
        model = rng.choice(self.text_models)
        timeout = self.config.text_timeout_s if timeout is None else timeout
        params = pb.TextParams(
            prompt=rng.choice(PROMPTS), max_new_tokens=tokens or rng.randint(4, 32), temperature=0.8, seed=rng.getrandbits(32)
        )
        req = self.ledger.new(id, model, "text", rpc, timeout)
        return req, pb.GenerateRequest(model=model, id=id, timeout_ms=max(1, round(timeout * 1000)), text=params)

    def mixed(self, rng: random.Random, id: str, rpc: Rpc) -> tuple[Req, Any]:
        if self.text_models and (rng.random() < 0.3 or not self.image_models):
            return self.text(rng, id, rpc)
        return self.image(rng, id, rpc)

    # Generate ---------------------------------------------------------------------------------

    async def generate(self, stub: Any, req: Req, message: Any, cancel_after: int | None = None) -> None:
        """One Generate call to its one outcome; ``cancel_after``: cancel it after that many chunks."""
        call = stub.Generate(message)
        finish: Any = None
        chunks = 0
        try:
            async with asyncio.timeout(max(0.0, req.deadline + self.config.safety_s - time.monotonic())):
                while True:
                    if cancel_after is not None and chunks >= cancel_after and finish is None:
                        req.probe = "cancel"
                        call.cancel()
                        self.ledger.end(req, CLIENT_CANCELLED)
                        return
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        break
                    if finish is not None:
                        self.ledger.duplicate(f"{req.id}: a message after its Finish")
                    if msg.HasField("finish"):
                        finish = msg.finish
                    else:
                        chunks += 1
        except grpc.aio.AioRpcError as e:
            if finish is not None:
                self.ledger.end(req, _code_name(finish.code))
            self.ledger.end(req, str(e.code().name))
            return
        except TimeoutError:
            call.cancel()
            self.given_up.append(req.id)
            return
        if finish is None:
            self.ledger.end(req, "NO_FINISH")  # the call ended OK without its Finish: a protocol error, counted as failed
        else:
            self.ledger.end(req, _code_name(finish.code))

    async def plain(self, name: str, kind: str, rng: random.Random, until: float) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.GeneratorStub(channel)
            n = 0
            while time.monotonic() < until:
                n += 1
                req, message = self.text(rng, f"{name}-{n}", "Generate") if kind == "text" else self.image(rng, f"{name}-{n}", "Generate")
                await self.generate(stub, req, message)

    async def deadline_probe(self, name: str, rng: random.Random, until: float) -> None:
        """Requests whose deadline passes while they are queued (images, 1-10 ms) or decoding (long text)."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.GeneratorStub(channel)
            n = 0
            while time.monotonic() < until:
                n += 1
                if self.text_models and rng.random() < 0.4:
                    req, message = self.text(rng, f"{name}-{n}", "Generate", timeout=rng.uniform(0.02, 0.15), tokens=300)
                else:
                    req, message = self.image(rng, f"{name}-{n}", "Generate", timeout=rng.uniform(0.001, 0.01))
                req.probe = "deadline"
                await self.generate(stub, req, message)
                await asyncio.sleep(rng.uniform(0.0, 0.02))

    async def disconnector(self, name: str, rng: random.Random, until: float) -> None:
        """Clients that go away with work in flight: a Generate cancelled mid-stream, a stream dropped."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.GeneratorStub(channel)
            n = 0
            while time.monotonic() < until:
                n += 1
                if rng.random() < 0.5 and self.text_models:
                    req, message = self.text(rng, f"{name}-g{n}", "Generate", tokens=400)
                    req.probe = "cancel"
                    await self.generate(stub, req, message, cancel_after=rng.randint(1, 20))
                else:
                    session = Session(self, stub, f"{name}-s{n}", rng)
                    await session.run(until, quota=rng.randint(5, 40), drop_after=rng.uniform(0.01, 0.3))
                await asyncio.sleep(rng.uniform(0.01, 0.1))

    async def sessions(self, name: str, rng: random.Random, until: float) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.GeneratorStub(channel)
            n = 0
            while time.monotonic() < until:
                n += 1
                session = Session(self, stub, f"{name}-s{n}", rng)
                await session.run(until, quota=rng.randint(*self.config.session_requests))


class Session:
    """One GenerateStream: a window of requests in flight within the server's credits."""

    def __init__(self, load: Load, stub: Any, name: str, rng: random.Random) -> None:
        self.load = load
        self.ledger = load.ledger
        self.stub = stub
        self.name = name
        self.rng = rng
        self.outstanding: dict[str, Req] = {}
        self.finished: set[str] = set()
        self.credit = 0
        self.granted: int | None = None  # the first message's credit: all of it is back once every request has finished
        self.changed = asyncio.Event()
        self.stream_error: str | None = None

    async def _read(self, call: Any) -> None:
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    return
                if self.granted is None:
                    self.granted = message.credits
                self.credit += message.credits
                for result in message.results:
                    req = self.outstanding.get(result.id)
                    if result.HasField("finish"):
                        if req is None:
                            self.ledger.duplicate(f"{result.id}: a Finish for a request not in flight on {self.name}")
                            continue
                        del self.outstanding[result.id]
                        self.finished.add(result.id)
                        self.ledger.end(req, _code_name(result.finish.code))
                    elif req is None:
                        self.ledger.duplicate(f"{result.id}: output for a request not in flight on {self.name}")
                self.changed.set()
        except grpc.aio.AioRpcError as e:
            self.stream_error = str(e.code().name)
        finally:
            self.changed.set()

    async def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            return False
        return True

    async def run(self, until: float, *, quota: int, drop_after: float | None = None) -> None:
        """Send ``quota`` requests (or until ``until``), then half-close and collect every outcome;
        ``drop_after``: instead, cancel the whole call that long after the first send."""
        config = self.load.config
        call = self.stub.GenerateStream()
        reader = asyncio.create_task(self._read(call), name=f"chaos-read-{self.name}")
        sent = 0
        dropped_at = None
        try:
            if not await self._wait(lambda: self.credit > 0 or reader.done(), 5.0):
                self.load.errors.append(f"{self.name}: no credit from the server within 5 s")
                return
            while time.monotonic() < until and sent < quota and not reader.done():
                if dropped_at is not None and time.monotonic() >= dropped_at:
                    break
                room = min(config.session_window - len(self.outstanding), self.credit, quota - sent)
                if room <= 0:
                    await self._wait(lambda: min(config.session_window - len(self.outstanding), self.credit) > 0 or reader.done(), 0.05)
                    continue
                cancel = []
                if self.outstanding and self.rng.random() < config.session_cancel_p:  # one already sent: the server has it
                    victim = self.rng.choice(list(self.outstanding.values()))
                    victim.probe = "cancel"
                    cancel.append(victim.id)
                batch = []
                for _ in range(min(room, self.rng.randint(1, 8))):
                    sent += 1
                    req, message = self.load.mixed(self.rng, f"{self.name}-{sent}", "GenerateStream")
                    self.outstanding[req.id] = req
                    batch.append(message)
                self.credit -= len(batch)
                try:
                    await call.write(pb.StreamRequest(requests=batch, cancel=cancel))
                except (grpc.aio.AioRpcError, grpc.aio.UsageError):  # the call ended: the reader has its status
                    break
                if drop_after is not None and dropped_at is None:
                    dropped_at = time.monotonic() + drop_after
                await asyncio.sleep(0)
            if drop_after is not None:
                await asyncio.sleep(max(0.0, (dropped_at or 0.0) - time.monotonic()))
                reader.cancel()
                call.cancel()
                for req in self.outstanding.values():
                    req.probe = "cancel"
                    self.ledger.end(req, CLIENT_CANCELLED)
                self.outstanding.clear()
                return
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                await call.done_writing()
            latest = max((r.deadline for r in self.outstanding.values()), default=time.monotonic())
            await self._wait(lambda: reader.done(), max(0.0, latest + config.safety_s - time.monotonic()))
            if reader.done() and self.stream_error is None and not self.outstanding and self.credit != self.granted:
                self.load.errors.append(f"{self.name}: credit {self.credit} at the end, {self.granted} granted")
        finally:
            if not reader.done():
                reader.cancel()
                call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            for req in self.outstanding.values():
                if self.stream_error is not None:
                    self.ledger.end(req, f"STREAM_{self.stream_error}")
                else:
                    self.load.given_up.append(req.id)  # the stream ended (or went quiet) without its Finish: lost


# -- monitors -------------------------------------------------------------------------------------


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def health_of(address: str, service: str = "") -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class Monitor:
    def __init__(self, address: str) -> None:
        self.address = address
        self.rss_peak = rss_mb()
        self.health_samples = 0
        self.not_serving = 0

    async def run(self, until: float) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < until:
                self.rss_peak = max(self.rss_peak, rss_mb())
                self.health_samples += 1
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.aio.AioRpcError:
                    serving = False
                self.not_serving += not serving
                await asyncio.sleep(0.25)


async def one_of_each(address: str, models: dict[str, str]) -> dict[str, str]:
    """A fresh request to every model: the server serves after the chaos."""
    out = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        for model, kind in models.items():
            if kind == "image":
                message = pb.GenerateRequest(model=model, image=pb.ImageParams(n=4, seed=1))
            else:
                message = pb.GenerateRequest(model=model, text=pb.TextParams(prompt="ROMEO:", max_new_tokens=8, seed=1))
            try:
                replies = [m async for m in stub.Generate(message, timeout=10)]
                out[model] = _code_name(replies[-1].finish.code) if replies and replies[-1].HasField("finish") else "NO_FINISH"
            except grpc.aio.AioRpcError as e:
                out[model] = str(e.code().name)
    return out


# -- the run --------------------------------------------------------------------------------------


async def run_chaos(config: ChaosConfig) -> ChaosReport:
    overrides: dict[str, Any] = {
        "models_dir": config.models_dir,
        "threads": config.threads,
        "restart_intensity": 100_000,  # the injected faults must never make the supervisor give up
        "restart_period_s": 1.0,
        "request_timeout_s": 30.0,
        **config.server,
    }
    ledger = Ledger()
    rng = random.Random(config.seed)
    started = time.monotonic()
    async with running_server(**overrides) as server:
        models = {s.name: ("image" if s.images is not None else "text") for s in server.registry.served()}
        post = await one_of_each(server.address, models)  # warm-up: every decode loop and pool thread exists
        if any(v != OK for v in post.values()):
            raise RuntimeError(f"the server does not serve before the chaos: {post}")
        gc.collect()
        rss_start = rss_mb()
        injector = Injector(server, ledger, config, random.Random(rng.getrandbits(64)))
        load = Load(server.address, ledger, config, models)
        monitor = Monitor(server.address)
        until = time.monotonic() + config.duration_s
        client_rng = random.Random(rng.getrandbits(64))

        def seeded() -> random.Random:
            return random.Random(client_rng.getrandbits(64))

        clients: list[Coroutine[Any, Any, None]] = []
        if load.image_models:
            clients += [load.plain(f"img{i}", "image", seeded(), until) for i in range(config.plain_image_clients)]
        if load.text_models:
            clients += [load.plain(f"txt{i}", "text", seeded(), until) for i in range(config.plain_text_clients)]
        clients += [load.sessions(f"ses{i}", seeded(), until) for i in range(config.sessions)]
        clients += [load.deadline_probe(f"ddl{i}", seeded(), until) for i in range(config.deadline_probes)]
        clients += [load.disconnector(f"dis{i}", seeded(), until) for i in range(config.disconnectors)]
        injector.install()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(injector.run(until), name="chaos-injector")
                tg.create_task(monitor.run(until), name="chaos-monitor")
                for i, client in enumerate(clients):
                    tg.create_task(load.guard(client), name=f"chaos-client-{i}")
            await injector.settle()
        finally:
            injector.uninstall()

        drain_started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(config.drain_timeout_s):
                await server.pipeline.wait_idle()
        drain_s = time.monotonic() - drain_started
        inflight_after = len(server.pipeline.inflight)
        leftovers = await _leftovers(server)
        health = {name: await health_of(server.address, name) for name in READINESS_NAMES}
        post = await one_of_each(server.address, models)
        supervisor = server.supervisor
        restarts_metric = sum(
            int(server.metrics.registry.get_sample_value("genserve_stage_restarts_total", {"stage": name}) or 0)
            for name in supervisor.stages
        )
        restarts_supervisor = sum(supervisor.restart_count.values())
        kinds = {name: stage.kind for name, stage in supervisor.stages.items()}
        rss_before_gc = rss_mb()
        gc.collect()  # what only the cyclic collector frees is garbage, not a leak (a failed decode loop is such garbage)
        await asyncio.sleep(0.2)
        rss_end = rss_mb()
    wall = time.monotonic() - started
    return _report(
        config,
        ledger,
        injector,
        load,
        monitor,
        wall=wall,
        drain_s=drain_s,
        inflight_after=inflight_after,
        leftovers=leftovers,
        health=health,
        post=post,
        restarts=(sum(injector.kills.values()), restarts_supervisor, restarts_metric),
        kinds=kinds,
        rss=(rss_start, max(monitor.rss_peak, rss_before_gc, rss_end), rss_before_gc, rss_end),
    )


async def _leftovers(server: GenServer, timeout: float = 3.0) -> list[str]:
    """What is left in the server once no request is in flight: items in links, jobs held by stages,
    sequences in decode loops. Waits up to ``timeout`` for it to clear (stages drop ended jobs lazily)."""
    engine = server.engine
    assert engine is not None
    text = [s for s in server.registry.served() if s.images is None]
    deadline = time.monotonic() + timeout
    while True:
        left = [f"link {name}: {n}" for name, n in server.pipeline.link_depths().items() if n]
        for stage in server.supervisor.stages.values():
            held = len(list(stage.holding()))
            if held:
                left.append(f"stage {stage.name} holds {held} jobs")
        for served in text:
            loop = engine.text_worker(served).loop
            if loop.has_work:
                left.append(f"decode loop {served.name}: {loop.active_count} active, {loop.pending_count} waiting")
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.05)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _classify(ledger: Ledger, faults: list[Fault]) -> None:
    reqs = ledger.reqs
    for fault in faults:
        if fault.window:
            continue
        for id in fault.ids:
            req = reqs.get(id)
            if req is not None:
                req.touched.add(fault.kind)
    windows = [f for f in faults if f.window]
    if windows:
        for req in reqs.values():
            if req.kind != "text":
                continue
            ended = req.ended if req.ended is not None else float("inf")
            for f in windows:
                end = f.end if f.end is not None else float("inf")
                if req.sent <= end and ended >= f.start:
                    req.touched.add(f.kind)
                    break


def _report(
    config: ChaosConfig,
    ledger: Ledger,
    injector: Injector,
    load: Load,
    monitor: Monitor,
    *,
    wall: float,
    drain_s: float,
    inflight_after: int,
    leftovers: list[str],
    health: dict[str, str],
    post: dict[str, str],
    restarts: tuple[int, int, int],
    kinds: dict[str, str],
    rss: tuple[float, float, float, float],
) -> ChaosReport:
    _classify(ledger, injector.faults)
    reqs = list(ledger.reqs.values())
    failed: collections.Counter[str] = collections.Counter()
    sent_by: collections.Counter[str] = collections.Counter()
    probes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    touched_outcomes: collections.Counter[str] = collections.Counter()
    untouched_failures: collections.Counter[str] = collections.Counter()
    untouched_examples: list[str] = []
    late_examples: list[str] = []
    lost_examples: list[str] = []
    admission: list[float] = []
    touched_by: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    completed = lost = late = late_client = untouched = untouched_ok = touched = 0
    worst = -math.inf
    for r in reqs:
        sent_by[f"{r.rpc} {r.kind}"] += 1
        outcome = r.outcome or "LOST"
        if r.outcome is None:
            lost += 1
            if len(lost_examples) < 5:
                lost_examples.append(f"{r.id} ({r.rpc} {r.model}, timeout {r.deadline - r.sent:.3f} s)")
        elif r.outcome == OK:
            completed += 1
        else:
            failed[r.outcome] += 1
        if r.admitted is not None:
            admission.append(r.admitted - r.sent)
        if r.ended is not None:
            worst = max(worst, r.ended - r.due)
            late_client += r.ended > r.deadline + config.late_tolerance_s
        if r.ended is None or r.ended > r.due + config.late_tolerance_s:
            late += 1
            if len(late_examples) < 5:
                past = "never" if r.ended is None else f"{r.ended - r.due:+.3f} s"
                admitted = "never admitted" if r.admitted is None else f"admitted {r.admitted - r.sent:.3f} s after it was sent"
                late_examples.append(f"{r.id} ({r.rpc} {r.model}, {outcome}) ended {past} past its deadline; {admitted}")
        if r.probe:
            probes[r.probe][outcome] += 1
        elif r.touched:
            touched += 1
            touched_outcomes[outcome] += 1
            touched_by["+".join(sorted(r.touched))][outcome] += 1
        else:
            untouched += 1
            if outcome == OK:
                untouched_ok += 1
            else:
                untouched_failures[outcome] += 1
                if len(untouched_examples) < 5:
                    untouched_examples.append(f"{r.id} ({r.rpc} {r.model}) {outcome} after {((r.ended or r.deadline) - r.sent):.3f} s")
    success = untouched_ok / untouched if untouched else 0.0
    faults = collections.Counter(f.kind for f in injector.faults)
    injected, by_supervisor, by_metric = restarts
    rss_start, rss_peak, rss_before_gc, rss_end = rss
    killed_kinds = {kinds[name] for name in injector.kills}
    missing = sorted(set(kinds.values()) - killed_kinds)
    if injector.text_models and not faults["decode-step"]:
        missing.append(DECODE_LOOP)
    checks = [
        Check("lost == 0", lost == 0, f"{lost} lost" + (f": {', '.join(lost_examples)}" if lost_examples else "")),
        Check("one outcome each", ledger.duplicates == 0, f"{ledger.duplicates} duplicates {ledger.duplicate_examples}"),
        Check("none past its deadline", late == 0, f"{late} later than deadline + {config.late_tolerance_s:g} s {late_examples}"),
        Check(
            f"untouched success >= {config.min_untouched_success:.0%}",
            untouched > 0 and success >= config.min_untouched_success,
            f"{untouched_ok}/{untouched} = {success:.4%} {dict(untouched_failures)} {untouched_examples}",
        ),
        Check(
            "restarts match the metric",
            injected == by_supervisor == by_metric,
            f"injected {injected}, supervisor {by_supervisor}, genserve_stage_restarts_total {by_metric}",
        ),
        Check("every stage kind faulted", not missing, f"never faulted: {missing}" if missing else "all"),
        Check("image faults fired", not injector.image_models or (faults["forward-error"] > 0 and faults["stall"] > 0), str(dict(faults))),
        Check("drained", inflight_after == 0, f"{inflight_after} in flight {drain_s:.2f} s after the load"),
        Check("nothing left behind", not leftovers, "; ".join(leftovers) or "links empty, stages hold nothing, decode loops idle"),
        Check(
            "clients saw no protocol error", not load.errors, "; ".join(load.errors[:5]) or "credits all returned on every closed stream"
        ),
        Check("health SERVING", all(v == "SERVING" for v in health.values()), str(health)),
        Check("serves after", all(v == OK for v in post.values()), str(post)),
        Check(
            f"memory within {config.memory_bound_mb:g} MB",
            rss_end <= rss_start + config.memory_bound_mb,
            f"start {rss_start:.0f} MB, peak {rss_peak:.0f} MB, end {rss_end:.0f} MB",
        ),
    ]
    return ChaosReport(
        seed=config.seed,
        duration_s=config.duration_s,
        wall_s=wall,
        sent=len(reqs),
        completed=completed,
        failed=dict(failed.most_common()),
        lost=lost,
        duplicates=ledger.duplicates,
        late=late,
        late_examples=late_examples,
        late_by_client_clock=late_client,
        worst_past_deadline_ms=1000 * worst if reqs else 0.0,
        admission_delay_ms={
            "p50": 1000 * _quantile(admission, 0.5),
            "p99": 1000 * _quantile(admission, 0.99),
            "max": 1000 * max(admission, default=0.0),
        },
        lost_examples=lost_examples,
        sent_by_call=dict(sorted(sent_by.items())),
        probes={k: dict(v.most_common()) for k, v in sorted(probes.items())},
        touched=touched,
        touched_outcomes=dict(touched_outcomes.most_common()),
        touched_by_fault={k: dict(v.most_common()) for k, v in sorted(touched_by.items())},
        untouched=untouched,
        untouched_ok=untouched_ok,
        untouched_success=success,
        untouched_failures=dict(untouched_failures.most_common()),
        untouched_failure_examples=untouched_examples,
        faults=dict(sorted(faults.items())),
        kills_by_stage=dict(sorted(injector.kills.items())),
        kills_skipped=injector.kills_skipped,
        restarts_injected=injected,
        restarts_supervisor=by_supervisor,
        restarts_metric=by_metric,
        health_after=",".join(f"{k or '(server)'}={v}" for k, v in health.items()),
        health_not_serving_samples=monitor.not_serving,
        health_samples=monitor.health_samples,
        inflight_after=inflight_after,
        leftovers=leftovers,
        drain_s=drain_s,
        post_chaos=post,
        rss_start_mb=rss_start,
        rss_peak_mb=rss_peak,
        rss_end_before_gc_mb=rss_before_gc,
        rss_end_mb=rss_end,
        checks=checks,
    )


def format_report(r: ChaosReport) -> str:
    def counts(d: dict[str, int] | dict[str, str]) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"

    rows = [
        ("duration", f"{r.duration_s:g} s of chaos, {r.wall_s:.1f} s in all (seed {r.seed})"),
        ("requests sent", f"{r.sent}  ({counts(r.sent_by_call)})"),
        ("completed (OK)", str(r.completed)),
        ("failed, by status", counts(r.failed)),
        ("lost", str(r.lost)),
        ("duplicate outcomes", str(r.duplicates)),
        (
            "past deadline",
            f"{r.late}; latest {r.worst_past_deadline_ms:+.0f} ms from its deadline; from the send: {r.late_by_client_clock} late",
        ),
        ("admission delay", ", ".join(f"{k} {v:.1f} ms" for k, v in r.admission_delay_ms.items())),
        ("deadline probes", counts(r.probes.get("deadline", {}))),
        ("cancelled by client", counts(r.probes.get("cancel", {}))),
        ("touched by a fault", f"{r.touched}: {counts(r.touched_outcomes)}"),
        *((f"  by {kind}", counts(outcomes)) for kind, outcomes in r.touched_by_fault.items()),
        ("untouched succeeded", f"{r.untouched_ok}/{r.untouched} = {r.untouched_success:.3%}  failures: {counts(r.untouched_failures)}"),
        ("faults injected", counts(r.faults)),
        ("kills by stage", f"{counts(r.kills_by_stage)} (skipped: {r.kills_skipped})"),
        ("stages restarted", f"injected {r.restarts_injected}, supervisor {r.restarts_supervisor}, metric {r.restarts_metric}"),
        ("health", f"after: {r.health_after}; during: {r.health_samples - r.health_not_serving_samples}/{r.health_samples} SERVING"),
        ("drain", f"{r.inflight_after} in flight after {r.drain_s:.2f} s; then {counts(r.post_chaos)}"),
        (
            "memory (RSS)",
            f"start {r.rss_start_mb:.0f} MB, peak {r.rss_peak_mb:.0f} MB, "
            f"end {r.rss_end_before_gc_mb:.0f} MB, {r.rss_end_mb:.0f} MB after gc.collect()",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines += [f"{'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}" for c in r.checks]
    lines.append("chaos: " + ("every check passed" if r.ok else "FAILED"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.chaos",
        description="Run a genserve server in this process under mixed load (images and text, Generate and GenerateStream, "
        "many clients) while injecting faults: stage kills, decode-loop and forward-pass failures, stalled batches, "
        "clients that disconnect, deadlines that expire while queued. Print the books; exit 1 if an invariant fails.",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load and fault injection")
    parser.add_argument("--seed", type=int, default=0, help="seeds the fault schedule and the clients' requests")
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here, as JSON")
    parser.add_argument("--log-level", default="critical", help="the server's log level (its injected failures log tracebacks)")
    args = parser.parse_args(argv)
    configure_logging("console", args.log_level)
    report = asyncio.run(run_chaos(ChaosConfig(duration_s=args.duration, seed=args.seed, models_dir=args.models_dir)))
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
