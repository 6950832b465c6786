"""How busy the event loop's thread is: its CPU time over wall time, sampled every 20 ms, for the
``genserve_loop_busy_ratio`` gauge.

One process serves from one event loop, and its thread is what runs out first: near 1, more calls
only wait (add ``--workers`` or servers). The loop's lag does not show it: a saturated loop is
busy, not late. A metric, not an admission signal: a closed loop keeps a loop busy without
overloading it (docs/design/admission-signals.md, signals tried and not kept).

Cost: one timer callback and one ``time.thread_time()`` per period (50 a second).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

DEFAULT_PERIOD_S = 0.020  # long enough that a sample is a share, not "busy" or "idle"


class LoopBusyProbe:
    """Calls ``on_sample(busy)`` every ``period_s`` with the share of the wall time since the last
    sample that the event loop's thread spent on a CPU (0..1; the timer runs on that thread)."""

    def __init__(self, on_sample: Callable[[float], None], period_s: float = DEFAULT_PERIOD_S) -> None:
        if not period_s > 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self.on_sample = on_sample
        self.period_s = period_s
        self.busy = 0.0  # the latest sample
        self._handle: asyncio.TimerHandle | None = None
        self._wall = 0.0
        self._cpu = 0.0

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        """Start sampling on the running loop (again after ``stop``)."""
        if self._handle is None:
            self._wall, self._cpu = time.perf_counter(), time.thread_time()
            self._handle = asyncio.get_running_loop().call_later(self.period_s, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        elapsed = wall - self._wall
        if elapsed > 0:
            self.busy = min(1.0, max(0.0, (cpu - self._cpu) / elapsed))
        self._wall, self._cpu = wall, cpu
        # rescheduled before the callback: a failing callback must not stop the sampling
        self._handle = asyncio.get_running_loop().call_later(self.period_s, self._tick)
        self.on_sample(self.busy)
