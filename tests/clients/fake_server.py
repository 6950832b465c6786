"""A small scriptable in-process Generator server for the SDK's tests (no models, no engine).

Images: sample i of a request is filled with the value (i % 250) + 1, and comes in chunks of
``chunk`` samples, last chunk first (so clients must honour ``offset``). Text: the prompt's
characters echoed back one per token, up to ``max_new_tokens`` (default 8).
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc

MODELS = [
    pb.ModelInfo(
        name="vae",
        version=1,
        kind="vae",
        summary="fake",
        parameters=10,
        device="cpu",
        latest=True,
        image=pb.ImageAccepts(max_n=1024, image_size=28, latent_dim=20),
    ),
    pb.ModelInfo(
        name="transformer",
        version=2,
        kind="char-transformer",
        parameters=20,
        device="cpu",
        latest=True,
        text=pb.TextAccepts(vocab="abc", context_window=128, max_new_tokens=1024),
    ),
]


def sample_value(i: int) -> int:
    return i % 250 + 1


def finish(request: pb.GenerateRequest, n: int, reason: pb.FinishReason) -> pb.GenerateResponse:
    seed = request.image.seed if request.HasField("image") else request.text.seed
    return pb.GenerateResponse(
        id=request.id, finish=pb.Finish(reason=reason, code=0, seed=seed, model=request.model, version=1, n_generated=n)
    )


class FakeGenerator(pb_grpc.GeneratorServicer):
    def __init__(self, *, credits: int = 4, chunk: int = 3) -> None:
        self.credits = credits
        self.chunk = chunk
        self.calls: collections.Counter[str] = collections.Counter()  # rpc name -> calls (retries included)
        self.metadata: list[dict[str, str]] = []
        self.deadlines: list[float | None] = []
        self.refuse: collections.deque[grpc.StatusCode] = collections.deque()  # next calls aborted with these
        self.after_first_chunk: grpc.StatusCode | None = None  # Generate: abort after one chunk
        self.token: str | None = None  # when set, calls without "Bearer <token>" are refused
        self.gate = asyncio.Event()  # stream requests wait for it (set: no waiting)
        self.gate.set()
        self.text_delay = 0.0  # seconds between text tokens
        self.text_gate = asyncio.Event()  # text tokens past the first ``text_gate_after`` wait for it (set: no waiting)
        self.text_gate.set()
        self.text_gate_after = 0
        # GenerateStream bookkeeping
        self.messages: list[pb.StreamRequest] = []
        self.cancelled: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.overdrawn = 0  # requests that arrived without credit
        self.refuse_ids: dict[str, grpc.StatusCode] = {}  # stream ids refused (once) with this code
        self.end_stream = asyncio.Event()  # set: the server ends every stream at once

    async def _check(self, name: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[name] += 1
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        self.metadata.append(metadata)
        self.deadlines.append(context.time_remaining())  # seconds left of the call's deadline (None: no deadline)
        if self.token is not None and metadata.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if self.refuse:
            await context.abort(self.refuse.popleft(), "refused by the fake")

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        await self._check("ListModels", context)
        return pb.ListModelsResponse(models=MODELS)

    async def respond(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        if request.HasField("image"):
            n = request.image.n
            starts = list(range(0, n, self.chunk))[::-1]
            for start in starts:
                count = min(self.chunk, n - start)
                pixels = np.concatenate([np.full((1, 28, 28), sample_value(i), np.uint8) for i in range(start, start + count)])
                floats = (pixels.astype("<f4") / 255).tobytes() if request.image.want_float else b""
                labels = list(request.image.labels) * count if len(request.image.labels) == 1 else []
                images = pb.Images(offset=start, count=count, height=28, width=28, pixels=pixels.tobytes(), floats=floats, labels=labels)
                yield pb.GenerateResponse(id=request.id, images=images)
            yield finish(request, n, pb.FINISH_REASON_COMPLETE)
        else:
            text = request.text.prompt[: request.text.max_new_tokens if request.text.HasField("max_new_tokens") else 8]
            for i, ch in enumerate(text):
                if self.text_delay:
                    await asyncio.sleep(self.text_delay)
                if i >= self.text_gate_after:
                    await self.text_gate.wait()
                yield pb.GenerateResponse(id=request.id, text=pb.Text(text=ch, n_generated=i + 1))
            yield finish(request, len(text), pb.FINISH_REASON_LENGTH)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        await self._check("Generate", context)
        if request.model not in ("vae", "transformer"):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model named {request.model!r}")
        sent = 0
        async for response in self.respond(request):
            if sent and self.after_first_chunk is not None:
                await context.abort(self.after_first_chunk, "failed after a chunk")
            sent += 1
            yield response

    async def GenerateStream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        await self._check("GenerateStream", context)
        out: asyncio.Queue[pb.StreamResponse | None] = asyncio.Queue()
        credit = self.credits
        tasks: dict[str, asyncio.Task[None]] = {}

        async def serve(request: pb.GenerateRequest) -> None:
            results: list[pb.GenerateResponse] = []
            try:
                await self.gate.wait()
                code = self.refuse_ids.pop(request.id, None)
                if code is not None:
                    results.append(pb.GenerateResponse(id=request.id, finish=pb.Finish(code=code.value[0], message="refused by the fake")))
                elif request.model not in ("vae", "transformer"):
                    message = f"no model named {request.model!r}"
                    results.append(
                        pb.GenerateResponse(id=request.id, finish=pb.Finish(code=grpc.StatusCode.NOT_FOUND.value[0], message=message))
                    )
                else:
                    results.extend([r async for r in self.respond(request)])
            except asyncio.CancelledError:
                self.cancelled.append(request.id)
                results.append(pb.GenerateResponse(id=request.id, finish=pb.Finish(code=grpc.StatusCode.CANCELLED.value[0])))
            self.in_flight -= 1
            del tasks[request.id]
            out.put_nowait(pb.StreamResponse(results=results, credits=1))

        async def read() -> None:
            nonlocal credit
            async for message in request_iterator:
                self.messages.append(message)
                for rid in message.cancel:
                    if rid in tasks:
                        tasks[rid].cancel()
                for request in message.requests:
                    if credit <= 0:
                        self.overdrawn += 1
                        refusal = pb.Finish(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="no credit")
                        out.put_nowait(pb.StreamResponse(results=[pb.GenerateResponse(id=request.id, finish=refusal)]))
                        continue
                    credit -= 1
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                    tasks[request.id] = asyncio.create_task(serve(request))
            while tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)
            out.put_nowait(None)

        reader = asyncio.create_task(read())
        ender = asyncio.create_task(self.end_stream.wait())
        try:
            yield pb.StreamResponse(credits=credit)
            while True:
                getter = asyncio.create_task(out.get())
                await asyncio.wait([getter, ender], return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return
                message = getter.result()
                if message is None:
                    return
                credit += message.credits
                yield message
        finally:
            reader.cancel()
            ender.cancel()
            for task in list(tasks.values()):
                task.cancel()


@asynccontextmanager
async def fake_server(
    servicer: FakeGenerator | None = None, *, tls: grpc.ServerCredentials | None = None, **kwargs: Any
) -> AsyncIterator[tuple[str, FakeGenerator]]:
    """A started fake on 127.0.0.1 (a free port), with TLS when given credentials; yields its address and servicer."""
    servicer = servicer or FakeGenerator(**kwargs)
    server = grpc.aio.server()
    pb_grpc.add_GeneratorServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", tls) if tls else server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(None)


def self_signed(folder: Path) -> tuple[bytes, bytes]:
    """A certificate (and its key) for localhost and 127.0.0.1, made by the openssl command."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    names = "subjectAltName=DNS:localhost,IP:127.0.0.1"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]
    subprocess.run(
        [*command, "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost", "-addext", names], check=True, capture_output=True
    )
    return cert.read_bytes(), key.read_bytes()


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition another task or thread makes true (polls every 5 ms)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)
