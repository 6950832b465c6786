"""The event loop's busy share (server/runtime/loop_busy.py): a loop held busy reads near 1, an idle one near 0."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.runtime.loop_busy import LoopBusyProbe

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

PERIOD = 0.02


async def samples_while(hold: bool, seconds: float = 0.3) -> list[float]:
    """The probe's samples over ``seconds`` of a loop spinning on the CPU (``hold``) or asleep."""
    samples: list[float] = []
    probe = LoopBusyProbe(samples.append, PERIOD)
    probe.start()
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            if hold:
                spin = time.perf_counter() + 0.05
                while time.perf_counter() < spin:  # the loop's thread on a CPU, as a saturated loop is
                    pass
                await asyncio.sleep(0)  # one turn: the probe's timer runs
            else:
                await asyncio.sleep(PERIOD)
    finally:
        probe.stop()
    assert not probe.running
    return samples


async def test_a_loop_held_busy_reads_busy_and_an_idle_one_reads_idle() -> None:
    busy = await samples_while(hold=True)
    idle = await samples_while(hold=False)
    assert busy and idle
    assert all(0.0 <= s <= 1.0 for s in busy + idle)
    # Loose bounds: a shared machine may take the CPU from the spinning thread now and then.
    assert max(busy) > 0.8 and sorted(busy)[len(busy) // 2] > 0.5
    assert sorted(idle)[len(idle) // 2] < 0.3


async def test_a_failing_consumer_does_not_stop_the_sampling() -> None:
    calls: list[float] = []
    three = asyncio.Event()

    def consumer(busy: float) -> None:
        calls.append(busy)
        if len(calls) == 3:
            three.set()
        if len(calls) == 1:
            raise RuntimeError("the first sample's consumer fails")

    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    probe = LoopBusyProbe(consumer, PERIOD)
    probe.start()
    try:
        await three.wait()  # samples go on after the failing one
    finally:
        probe.stop()
        loop.set_exception_handler(None)
    assert len(errors) == 1 and isinstance(errors[0].get("exception"), RuntimeError)


async def test_the_period_must_be_positive() -> None:
    with pytest.raises(ValueError, match="period_s must be > 0, got 0"):
        LoopBusyProbe(lambda busy: None, 0)
