"""Admission: who gets in, decided at arrival, in one synchronous call (check and reserve atomically).

A request is refused at once with RESOURCE_EXHAUSTED, and a retry hint in trailing metadata, when

- the queueing delay has stayed above ``target`` for a whole ``interval`` (CoDel: Nichols and
  Jacobson, "Controlling Queue Delay", ACM Queue 2012; the same rule as Facebook's adaptive
  queue in wangle/folly's ``Codel``): a queue that stays long is a standing queue, one that
  drains within an interval is a burst and is served; or
- the count backstop, ``max_inflight`` unfinished requests, is reached (bounded memory whatever
  the delay says).

Why by delay and not only by count: a count limit sized for the slowest request lets a queue of
fast ones wait for seconds. Measured on the 2-core machine under 2x overload (h2load, one-image
VAE requests): with only the count limit (8192), admitted calls waited p99 ~660 ms and grpc
core cancelled half of all calls before the application saw them.

The delay signal: the time an image job spent between admission and the end of its last batch,
less what batching itself costs (the batch timeout, its own batches' compute, and one batch ahead
of it: ``observe_job``), so a server that is merely batching never looks queued. It includes every wait a request meets in
this process: the pipeline's links, and the event loop itself when it is the bottleneck (a
saturated loop runs stages late). Text jobs give no sample (their time is their length).
A server with nothing in flight has nothing queued: it forgets the delay and sheds nothing (idle).

While shedding, every new plain call is refused (there is no queue at arrival to drop from,
unlike a router's CoDel); the first sample under target stops it. Samples come with every
finished job (thousands a second under load), so the on/off period is milliseconds, not intervals.

GenerateStream requests are admitted by their credit, and the credit follows the same signal
(``stream_grant``): while shedding a stream may hold a quarter of its credit (in flight plus
unspent), so a streaming client slows down instead of being refused request by request; a request
within its credit meets only the count backstop.

The second signal, ``arrival``: the event loop's own queue. Every call is started as a task where
it is accepted (server/grpc_edge/accept.py), and its wait from acceptance to the task's first step is a
sample of how much work the loop has queued (``LoopDelay``: their moving average, about half a
turn of the loop). While that average is over the target, a new Generate call is refused at
arrival if calls are still waiting to start (one that finds none goes in, and its sample updates
the average), and a call that waited over twice the target is refused as it starts (Facebook's
rule: under overload, the oldest are the ones to drop). What neither signal sees: calls grpc core
has not handed over. Those used to be most of a flood: grpc's poller thread blocked on its wake-up
socket (server/grpc_edge/wakeups.py fixes it), then grpc.aio's main loop took one call per two turns of the
loop (server/grpc_edge/accept.py starts them itself now).
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
    """The event loop's queue: a moving average of how long calls wait between being accepted and
    starting (``observe``, one sample a call), and whether a call should be refused for it (``sheds``).

    Why not CoDel's rule (the smallest delay of an interval): the loop runs everything that was ready
    at the start of a turn, in order, so a call made ready late in a turn waits a whole turn and one
    made ready early waits almost nothing, whatever the load. Every interval has a quick call in it,
    and a minimum never sees the turns grow. The average does: it is about half a turn, and a turn is
    the work the loop has queued. A moving average of the last ~``1/alpha`` calls.
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
    """Little's law over plain calls in progress: at most ``rate x budget`` of them (``rate``: image
    calls finished a second), so that under overload a call spends about ``budget`` in the server,
    and never fewer than ``floor`` (a server just started has no rate; the floor lets a batch nearly
    fill). The count is the accept path's (server/grpc_edge/accept.py): Generate calls started and not
    finished, waiting to start included; a call leaves it when its outcome comes (only sending is
    left: a closed loop of 64 calls otherwise counted up to 128, the old calls' tasks still closing
    when the new ones came), and a text call once its handler knows it is one (``release_call``): it
    lasts as long as its tokens, not as long as the server's queue.

    Why a limit besides the delay signals: a flood's calls are accepted in bursts, hundreds in one
    turn of the loop, and become work (and delay) only turns later; a call refused at arrival costs
    the loop a third of one served. Measured (h2load, 4 connections, one-image VAE calls, 2-core VM,
    6 s after a 3 s closed-loop warm-up, one run each):

    | offered | delay signals only: served/s, p50 / p99 | limit (budget 10 ms, floor 96): served/s, p50 / p99 |
    |---|---|---|
    | 8,000/s | 3,100-4,700, 16-24 / 138-163 ms (3 runs) | 4,660, 10.5 / 26.5 ms |
    | 14,000/s | 1,700, 21 / 206 ms | 2,590, 4.6 / 39.7 ms |

    The rate follows itself: calls that take longer than the budget finish fewer in it, and the limit
    falls; quicker, and it rises.
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
    """The server's admission policy: the delay controller, the count backstop, the stream credit.

    ``check`` is synchronous and never awaits, so the caller's check and its reservation (adding the
    job to the in-flight set) happen in one turn of the event loop: no gap in which a second request
    passes the same check (vLLM #58192 shows what such a gap costs).
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
        GenerateStream request: its credit is its admission, and the credit shrinks while the server
        sheds). A reason, not an exception: under overload refusals are most of the loop's work, and
        raising and catching one was ~7% of it (py-spy)."""
        if inflight == 0 and self.codel.shedding:  # idle: nothing is queued, whatever the last samples said
            self.codel.reset()
        if by_delay and self.codel.shedding:  # the arrival queue's own refusals are the accept path's (server/grpc_edge/accept.py)
            self.on_refusal("delay")
            return "delay"
        if inflight >= self.max_inflight:
            self.on_refusal("count")
            return "count"
        return None

    def refused(self, reason: str) -> Refused:
        """The refusal for ``reason`` ("delay", "count", "arrival" or "limit"; see ``overloaded``; the accept path's
        policy counts its own, server/grpc_edge/service.py)."""
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
        """Either queue is over target: jobs in the pipeline (for an interval), or calls waiting to start, on
        average (``arrival``, fed and acted on by the accept path: server/grpc_edge/accept.py and the service's policy)."""
        return self.codel.shedding or self.arrival.shedding(self.clock())

    def observe_arrival(self, waited_s: float) -> None:
        """A call waited ``waited_s`` between its acceptance and its task's first step (server/grpc_edge/accept.py)."""
        self.arrival.observe(waited_s, self.clock())

    def observe_job(self, created: float, allowance_s: float) -> None:
        """A job created (``clock``) at ``created`` has finished; ``allowance_s`` of its time was batching, not queueing."""
        now = self.clock()
        self.codel.observe(now - created - allowance_s, now)

    def stream_grant(self, full: int, outstanding: int) -> int:
        """Credits to announce to a stream that holds ``outstanding`` (in flight + unspent) of its ``full``
        credit; called when finished requests have given credits back.

        Not shedding: give back what returned, and top the stream up to its full credit (after a
        shedding spell). Shedding: only up to a quarter of the credit. Never leaves a stream with
        nothing in flight and nothing to spend, or it would wait for credits forever.
        """
        window = max(1, full // SHEDDING_CREDIT_FRACTION) if self.shedding else full
        grant = max(0, window - outstanding)
        if outstanding + grant < 1:
            grant = 1
        return grant
