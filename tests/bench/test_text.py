"""bench.text's accounting of h2load runs: every call must get an answer, and the server must count each one OK."""

from __future__ import annotations

import pytest

from bench.accounting import Tally
from bench.text import check_all_ok, parse_h2load

# h2load 1.52's summary of 4 Generate calls of 5 tokens each against the real server
OUT = """finished in 58.46ms, 68.43 req/s, 20.05KB/s
requests: 4 total, 4 started, 4 done, 4 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 4 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 1.17KB (1200) total, 87B (87) headers (space savings 73.15%), 636B (636) data
"""


def test_seconds_of_a_complete_run() -> None:
    assert parse_h2load(OUT, 4) == pytest.approx(0.05846)
    assert parse_h2load(OUT.replace("58.46ms", "1.5s"), 4) == pytest.approx(1.5)


def test_fewer_successes_than_calls_fail_the_run() -> None:
    with pytest.raises(RuntimeError, match="4 succeeded, 0 failed, 0 errored of 5 calls"):
        parse_h2load(OUT, 5)


def test_unknown_output_is_refused() -> None:
    with pytest.raises(RuntimeError, match="unexpected h2load output"):
        parse_h2load("h2load: connection refused", 4)


def test_every_call_counted_ok_passes() -> None:
    check_all_ok(Tally(4, 4, {"OK": 4}), 4)


@pytest.mark.parametrize(
    ("by_status", "named"),
    [
        ({"OK": 3, "DEADLINE_EXCEEDED": 1}, "OK 3, DEADLINE_EXCEEDED 1"),  # HTTP 200 all the same: only the counters tell
        ({"OK": 3}, "OK 3"),  # one call never reached the application
        ({}, "none"),
    ],
)
def test_a_call_that_is_not_ok_fails_the_run(by_status: dict[str, int], named: str) -> None:
    with pytest.raises(RuntimeError, match=f"h2load sent 4 calls; the server counted {named}: every call must be OK"):
        check_all_ok(Tally(4, 4, by_status), 4)
