"""The load: raw grpc.aio clients (plain calls, streams, deadline probes, disconnectors); every request is booked."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from tests.chaos.config import CLIENT_CANCELLED, ChaosConfig, Rpc
from tests.chaos.ledger import Ledger, Req, code_name

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

    def clients(self, client_rng: random.Random, until: float) -> list[Coroutine[Any, Any, None]]:
        """Every client of a run, each with its own generator drawn from ``client_rng`` (in this order: the seed decides)."""

        def seeded() -> random.Random:
            return random.Random(client_rng.getrandbits(64))

        config = self.config
        clients: list[Coroutine[Any, Any, None]] = []
        if self.image_models:
            clients += [self.plain(f"img{i}", "image", seeded(), until) for i in range(config.plain_image_clients)]
        if self.text_models:
            clients += [self.plain(f"txt{i}", "text", seeded(), until) for i in range(config.plain_text_clients)]
        clients += [self.sessions(f"ses{i}", seeded(), until) for i in range(config.sessions)]
        clients += [self.deadline_probe(f"ddl{i}", seeded(), until) for i in range(config.deadline_probes)]
        clients += [self.disconnector(f"dis{i}", seeded(), until) for i in range(config.disconnectors)]
        return clients

    async def run(self, client_seed: int, until: float) -> None:
        """Run every client until ``until`` (time.monotonic()) and each has its outcomes."""
        async with asyncio.TaskGroup() as tg:
            for i, client in enumerate(self.clients(random.Random(client_seed), until)):
                tg.create_task(self.guard(client), name=f"chaos-client-{i}")

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
                self.ledger.end(req, code_name(finish.code))
            self.ledger.end(req, str(e.code().name))
            return
        except TimeoutError:
            call.cancel()
            self.given_up.append(req.id)
            return
        if finish is None:
            self.ledger.end(req, "NO_FINISH")  # the call ended OK without its Finish: a protocol error, counted as failed
        else:
            self.ledger.end(req, code_name(finish.code))

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
                        self.ledger.end(req, code_name(result.finish.code))
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
