"""The SDK's blocking Client and session (clients/_sync.py), on their own loop thread, against a
scriptable in-process server: every call, and cancels that reach the server and wake waiters."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable

import pytest

from clients import (
    Client,
    ModelNotFound,
    TextResult,
)
from tests.clients.fake_server import fake_server

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


async def test_sync_client_and_session() -> None:
    async with fake_server(credits=2) as (address, fake):

        def use() -> None:
            with Client(address, token="t") as client:
                assert [m.name for m in client.list_models()] == ["vae", "transformer"]
                assert client.generate_images("vae", 4, labels=3).shape == (4, 28, 28)
                pieces = client.stream_text("transformer", "abcdef", max_new_tokens=6)
                assert next(pieces) == "a"
                pieces.close()  # leaving early cancels the call
                assert client.generate_text("transformer", "xyz") == "xyz"
                with client.session() as s:
                    futures = [s.submit_images("vae", 1, seed=i) for i in range(5)] + [s.submit_text("transformer", "ab")]
                    results = list(s.results())
                assert len(results) == 6 and all(f.done() for f in futures)
                assert isinstance(futures[-1].result(), TextResult)
                with pytest.raises(ModelNotFound):
                    client.generate_images("nope", 1)

        await asyncio.to_thread(use)
        assert fake.max_in_flight <= 2 and fake.overdrawn == 0
        assert fake.metadata[0]["authorization"] == "Bearer t"


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """A bounded poll for synchronous code on a thread (``until`` is its async twin)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


async def test_sync_session_future_cancel_reaches_the_server() -> None:
    async with fake_server() as (address, fake):
        fake.gate.clear()

        def use() -> None:
            with Client(address) as client, client.session() as s:
                future = s.submit_images("vae", 1, id="c")
                assert future.cancel()
                with pytest.raises(concurrent.futures.CancelledError):
                    future.result()
                # while the session is open: closing it would end the stream, and so the request, anyway
                wait_for(lambda: any("c" in m.cancel for m in fake.messages) and fake.in_flight == 0)

        await asyncio.to_thread(use)
        assert fake.cancelled == ["c"]


async def test_sync_cancel_wakes_waiters() -> None:
    """concurrent.futures.wait returns for a cancelled session future, however it was cancelled."""
    async with fake_server() as (address, fake):
        fake.gate.clear()

        def use() -> None:
            with Client(address) as client, client.session() as s:
                future = s.submit_images("vae", 1)
                other = s.submit_images("vae", 1)
                s.cancel(other)
                threading.Timer(0.05, future.cancel).start()
                done, _ = concurrent.futures.wait([future, other], timeout=5)
                assert len(done) == 2 and future.cancelled() and other.cancelled()

        await asyncio.to_thread(use)
