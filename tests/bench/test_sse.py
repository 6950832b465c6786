"""bench.sse: text over SSE beside gRPC from one server (a tiny run: the figures are the benchmark's, not the test's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import sse

pytestmark = pytest.mark.timeout(180)


def test_a_round_measures_both_sides_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "sse.json"
    assert sse.main(["--streams", "2", "--tokens", "5", "--rounds", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    [round_] = result["rounds"]
    assert round_["grpc_tokens_per_s"] > 0 and round_["sse_tokens_per_s"] > 0
    assert result["median_ratio"] == pytest.approx(round_["sse_tokens_per_s"] / round_["grpc_tokens_per_s"])
