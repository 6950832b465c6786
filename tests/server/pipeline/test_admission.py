"""Admission by queueing delay (server/pipeline/admission.py), on a fake clock: no server, no timing."""

from __future__ import annotations

import pytest

from server.grpc_edge.codes import RETRY_PUSHBACK_KEY, retry_metadata
from server.pipeline.admission import Admission, CoDel
from server.pipeline.statuses import Code, Refused

TARGET, INTERVAL = 0.005, 0.100


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def check(admission: Admission, inflight: int, *, by_delay: bool = True) -> None:
    """Admission as the pipeline asks it (Pipeline.check_room): raise its refusal, if any."""
    reason = admission.overloaded(inflight, by_delay=by_delay)
    if reason is not None:
        raise admission.refused(reason)


def test_a_delay_over_target_for_less_than_an_interval_is_a_burst_and_is_served() -> None:
    codel = CoDel(TARGET, INTERVAL)
    for i in range(10):  # 90 ms over target: not yet an interval
        codel.observe(2 * TARGET, 1.0 + i * 0.010)
        assert not codel.shedding


def test_sheds_when_the_delay_stays_over_target_for_an_interval_and_stops_when_it_falls() -> None:
    codel = CoDel(TARGET, INTERVAL)
    t = 1.0
    while t < 1.0 + INTERVAL:
        codel.observe(2 * TARGET, t)
        t += 0.010
    codel.observe(2 * TARGET, t)
    states = [codel.shedding]
    codel.observe(TARGET / 2, t + 0.001)  # one sample under target: the queue has drained
    states.append(codel.shedding)
    codel.observe(2 * TARGET, t + 0.002)  # over again: a new interval must pass first
    states.append(codel.shedding)
    assert states == [True, False, False]


def test_an_idle_server_never_sheds() -> None:
    clock = FakeClock()
    admission = Admission(100, target_s=TARGET, interval_s=INTERVAL, clock=clock)
    check(admission, 0)
    for _ in range(12):
        admission.observe_job(clock.now - 1.0, 0.0)  # the last jobs waited a second each
        clock.now += 0.010
    with pytest.raises(Refused):
        check(admission, 1)
    check(admission, 0)  # nothing in flight: nothing is queued
    check(admission, 1)  # ... and the next request starts afresh


def overloaded_admission(clock: FakeClock, max_inflight: int = 100) -> Admission:
    reasons: list[str] = []
    admission = Admission(max_inflight, target_s=TARGET, interval_s=INTERVAL, clock=clock, on_refusal=reasons.append)
    admission.refusals = reasons  # type: ignore[attr-defined]
    for _ in range(12):  # jobs that waited 20 ms each (plus 1 ms of compute), finishing 10 ms apart
        admission.observe_job(clock.now - 0.021, 0.001)
        clock.now += 0.010
    return admission


def test_admission_refuses_with_resource_exhausted_and_a_retry_hint_while_shedding() -> None:
    clock = FakeClock()
    admission = overloaded_admission(clock)
    with pytest.raises(Refused) as info:
        check(admission, 1)
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert info.value.retry_after_ms == 100
    assert retry_metadata(info.value.retry_after_ms) == ((RETRY_PUSHBACK_KEY, "100"),)
    assert "overloaded" in info.value.message
    assert admission.refusals == ["delay"]  # type: ignore[attr-defined]
    admission.observe_job(clock.now - 0.002, 0.001)  # 1 ms of queueing: under target
    check(admission, 1)


def test_compute_time_is_not_queueing_delay() -> None:
    clock = FakeClock()
    admission = Admission(100, target_s=TARGET, interval_s=INTERVAL, clock=clock)
    for _ in range(30):  # 50 ms requests, all of it compute
        admission.observe_job(clock.now - 0.050, 0.049)
        clock.now += 0.010
    check(admission, 0)


def test_stream_requests_meet_only_the_count_limit() -> None:
    clock = FakeClock()
    admission = overloaded_admission(clock, max_inflight=3)
    check(admission, 1, by_delay=False)  # admitted by its credit
    with pytest.raises(Refused, match="limit of 3"):
        check(admission, 3, by_delay=False)


def test_the_count_limit_is_a_backstop_whatever_the_delay() -> None:
    admission = Admission(3, target_s=TARGET, interval_s=INTERVAL, clock=FakeClock())
    check(admission, 2)
    with pytest.raises(Refused, match="limit of 3 requests in flight") as info:
        check(admission, 3)
    assert info.value.code == Code.RESOURCE_EXHAUSTED and info.value.retry_after_ms == 100


