"""A test seam on a running decode loop: count its steps, see each sequence's last event, pause it.

Cancellation tests need to see that a cancelled sequence stops costing work, whatever the speed of
the machine: a sequence that finished by itself ends with ``length`` after ``max_new_tokens``
tokens, a cancelled one with ``cancelled`` long before. ``pause()`` holds the loop before its next
step, so a deadline or a drain can pass while a sequence is certainly unfinished (no "512 tokens
must outlast 0.2 s").
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from engine.decode import DecodeBatch, TokenEvent


class StepSpy:
    """Wraps ``loop.step`` on the instance (the worker thread looks it up at every step)."""

    def __init__(self, loop: DecodeBatch) -> None:
        self.loop = loop
        self.steps = 0
        self.last: dict[int, TokenEvent] = {}  # by the sequence's seed: tests give each a distinct one
        self._open = threading.Event()
        self._open.set()
        self._step: Callable[[], list[TokenEvent]] = loop.step
        loop.step = self._wrapped  # type: ignore[method-assign]

    def _wrapped(self) -> list[TokenEvent]:
        self._open.wait(timeout=30)  # bounded: a failed test never leaves the worker stuck
        events = self._step()
        self.steps += 1
        for ev in events:
            self.last[ev.handle.seed] = ev
        return events

    def pause(self) -> None:
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def restore(self) -> None:
        self._open.set()
        self.loop.step = self._step  # type: ignore[method-assign]

    def final(self, seed: int, timeout: float = 60.0) -> TokenEvent:
        """The finishing event of the sequence with ``seed`` (a bounded poll: it returns as soon as it is there)."""
        deadline = time.monotonic() + timeout
        while (ev := self.last.get(seed)) is None or not ev.finished:
            if time.monotonic() > deadline:
                raise AssertionError(f"the sequence with seed {seed} did not finish within {timeout} s (last event {ev})")
            time.sleep(0.005)
        return ev

    async def wait_final(self, seed: int, timeout: float = 60.0) -> TokenEvent:
        """``final`` for async tests: the event loop keeps running (the server's cancel goes through it)."""
        deadline = time.monotonic() + timeout
        while (ev := self.last.get(seed)) is None or not ev.finished:
            if time.monotonic() > deadline:
                raise AssertionError(f"the sequence with seed {seed} did not finish within {timeout} s (last event {ev})")
            await asyncio.sleep(0.005)
        return ev
