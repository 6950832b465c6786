"""bench.text's accounting of h2load runs: every call must succeed and bring its bytes."""

from __future__ import annotations

import pytest

from bench.text import parse_h2load

# h2load 1.52's summary of 4 Generate calls of 5 tokens each against the real server
OUT = """finished in 58.46ms, 68.43 req/s, 20.05KB/s
requests: 4 total, 4 started, 4 done, 4 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 4 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 1.17KB (1200) total, 87B (87) headers (space savings 73.15%), 636B (636) data
"""


def test_seconds_of_a_complete_run() -> None:
    assert parse_h2load(OUT, 4, 636.0) == pytest.approx(0.05846)
    assert parse_h2load(OUT.replace("58.46ms", "1.5s"), 4, 636.0) == pytest.approx(1.5)


def test_a_call_short_of_its_bytes_fails_the_run() -> None:
    with pytest.raises(RuntimeError, match="received 636 bytes of data, expected about 795"):
        parse_h2load(OUT, 4, 795.0)  # five calls' worth of chunks expected from four


def test_fewer_successes_than_calls_fail_the_run() -> None:
    with pytest.raises(RuntimeError, match="4 succeeded, 0 failed, 0 errored of 5 calls"):
        parse_h2load(OUT, 5, 636.0)


def test_unknown_output_is_refused() -> None:
    with pytest.raises(RuntimeError, match="unexpected h2load output"):
        parse_h2load("h2load: connection refused", 4, 636.0)
