"""After faults, the big buffers go with their work, by reference counting alone (issue 16).

One burst of injected faults against a real server, with the cyclic collector disabled: a failed
forward pass, a stalled batch whose batcher is killed, a failed decode step. Then the objects that
held the big buffers (the jobs and their call queues, the image chunks and their latents, the failed
decode loop and its KV cache) must be gone: weak references to them are dead. Each one was found
alive in a reference cycle before (gc.DEBUG_SAVEALL after a chaos run): grpc's AbortError cycle
holding the Generate handler's frame, anyio's cancelled-task cycle holding a killed batch's frames,
a failed worker's decode loop kept by the jobs that still referred to the worker.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc
import pytest
import pytest_asyncio

from engine.decode import DecodeBatch
from engine.faults import Faults
from engine.images import ImageChunk
from engine.logs import configure_logging
from engine.registry import ServedModel
from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.pipeline.jobs import Job
from server.runtime.app import GenServer
from tests.serving import running_server


class FaultBurst(Faults):
    """Arms one fault of each kind; keeps only weak references to what it sees."""

    def __init__(self) -> None:
        self.fail_forward = False
        self.stall = False
        self.fail_step = False
        self.stalled = asyncio.Event()
        self.seen: list[weakref.ref[Any]] = []  # chunks and their latents

    def _see(self, chunks: Sequence[ImageChunk]) -> None:
        self.seen += [weakref.ref(x) for c in chunks for x in (c, c.z) if x is not None]  # z: None until drawn in the batch

    async def before_image_batch(self, served: ServedModel, chunks: Sequence[ImageChunk]) -> None:
        self._see(chunks)
        if self.stall:
            self.stall = False
            self.stalled.set()
            await asyncio.Event().wait()  # until the batcher is killed

    def before_forward(self, served: ServedModel, chunks: Sequence[ImageChunk]) -> None:
        if self.fail_forward:
            self.fail_forward = False
            raise RuntimeError("injected forward failure")

    def before_decode_step(self, served: ServedModel) -> None:
        if self.fail_step:
            self.fail_step = False
            raise RuntimeError("injected decode step failure")


@pytest.fixture
def collector_off() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@pytest_asyncio.fixture
async def server() -> AsyncIterator[GenServer]:
    configure_logging("console", "critical")  # the injected failures log tracebacks
    async with running_server(models_dir="models") as srv:
        yield srv


async def _call(stub: Any, request: pb.GenerateRequest) -> grpc.StatusCode:
    try:
        async for _ in stub.Generate(request, timeout=30):
            pass
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def _until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(2000):  # a bounded poll: 10 s at most
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting until {what}")


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_after_a_burst_of_faults_the_big_buffers_are_freed_without_the_collector(
    server: GenServer, collector_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    faults = FaultBurst()
    jobs: list[weakref.ref[Any]] = []

    def admitted(job: Job) -> None:
        jobs.extend([weakref.ref(job), weakref.ref(job.recipient)])  # its call queue holds the pending results

    loop_threads: list[str] = []
    from_loaded = DecodeBatch.from_loaded

    def recording_from_loaded(*args: Any, **kwargs: Any) -> DecodeBatch:  # where KV caches are allocated
        loop_threads.append(threading.current_thread().name)
        return from_loaded(*args, **kwargs)

    monkeypatch.setattr(DecodeBatch, "from_loaded", staticmethod(recording_from_loaded))
    server.engine.install_faults(faults)
    admit = type(server.pipeline).admit

    def admit_and_note(job: Job, timeout: float | None) -> None:
        admit(server.pipeline, job, timeout)
        admitted(job)

    server.pipeline.admit = admit_and_note  # type: ignore[method-assign]
    transformer = server.registry.get("transformer")
    failing = server.engine.decode_thread(transformer)
    failing_loop = weakref.ref(failing.loop)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.GeneratorStub(channel)
            image = pb.GenerateRequest(model="vae", image=pb.ImageParams(n=64, seed=1, want_float=True))

            faults.fail_forward = True
            assert await _call(stub, image) == grpc.StatusCode.UNAVAILABLE

            faults.stall = True
            stalled = asyncio.create_task(_call(stub, image))
            await faults.stalled.wait()
            server.supervisor.kill("batcher-vae")
            assert await stalled == grpc.StatusCode.UNAVAILABLE

            faults.fail_step = True
            text = pb.GenerateRequest(model="transformer", text=pb.TextParams(prompt="ROMEO:", max_new_tokens=50, seed=1))
            assert await _call(stub, text) == grpc.StatusCode.UNAVAILABLE
            assert failing.failed is not None
            await _until(lambda: server.engine.decode_thread(transformer) is not failing, "the failed decode loop is replaced")
            assert await _call(stub, text) == grpc.StatusCode.OK  # the replacement serves
    finally:
        server.engine.install_faults(None)
        vars(server.pipeline).pop("admit", None)
    await server.pipeline.wait_idle()
    await asyncio.sleep(0)  # let the handlers' last callbacks run

    assert failing_loop() is None, "the failed worker (still referenced here, as by a job) keeps its KV cache"
    assert loop_threads and all(name.startswith("decode-") for name in loop_threads), (
        f"a replacement decode loop was allocated on {loop_threads}, not on the failed loop's own thread"
    )
    assert len(jobs) == 8 and len(faults.seen) >= 2  # the chunks (their latents are drawn inside the engine's batch)
    refs = [*jobs, *faults.seen]

    def alive() -> list[str]:
        return [type(o).__name__ for o in (ref() for ref in refs) if o is not None]

    # a bounded wait, not a timed one: the decode thread may still be returning from its last
    # delivery (its frame holds the last listeners) as the call ends; a cycle never lets go
    for _ in range(400):
        if not alive():
            break
        await asyncio.sleep(0.005)
    assert not alive(), f"still alive with the collector off: {alive()}"
