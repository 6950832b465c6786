"""The faults: stage kills (``Supervisor.kill``) and, through the engine's one fault seam
(``engine/faults.py``), failed forward passes, stalled batches and failed decode steps."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.faults import Faults
from engine.images import ImageChunk
from engine.registry import ServedModel
from server.pipeline.jobs import Job
from server.runtime.app import GenServer
from tests.chaos.config import DECODE_LOOP, ChaosConfig
from tests.chaos.ledger import Ledger


@dataclass
class Fault:
    kind: str  # kill, decode-step, forward-error, stall
    target: str  # stage name or model
    start: float
    end: float | None = None
    ids: list[str] = field(default_factory=list)  # exact victims (kill, forward-error, stall)
    window: bool = False  # decode-step: the target model's requests in flight during [start, end] are touched


class Injector(Faults):
    """Injects the faults; records each one with its victims. Stage kills go through
    ``Supervisor.kill``; the rest through the engine's fault seam, which it is."""

    def __init__(self, server: GenServer, config: ChaosConfig, rng: random.Random) -> None:
        self.server = server
        self.config = config
        self.rng = rng
        self.faults: list[Fault] = []
        # request id -> (admitted, the server's deadline), both on time.monotonic(); the ledger lives in
        # the load's process, so these notes are merged into it after the run (``note_admissions``)
        self.admissions: dict[str, tuple[float, float]] = {}
        self.kills: collections.Counter[str] = collections.Counter()
        self.kills_skipped = 0
        self._lock = threading.Lock()  # forward-pass arming is read on engine threads
        self._armed_errors: collections.Counter[str] = collections.Counter()
        self._armed_stalls: collections.Counter[str] = collections.Counter()
        self._stalling: set[str] = set()
        self._armed_steps: dict[str, threading.Event] = {}  # model -> set when its armed decode step fired
        self._watchers: set[asyncio.Task[None]] = set()
        self._decode_pending: set[str] = set()
        self.image_models = [s for s in server.registry.served() if s.images is not None]  # one-shot: batcher faults
        self.text_models = [s for s in server.registry.served() if s.images is None]  # text and iterative: decode-step faults

    # the engine's fault seam (engine/faults.py), and the admission note -------------------------

    def install(self) -> None:
        engine = self.server.engine
        engine.install_faults(self)
        pipeline = self.server.pipeline
        admit = type(pipeline).admit

        def admit_and_note(job: Job, timeout: float | None) -> None:  # the handlers call pipeline.admit: note what it let in
            admit(pipeline, job, timeout)
            self._note_admission(job)

        pipeline.admit = admit_and_note  # type: ignore[method-assign]

    def uninstall(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
        engine = self.server.engine
        engine.install_faults(None)
        vars(self.server.pipeline).pop("admit", None)  # the class's own again

    def _note_admission(self, job: Job) -> None:  # not a fault: notes when the server admitted a request
        now = time.monotonic()
        self.admissions[job.id] = (now, now + (job.deadline - asyncio.get_running_loop().time()))

    def note_admissions(self, ledger: Ledger) -> None:
        """Write the admissions noted here into the load's books (time.monotonic() is one clock for both processes)."""
        for id, (admitted, deadline) in self.admissions.items():
            req = ledger.reqs.get(id)
            if req is not None:
                req.admitted, req.server_deadline = admitted, deadline

    async def before_image_batch(self, served: ServedModel, chunks: Sequence[ImageChunk]) -> None:
        if self._armed_stalls[served.name] and served.name not in self._stalling:
            self._armed_stalls[served.name] -= 1
            await self._stall(served.name, chunks)

    def before_forward(self, served: ServedModel, chunks: Sequence[ImageChunk]) -> None:  # engine thread, or inline on the loop
        name = served.name
        with self._lock:
            fail = self._armed_errors[name] > 0
            if fail:
                self._armed_errors[name] -= 1
        if fail:
            now = time.monotonic()
            self.faults.append(Fault("forward-error", name, now, now, [c.request.request_id for c in chunks]))
            raise RuntimeError(f"chaos: injected failure in the forward pass of {name}")

    def before_decode_step(self, served: ServedModel) -> None:  # the decode thread
        with self._lock:
            armed = self._armed_steps.pop(served.name, None)
        if armed is not None:
            armed.set()
            raise RuntimeError(f"chaos: injected failure in a decode step of {served.name}")

    async def _stall(self, model: str, chunks: Sequence[ImageChunk]) -> None:
        """Hold this batch past the latest deadline of its requests."""
        now = time.monotonic()
        ids = [c.request.request_id for c in chunks]
        deadlines = [self.admissions[i][1] for i in ids if i in self.admissions]
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
        worker = engine.decode_thread(self.server.registry.get(model))
        fired = threading.Event()
        fault = Fault("decode-step", model, time.monotonic(), window=True)
        self.faults.append(fault)
        with self._lock:
            self._armed_steps[model] = fired  # the next step of this model's decode loop raises
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
                    with self._lock:
                        self._armed_steps.pop(model, None)

        task = asyncio.create_task(watch(), name=f"chaos-watch-{model}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def settle(self) -> None:
        """Let pending decode faults close their windows (or give up on them: no text work came)."""
        if self._watchers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.gather(*self._watchers, return_exceptions=True)
