"""bench.ab's overload row (its figures from the side's counters) and the event loops' CPU read from /proc (bench.serve, bench.ab)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import ab, report, serve
from bench.accounting import Tally


def test_flood_figures_come_from_the_sides_counts() -> None:
    """OK and refused per second, goodput against the side's closed-loop rate, loop CPU per call the side answered."""
    tally = Tally(sent=1_000, done=990, by_status={"OK": 200, "RESOURCE_EXHAUSTED": 780, "CANCELLED": 10})
    flood = ab.Flood(tally, seconds=2.0, loop_cpu_s=0.099, closed_calls_s=400.0)
    assert flood.ok_s == 100.0
    assert flood.refused_s == 390.0
    assert flood.goodput == 0.25
    assert flood.loop_us_per_call == pytest.approx(100.0)  # 0.099 s over the 990 calls it counted


def test_the_report_names_calls_the_side_never_answered(capsys: pytest.CaptureFixture[str]) -> None:
    """Calls answered by grpc core (done, but in no counter of the side) are printed, never folded into OK or refused."""
    echo = ab.Flood(Tally(sent=500, done=500, by_status={"OK": 300}), seconds=1.0, loop_cpu_s=0.03, closed_calls_s=300.0)
    server = ab.Flood(Tally(sent=500, done=500, by_status={"OK": 150, "RESOURCE_EXHAUSTED": 350}), 1.0, 0.05, 300.0)
    ab.report_floods({"echo": [echo], "B": [server]}, 500.0, 0)
    line = capsys.readouterr().out
    assert "echo OK    300/s" in line and "BY GRPC CORE 200" in line
    assert "B OK    150/s refused    350/s goodput 0.50" in line and line.count("BY GRPC CORE") == 1


def test_loops_cpu_counts_the_main_threads_of_a_server_and_its_workers() -> None:
    """A process's main thread, and each child's (the workers of ``--workers N``)."""
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        deadline = time.monotonic() + 20
        while serve.main_thread_cpu_s(child.pid) < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        own = serve.main_thread_cpu_s(os.getpid())
        assert serve.main_thread_cpu_s(child.pid) >= 0.25
        assert serve.loops_cpu_s(os.getpid()) >= own + 0.25  # this process and its spinning child
    finally:
        child.kill()
        child.wait()


def test_the_overload_table_prints_the_loops_cost_per_call(capsys: pytest.CaptureFixture[str]) -> None:
    """bench.serve's overload row carries the loop CPU per answered call; a row without it (an older JSON) prints '-'."""
    row = {
        "side": "server", "offered_req_s": 8000.0, "sent_req_s": 7990.0, "goodput_req_s": 500.0, "p50_ms": 5.0, "p99_ms": 50.0,
        "admitted_p99_ms": 60.0, "refused": 70_000, "refusal_p99_ms": 30.0, "client_lag_p99_ms": 1.0, "rss_before_mb": 500.0,
        "rss_peak_mb": 520.0, "rss_growth_mb": 20.0, "not_ok": {}, "statuses": "adds up", "duration_s": 10.0,
    }  # fmt: skip
    out = {
        "overload": [row | {"side": "echo"}, row | {"loop_us_per_call": 123.4}],
        "setup": {"server_rss_idle_mb": 480.0},
        "server_rss_after_mb": 515.0,
    }
    report.print_overload(out)
    lines = capsys.readouterr().out.splitlines()
    assert "loop us" in lines[1]
    echo_line, server_line = lines[3], lines[4]
    assert echo_line.startswith("echo") and echo_line.split()[-2:] == ["-", "-"]  # no loop figure; no other status
    assert server_line.startswith("server") and server_line.split()[-2:] == ["123", "-"]


def test_a_flood_on_a_side_that_died_names_it(tmp_path: Path) -> None:
    """A server that exited before its flood row is reported by name with its exit code, not as a /proc error."""
    log = open(tmp_path / "dead.log", "wb")  # noqa: SIM115 (closed below)
    side = serve.Server("A", [sys.executable, "-c", "print('bye')"], 1, log, 1)
    try:
        side.start()
        assert side.proc is not None
        side.proc.wait(timeout=30)
        with pytest.raises(RuntimeError, match=r"^A exited with code 0"):
            ab.run_flood(None, side, 100.0, 1.0, 100.0)  # type: ignore[arg-type]  # never reaches h2load
    finally:
        log.close()
