"""One server per test module on the bundled models (its own event loop's), a stub for it, and a
watch on its decode loop."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest_asyncio

from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.runtime.app import GenServer
from tests.decode_spy import StepSpy
from tests.server.grpc_calls import MODELS
from tests.serving import running_server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> AsyncIterator[GenServer]:
    async with running_server(models_dir=MODELS, batch_size=128, stream_credits=16, max_new_tokens=512) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def spy(server: GenServer) -> AsyncIterator[StepSpy]:
    """The module server's transformer decode loop, watched (and pausable) for one test."""
    assert server.engine is not None
    watch = StepSpy(server.engine.decode_thread(server.registry.get("transformer")).loop)
    yield watch
    watch.restore()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stub(server: GenServer) -> AsyncIterator[pb_grpc.GeneratorStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield pb_grpc.GeneratorStub(channel)
