"""Links (server/pipeline/links.py): bounded, with demand; nothing lost to a full link or a cancelled taker."""

from __future__ import annotations

import asyncio
import collections

import anyio
import pytest

from server.pipeline.links import Link
from tests.server.pipeline.stage_kit import WAIT, settle

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


async def test_take_returns_at_most_the_demand_in_fifo_order() -> None:
    link: Link[int] = Link("l", 10)
    for i in range(5):
        assert link.offer(i)
    assert await link.take(2) == [0, 1]
    assert await link.take(10) == [2, 3, 4]  # what is there, without waiting for more
    assert len(link) == 0
    assert link.take_nowait(3) == []


async def test_take_waits_for_the_first_item() -> None:
    link: Link[str] = Link("l", 4)
    taker = asyncio.create_task(link.take(3))
    await settle()
    assert not taker.done()
    await link.put("a")
    with anyio.fail_after(WAIT):
        assert await taker == ["a"]


async def test_a_cancelled_take_loses_nothing() -> None:
    link: Link[int] = Link("l", 4)
    taker = asyncio.create_task(link.take(1))
    await settle()
    taker.cancel()
    link.offer(7)  # offered while the cancelled taker is still being woken
    with pytest.raises(asyncio.CancelledError):
        await taker
    assert await link.take(1) == [7]


async def test_offer_refuses_when_full_and_loses_nothing() -> None:
    link: Link[int] = Link("l", 3)
    assert [link.offer(i) for i in range(5)] == [True, True, True, False, False]
    assert link.full and len(link) == 3
    assert await link.take(10) == [0, 1, 2]
    assert link.offer(9)
    assert link.take_nowait(5) == [9]


async def test_put_waits_while_full_and_resumes_when_a_consumer_takes() -> None:
    link: Link[int] = Link("l", 2)
    await link.put(0)
    await link.put(1)
    producer = asyncio.create_task(link.put(2))
    await settle()
    assert not producer.done()  # back-pressure: the producer is held back
    assert len(link) == 2
    assert await link.take(1) == [0]
    with anyio.fail_after(WAIT):
        await producer
    assert await link.take(5) == [1, 2]


async def test_put_from_hands_over_a_group_in_order_as_room_allows() -> None:
    link: Link[int] = Link("l", 3)
    pending = collections.deque(range(5))
    producer = asyncio.create_task(link.put_from(pending))
    await settle()
    assert not producer.done()  # back-pressure: 3 fit, 2 wait in the producer's own deque
    assert list(pending) == [3, 4] and len(link) == 3
    assert await link.take(2) == [0, 1]
    with anyio.fail_after(WAIT):
        await producer
    assert not pending
    assert await link.take(10) == [2, 3, 4]


async def test_a_cancelled_put_from_keeps_what_it_did_not_hand_over() -> None:
    link: Link[int] = Link("l", 2)
    pending = collections.deque(range(4))
    producer = asyncio.create_task(link.put_from(pending))
    await settle()
    producer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await producer
    assert list(pending) == [2, 3]  # the supervisor can still see (and fail) them
    assert link.take_nowait(5) == [0, 1]


async def test_a_group_wakes_every_waiting_consumer_it_can_feed() -> None:
    link: Link[int] = Link("l", 8)
    takers = [asyncio.create_task(link.take(1)) for _ in range(3)]
    await settle()
    await link.put_from(collections.deque([1, 2]))
    await settle()
    assert sorted(t.result()[0] for t in takers if t.done()) == [1, 2]  # two items: two consumers run
    link.offer(3)
    with anyio.fail_after(WAIT):
        assert await asyncio.gather(*takers) == [[1], [2], [3]]


async def test_a_consumer_cancelled_after_its_wake_up_passes_it_on() -> None:
    link: Link[int] = Link("l", 4)
    first = asyncio.create_task(link.take(1))
    second = asyncio.create_task(link.take(1))
    await settle()
    link.offer(7)  # wakes `first` ...
    first.cancel()  # ... which is cancelled before it runs: the item must reach `second`
    with pytest.raises(asyncio.CancelledError):
        await first
    with anyio.fail_after(WAIT):
        assert await second == [7]


async def test_a_demand_below_one_is_refused_and_takes_nothing() -> None:
    link: Link[int] = Link("l", 4)
    link.offer(1)
    for demand in (0, -1):
        with pytest.raises(ValueError, match=rf"^link l: demand must be >= 1, got {demand}$"):
            await link.take(demand)
    assert len(link) == 1  # the item is still there
    assert await link.take(1) == [1]


async def test_a_link_needs_room() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Link("l", 0)
