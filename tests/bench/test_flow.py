"""bench.flow: its open loop repeats, its statistics count refusals as the slowest, and a tiny run
against an iterative model compares both batching modes (no timed assertions)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from bench.flow import STEPS, Point, best, main, percentile, schedule
from tests.engine.drift_kind import drift_file
from tests.paths import ROOT


def test_the_schedule_repeats_for_a_seed_and_draws_the_stated_mixture() -> None:
    a, b = schedule(50.0, 4.0, seed=3), schedule(50.0, 4.0, seed=3)
    assert a == b and a != schedule(50.0, 4.0, seed=4)
    assert 120 < len(a) < 280  # about 200 arrivals
    assert {c.steps for c in a} == set(STEPS) and {c.n for c in a} == {1, 2, 3, 4}
    assert all(x.at < y.at for x, y in itertools.pairwise(a))


def test_percentiles_count_a_refused_call_as_the_slowest() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0] * 99 + [math.inf], 99) == 1.0
    assert percentile([1.0] * 98 + [math.inf] * 2, 99) == math.inf
    assert percentile([], 50) == math.inf


def test_best_is_the_highest_rate_within_the_bound() -> None:
    points = [Point(rate=r, p99_ms=p) for r, p in ((1, 10), (2, 20), (4, 5000), (8, 30))]
    top = best(points, 100.0)
    assert top is not None and top.rate == 8
    assert best([Point(rate=1, p99_ms=math.inf)], 100.0) is None


@pytest.mark.timeout(120)
def test_a_tiny_run_compares_both_modes(tmp_path: Path) -> None:
    drift_file(tmp_path / "drift.safetensors")
    out = tmp_path / "flow.json"
    args = ["--model", "drift", "--models-dir", str(tmp_path), "--kinds", str(ROOT / "tests" / "engine" / "drift_kind.py")]
    args += ["--duration", "1", "--start-rate", "10", "--max-rate", "10", "--json", str(out)]
    assert main(args) == 0
    results = json.loads(out.read_text())
    assert set(results["modes"]) == {"step", "request"}
    for mode in results["modes"].values():
        (point,) = mode["points"]
        assert point["sent"] > 0 and point["ok"] + sum(point["failed"].values()) == point["sent"]
    echo = results["echo"]  # the same client against the bare echo, at the highest rate and twice it
    assert [p["rate"] for p in echo] == [10.0, 20.0]
    assert all(p["ok"] == p["sent"] > 0 for p in echo)