def test_stream_credit_shrinks_while_shedding_and_comes_back_after() -> None:
    clock = FakeClock()
    calm = Admission(100, target_s=TARGET, interval_s=INTERVAL, clock=clock)
    assert calm.stream_grant(64, 63) == 1  # one finished: its credit back
    admission = overloaded_admission(clock)
    assert admission.stream_grant(64, 63) == 0  # holds 63 of a 16-credit window: none back
    assert admission.stream_grant(64, 10) == 6  # up to a quarter of the grant
    assert admission.stream_grant(64, 0) == 16
    assert admission.stream_grant(2, 0) == 1  # never nothing to spend and nothing in flight
    admission.observe_job(clock.now - 0.002, 0.001)  # calm again
    assert admission.stream_grant(64, 10) == 54  # topped up to the full grant


def test_the_loop_queue_sheds_while_calls_wait_to_start_over_target_on_average() -> None:
    """The second signal (server/grpc_edge/accept.py): how long calls wait between acceptance and their task's
    first step. The job queue may be short meanwhile (a saturated event loop is the bottleneck)."""
    clock = FakeClock()
    reasons: list[str] = []
    admission = Admission(100, target_s=TARGET, interval_s=INTERVAL, clock=clock, on_refusal=reasons.append)
    for _ in range(40):  # calls that waited 20 ms each to start: the loop has a turn's worth of work queued
        admission.observe_arrival(0.020)
    assert admission.shedding and admission.arrival.shedding(clock.now) and not admission.codel.shedding
    assert admission.arrival.sheds(0.001)  # a call arriving behind one still waiting is refused
    assert not admission.arrival.sheds(0.0)  # one that finds nobody waiting goes in: its sample updates the average
    check(admission, 5)  # the handler's check is the job queue's: the accept path refuses for arrivals
    assert reasons == []  # the accept path's policy refuses (and counts) for the loop's queue: server/grpc_edge/service.py
    refusal = admission.refused("arrival")
    assert refusal.code == Code.RESOURCE_EXHAUSTED and refusal.retry_after_ms == 100
    assert "wait over 10 ms to start" in refusal.message
    assert admission.stream_grant(64, 63) == 0  # streams slow down on either signal
    for _ in range(200):  # calls start at once again: the queue has drained
        admission.observe_arrival(0.0005)
    assert (admission.shedding, admission.arrival.sheds(0.001)) == (False, False)


def test_a_few_long_waits_among_quick_ones_are_a_burst_and_shed_nothing() -> None:
    admission = Admission(100, target_s=TARGET, interval_s=INTERVAL, clock=FakeClock())
    for _ in range(200):
        admission.observe_arrival(0.001)
    for _ in range(5):  # one long turn of the loop: five calls waited 20 ms
        admission.observe_arrival(0.020)
    assert not admission.shedding and not admission.arrival.sheds(0.020)


def test_an_idle_loop_never_sheds_whatever_it_last_saw() -> None:
    clock = FakeClock()
    admission = Admission(100, target_s=TARGET, interval_s=INTERVAL, clock=clock)
    for _ in range(100):
        admission.observe_arrival(1.0)
    assert admission.stream_grant(64, 0) == 16  # shedding: a stream holds a quarter of its credit
    assert not admission.arrival.sheds(0.0)  # nothing waits to start: the next call goes in
    clock.now += 2 * INTERVAL  # no call started since (a GenerateStream's requests give no sample)
    assert admission.stream_grant(64, 0) == 64  # the average is stale: streams get their whole credit back
    assert not admission.arrival.shedding(clock.now)


def test_the_call_limit_follows_the_rate_calls_finish_at_and_keeps_its_floor() -> None:
    """Little's law: at most rate x budget calls in progress, never under the floor."""
    admission = Admission(100, target_s=TARGET, interval_s=INTERVAL, clock=FakeClock(), call_floor=32)
    calls = admission.calls
    assert calls.budget == 2 * TARGET and calls.limit == 32  # no rate yet: the floor
    now = 10.0
    for _ in range(40):  # 10,000 calls finished a second for 0.4 s
        for _ in range(100):
            now += 0.0001
            calls.finished(now)
    assert 95 <= calls.limit <= 101  # about 100 calls: 10 ms of work in progress
    for _ in range(40):  # then 1,000 a second: the limit falls back to the floor
        for _ in range(10):
            now += 0.001
            calls.finished(now)
    assert calls.limit == 32
    refusal = admission.refused("limit")
    assert refusal.code == Code.RESOURCE_EXHAUSTED and "limit of 32 calls in progress" in refusal.message


def test_a_long_pause_says_nothing_of_the_rate() -> None:
    admission = Admission(100, target_s=TARGET, interval_s=INTERVAL, clock=FakeClock(), call_floor=8)
    calls, now = admission.calls, 10.0
    for _ in range(2000):
        now += 0.0001
        calls.finished(now)
    before = calls.limit
    calls.finished(now + 60.0)  # one call a minute later
    assert calls.limit == before
