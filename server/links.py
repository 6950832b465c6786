"""Bounded links between stages, with GenStage-style demand.

A consumer asks for up to ``demand`` items and gets what is there (at least one, waiting if the
link is empty); a producer waits when the link is full (back-pressure), or, at the ingress,
``offer``s and hears at once that there is no room. Links belong to the pipeline, not to the
stages, so a restarted stage carries on with the same queue.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Link(Generic[T]):
    """A bounded FIFO between two stages (asyncio.Queue underneath: cancellation-safe)."""

    def __init__(self, name: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"link {name}: capacity must be >= 1, got {capacity}")
        self.name = name
        self.capacity = capacity
        self._queue: asyncio.Queue[T] = asyncio.Queue(maxsize=capacity)

    def __len__(self) -> int:
        return self._queue.qsize()

    @property
    def full(self) -> bool:
        return self._queue.full()

    def offer(self, item: T) -> bool:
        """Put without waiting; False when the link is full (the caller refuses the work)."""
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            return False
        return True

    async def put(self, item: T) -> None:
        """Put, waiting for room: a full link holds its producer back."""
        await self._queue.put(item)

    async def take(self, demand: int) -> list[T]:
        """Up to ``demand`` items, waiting for the first; never more than asked for."""
        if demand < 1:
            raise ValueError(f"link {self.name}: demand must be >= 1, got {demand}")
        first = await self._queue.get()
        items = [first]
        queue = self._queue
        while len(items) < demand and not queue.empty():
            items.append(queue.get_nowait())
        return items

    def take_nowait(self, demand: int) -> list[T]:
        items: list[T] = []
        queue = self._queue
        while len(items) < demand and not queue.empty():
            items.append(queue.get_nowait())
        return items
