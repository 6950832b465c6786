"""Admission: who gets in, decided at arrival in one synchronous call (check and reserve atomically).

A call is refused at once (RESOURCE_EXHAUSTED, with a retry hint) while the queueing delay has
stayed over target for an interval (``CoDel``), while calls wait too long to start on the event
loop (``LoopDelay``), beyond the calls in progress the server can turn over (``CallLimit``), or at
the count backstop ``max_inflight``. ``LoopDelay`` and ``CallLimit`` are asked by the accept path
(server/grpc_edge/service.py's policy). A GenerateStream request is admitted by its credit, which
shrinks while the server sheds (``stream_grant``).

Why: docs/design/admission-signals.md
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.pipeline.statuses import Refused, overloaded

SHEDDING_CREDIT_FRACTION = 4  # a stream holds 1/4 of its credit while the server sheds


@dataclass
class CoDel:
    """CoDel's standing-queue detector over delay samples; ``now`` is any monotonic clock in seconds.

    Not shedding: the first sample above target starts a clock; if samples stay above target until
    ``interval`` later, shedding starts. Any sample under target ends it (and resets the clock).
    """

    target: float = 0.005  # seconds: a delay the server may keep (about one batch timeout plus a batch)
    interval: float = 0.100  # seconds: how long a delay must persist to count as a standing queue
    shedding: bool = False
    first_above: float = math.inf  # when the delay, if it stays above target, makes the queue standing
    delay: float = 0.0  # the latest sample, for the metrics

    def observe(self, delay: float, now: float) -> None:
        self.delay = delay
        if delay < self.target:
            self.reset()
        elif self.first_above == math.inf:
            self.first_above = now + self.interval
        elif now >= self.first_above:
            self.shedding = True

    def reset(self) -> None:
        self.first_above = math.inf
        self.shedding = False


@dataclass
class LoopDelay:
    """The event loop's queue: a moving average over the last ~``1/alpha`` calls of their wait from
    acceptance to start (``observe``), and whether a call should be refused for it (``sheds``).

    An average, not CoDel's minimum: some call of every turn waits almost nothing, so a minimum
    never rises (docs/design/admission-signals.md).
    """

    target: float = 0.005  # seconds: the average wait to start over which new calls are refused
    interval: float = 0.100  # seconds: an average with no sample this long is stale (the loop has had no calls)
    alpha: float = 0.02
    average: float = 0.0
    delay: float = 0.0  # the latest sample, for the metrics
    last: float = -math.inf  # when the latest sample came

    def observe(self, delay: float, now: float) -> None:
        self.delay = delay
        self.last = now
        self.average += self.alpha * (delay - self.average)

    def sheds(self, queued_s: float) -> bool:
        """Refuse a call while the average is over target and calls still wait (``queued_s``, the oldest
        one's wait so far): an empty queue lets the next call through, and its sample updates the average."""
        return self.average > self.target and queued_s > 0.0

    def shedding(self, now: float) -> bool:
        """Over target, and not stale: a server whose calls stopped coming (a GenerateStream's requests
        give no sample) does not keep refusing, or keep streams short of credit, on old samples."""
        return self.average > self.target and now - self.last < self.interval

    def reset(self) -> None:
        self.average = 0.0


@dataclass
class CallLimit:
    """Little's law over Generate calls in progress: at most ``rate x budget`` of them (``rate``: image
    calls finished a second), so that under overload a call spends about ``budget`` in the server;
    never fewer than ``floor`` (a fresh server has no rate; the floor lets a batch nearly fill).

    The count is the accept path's (server/grpc_edge/accept.py), waiting to start included; a call
    leaves it when its outcome comes, a text call once its handler knows it is one
    (``release_call``). Slower calls finish fewer in the budget, so the limit falls with them.
    """

    budget: float = 0.010  # seconds: about how long a call may spend in the server under overload
    floor: int = 96
    window: float = 0.050
    rate: float = 0.0  # finished calls a second
    finished_in_window: int = 0
    window_start: float = -math.inf

    def finished(self, now: float) -> None:
        self.finished_in_window += 1
        elapsed = now - self.window_start
        if elapsed >= self.window:
            if elapsed < 10 * self.window:  # a long gap with no finished call says nothing of the rate
                self.rate += 0.5 * (self.finished_in_window / elapsed - self.rate)
            self.window_start = now
            self.finished_in_window = 0

    @property
    def limit(self) -> int:
        return max(self.floor, int(self.rate * self.budget))


class Admission:
    """The server's admission policy: its signals, the count backstop, the stream credit.

    ``overloaded`` is synchronous and never awaits, so the caller's check and its reservation (adding
    the job to the in-flight set) happen in one turn of the event loop: no gap in which a second
    request passes the same check (vLLM #58192 shows what such a gap costs).
    """

    def __init__(
        self,
        max_inflight: int,
        *,
        target_s: float = 0.005,
        interval_s: float = 0.100,
        clock: Callable[[], float] = time.perf_counter,
        on_refusal: Callable[[str], None] = lambda reason: None,
        call_floor: int = 96,
    ) -> None:
        self.max_inflight = max_inflight
        self.codel = CoDel(target_s, interval_s)  # jobs: admission to their last batch
        self.arrival = LoopDelay(target_s, interval_s)  # calls: accepted to started (server/grpc_edge/accept.py)
        self.calls = CallLimit(budget=2 * target_s, floor=call_floor)  # calls in progress (the accept path refuses beyond it)
        self.clock = clock
        self.on_refusal = on_refusal  # metrics: "delay", "arrival" or "count"
        self.retry_after_ms = max(1, round(interval_s * 1000))  # a standing queue needs about an interval to drain

    def overloaded(self, inflight: int, *, by_delay: bool = True) -> str | None:
        """The reason a new request is refused now ("delay" or "count", counted by ``on_refusal``), or
        None; ``inflight`` requests are unfinished. ``by_delay=False``: only the count limit (a
        GenerateStream request: its credit is its admission). A reason, not an exception: under
        overload refusals are most of the loop's work (docs/design/admission-signals.md)."""
        if inflight == 0 and self.codel.shedding:  # idle: nothing is queued, whatever the last samples said
            self.codel.reset()
        if by_delay and self.codel.shedding:  # "arrival" and "limit" are the accept path's
            self.on_refusal("delay")
            return "delay"
        if inflight >= self.max_inflight:
            self.on_refusal("count")
            return "count"
        return None

    def refused(self, reason: str) -> Refused:
        """The refusal for ``reason``: "delay" or "count" (``overloaded``), "arrival" or "limit" (the accept
        path's policy, server/grpc_edge/service.py, which counts its own)."""
        if reason == "delay":
            message = f"server is overloaded: requests wait over {self.codel.target * 1000:g} ms"
        elif reason == "count":
            message = f"server is at its limit of {self.max_inflight} requests in flight"
        elif reason == "limit":
            budget_ms = self.calls.budget * 1000
            message = f"server is at its limit of {self.calls.limit} calls in progress (about {budget_ms:g} ms of work)"
        elif reason == "arrival":
            wait_ms = 2 * self.arrival.target * 1000
            message = f"server is overloaded: calls wait over {wait_ms:g} ms to start"
        else:
            raise ValueError(f"unknown refusal reason {reason!r}")
        return overloaded(message, self.retry_after_ms)

    @property
    def shedding(self) -> bool:
        """Either queue is over target: jobs in the pipeline (for an interval), or calls waiting to start
        (on average, fed and acted on by the accept path)."""
        return self.codel.shedding or self.arrival.shedding(self.clock())

    def observe_arrival(self, waited_s: float) -> None:
        """A call waited ``waited_s`` between its acceptance and its task's first step."""
        self.arrival.observe(waited_s, self.clock())

    def observe_job(self, created: float, allowance_s: float) -> None:
        """A job created (``clock``) at ``created`` has finished; ``allowance_s`` of its time was batching, not queueing."""
        now = self.clock()
        self.codel.observe(now - created - allowance_s, now)

    def stream_grant(self, full: int, outstanding: int) -> int:
        """Credits to announce to a stream that holds ``outstanding`` (in flight + unspent) of its ``full``
        credit; called when finished requests have given credits back.

        Up to the full credit, or a quarter of it while shedding. Never leaves a stream with nothing in
        flight and nothing to spend, or it would wait for credits forever.
        """
        window = max(1, full // SHEDDING_CREDIT_FRACTION) if self.shedding else full
        grant = max(0, window - outstanding)
        if outstanding + grant < 1:
            grant = 1
        return grant
