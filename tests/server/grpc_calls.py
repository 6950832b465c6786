"""Calls to a real server over a localhost gRPC channel, for the tests that run one: requests, their
answers, bounded waits."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from tests.decode_spy import StepSpy

MODELS = "models"  # the bundled vae, gan and transformer


def image(model: str = "vae", n: int = 1, seed: int | None = 0, labels: list[int] | None = None, **kw: object) -> pb.GenerateRequest:
    params = pb.ImageParams(n=n, labels=labels or [])
    if seed is not None:
        params.seed = seed
    return pb.GenerateRequest(model=model, image=params, **kw)  # type: ignore[arg-type]


def text(prompt: str = "ROMEO:", max_new_tokens: int = 8, seed: int = 0, **params: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="transformer", text=pb.TextParams(prompt=prompt, max_new_tokens=max_new_tokens, seed=seed, **params))  # type: ignore[arg-type]


async def collect(stub: pb_grpc.GeneratorStub, request: pb.GenerateRequest, **kw: object) -> list[pb.GenerateResponse]:
    return [m async for m in stub.Generate(request, **kw)]


async def status_of(stub: pb_grpc.GeneratorStub, request: pb.GenerateRequest, **kw: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub, request, **kw)
    return info.value.code(), info.value.details() or ""


def pixels(messages: list[pb.GenerateResponse]) -> np.ndarray:
    chunks = sorted((m.images for m in messages if m.HasField("images")), key=lambda c: c.offset)
    return np.concatenate([np.frombuffer(c.pixels, np.uint8).reshape(c.count, c.height, c.width) for c in chunks])


async def read_rest(call: grpc.aio.UnaryStreamCall) -> list[pb.GenerateResponse]:
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


async def wait_until(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def assert_cancelled(spy: StepSpy, seed: int) -> None:
    """The sequence left the loop at a step, long before its 512 tokens (a no-op cancel ends in "length")."""
    last = await spy.wait_final(seed)
    assert last.finish_reason == "cancelled" and last.n_generated < 512
    await wait_until(lambda: spy.loop.active_count == 0)
