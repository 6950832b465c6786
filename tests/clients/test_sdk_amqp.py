"""The SDK's AmqpClient without a broker: deadlines a request can carry, and replies that come twice or late."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from clients import (
    AsyncAmqpClient,
    DeadlineExceeded,
)
from clients._amqp import _with_timeout
from genserve.v1 import generator_pb2 as pb

pytestmark = pytest.mark.timeout(180)

URL = "amqp://guest:guest@127.0.0.1:5672/"


async def wait_until(condition: object, what: str, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.05)
    assert condition(), what  # type: ignore[operator]


@pytest.mark.asyncio
async def test_the_client_keeps_the_first_reply_of_each_request() -> None:
    """At-least-once: a redelivered request's second reply, or a late one, is dropped."""
    client = AsyncAmqpClient(URL)
    first = asyncio.get_running_loop().create_future()
    client._waiting["r1"] = first
    reply = SimpleNamespace(correlation_id="r1", body=b"first")
    await client._on_reply(reply)  # type: ignore[arg-type]
    await client._on_reply(SimpleNamespace(correlation_id="r1", body=b"second"))  # type: ignore[arg-type]
    await client._on_reply(SimpleNamespace(correlation_id="unknown", body=b""))  # type: ignore[arg-type]
    assert first.result() == b"first" and client.duplicates == 2 and client.late == 0


@pytest.mark.asyncio
async def test_a_reply_to_a_request_given_up_on_is_late_not_a_duplicate(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call whose deadline passes (or whose task is cancelled) gets its reply later: that reply
    is counted as late; a second reply to an answered request is still a duplicate."""
    client = AsyncAmqpClient(URL, timeout=0.05)
    published: list[Any] = []

    class Exchange:
        async def publish(self, message: Any, routing_key: str) -> None:
            published.append(message)

    async def opened() -> Any:
        return SimpleNamespace(default_exchange=Exchange())

    client._replies = SimpleNamespace(name="replies")  # type: ignore[assignment]
    monkeypatch.setattr(client, "_open", opened)
    with pytest.raises(DeadlineExceeded):
        await client.call(pb.GenerateRequest(id="x", model="vae", image=pb.ImageParams(n=1)))
    await client._on_reply(SimpleNamespace(correlation_id=published[0].correlation_id, body=b""))  # type: ignore[arg-type]
    assert (client.late, client.duplicates) == (1, 0)
    await client._on_reply(SimpleNamespace(correlation_id=published[0].correlation_id, body=b""))  # type: ignore[arg-type]
    assert (client.late, client.duplicates) == (1, 1)  # remembered once: a second reply is a duplicate
    for expect_late in (2, 3):
        cancelled = asyncio.create_task(client.call(pb.GenerateRequest(id="y", model="vae", image=pb.ImageParams(n=1)), timeout=30))
        await wait_until(lambda n=expect_late: len(published) == n, "the next publish", 5)
        reply = SimpleNamespace(correlation_id=published[-1].correlation_id, body=b"")
        cancelled.cancel()
        if expect_late == 2:  # the reply comes before the cancelled task runs again
            await client._on_reply(reply)  # type: ignore[arg-type]
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        if expect_late == 3:  # the reply comes after
            await client._on_reply(reply)  # type: ignore[arg-type]
        assert (client.late, client.duplicates) == (expect_late, 1)
        await client._on_reply(reply)  # type: ignore[arg-type]
        assert (client.late, client.duplicates) == (expect_late, 2), "a second reply to a late one is a duplicate"
        client.duplicates = 1
    assert client._waiting == {}


def test_an_amqp_deadline_beyond_what_timeout_ms_holds_is_sent_capped() -> None:
    assert _with_timeout(pb.GenerateRequest(), 1e8).timeout_ms == 2**32 - 1  # 3 years: more milliseconds than a uint32 holds
    assert _with_timeout(pb.GenerateRequest(), 2.5).timeout_ms == 2500
