"""Bounded links between stages, with GenStage-style demand.

A consumer asks for up to ``demand`` items and gets what is there (at least one, waiting if the
link is empty); a producer waits when the link is full (back-pressure), or, at the ingress,
``offer``s and hears at once that there is no room. Links belong to the pipeline, not to the
stages, so a restarted stage carries on with the same queue.

Demand is counted in items, but stages move groups: a consumer takes up to its demand in one call,
and a producer hands over what it made from one take with ``put_from``, a wake-up per group
rather than an await per item (Broadway's demand is counted in events and moves lists of them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Link(Generic[T]):
    """A bounded FIFO between two stages.

    A deque and futures for whoever waits, not an asyncio.Queue: one-image GenerateStream requests
    cross four links, and ``Queue.put`` (a coroutine each) plus ``put_nowait``'s bookkeeping
    (unfinished-task count, an Event) cost every hop. Cancellation-safe as asyncio.Queue is: items
    leave the link only in the synchronous part of a take, and a waiter cancelled after being woken
    passes its wake-up on.
    """

    def __init__(self, name: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"link {name}: capacity must be >= 1, got {capacity}")
        self.name = name
        self.capacity = capacity
        self._items: collections.deque[T] = collections.deque()
        self._takers: collections.deque[asyncio.Future[None]] = collections.deque()  # consumers waiting for items
        self._putters: collections.deque[asyncio.Future[None]] = collections.deque()  # producers waiting for room

    def __len__(self) -> int:
        return len(self._items)

    def oldest(self) -> T | None:
        """The item that has waited longest (the next one taken), or None when empty."""
        return self._items[0] if self._items else None

    @property
    def full(self) -> bool:
        return len(self._items) >= self.capacity

    def offer(self, item: T) -> bool:
        """Put without waiting; False when the link is full (the caller refuses the work)."""
        if len(self._items) >= self.capacity:
            return False
        self._items.append(item)
        if self._takers:
            _wake(self._takers, 1)
        return True

    async def put(self, item: T) -> None:
        """Put, waiting for room: a full link holds its producer back."""
        while len(self._items) >= self.capacity:
            await self._wait(self._putters, lambda: len(self._items) < self.capacity)
        self._items.append(item)
        if self._takers:
            _wake(self._takers, 1)

    async def put_from(self, pending: collections.deque[T]) -> None:
        """Move every item of ``pending`` into the link, in order, as room allows, waiting for room
        while the link is full. An item leaves ``pending`` only as it enters the link, so a producer
        that is cancelled meanwhile still holds (and can account for) what it had not handed over."""
        items = self._items
        while pending:
            while len(items) >= self.capacity:
                await self._wait(self._putters, lambda: len(self._items) < self.capacity)
            n = min(self.capacity - len(items), len(pending))
            for _ in range(n):
                items.append(pending.popleft())
            if self._takers:
                _wake(self._takers, n)

    async def take(self, demand: int) -> list[T]:
        """Up to ``demand`` items, waiting for the first; never more than asked for."""
        if demand < 1:
            raise ValueError(f"link {self.name}: demand must be >= 1, got {demand}")
        while not self._items:
            await self._wait(self._takers, lambda: bool(self._items))
        return self.take_nowait(demand)

    def take_nowait(self, demand: int) -> list[T]:
        items = self._items
        n = min(demand, len(items))
        if n == len(items):
            taken = list(items)
            items.clear()
        else:
            taken = [items.popleft() for _ in range(n)]
        if n and self._putters:
            _wake(self._putters, n)
        return taken

    async def _wait(self, waiters: collections.deque[asyncio.Future[None]], ready: Callable[[], bool]) -> None:
        """Wait in ``waiters`` until woken; if cancelled after a wake-up, pass it on while ``ready()``."""
        waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            woken = waiter.done() and not waiter.cancelled()
            waiter.cancel()
            with contextlib.suppress(ValueError):  # already taken off by the wake-up
                waiters.remove(waiter)
            if woken and ready():
                _wake(waiters, 1)
            raise


def _wake(waiters: collections.deque[asyncio.Future[None]], n: int) -> None:
    """Wake up to ``n`` of ``waiters``, oldest first (skipping any already cancelled)."""
    while n and waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            n -= 1
