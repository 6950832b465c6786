"""bench.text_mix: a short run over the bundled model accounts for every step's time and every request (no timed assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.text_mix import PARTS, main


@pytest.mark.timeout(180)
def test_a_quick_run_accounts_for_each_steps_time_and_every_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mix.json"
    assert main(["--rates", "6,20", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["rate"] for r in rows] == [6.0, 20.0]
    for r in rows:
        assert r["requests"] > 0 and r["tokens_per_s"] > 0
        assert sum(r["shares"][p] for p in PARTS) == pytest.approx(1.0)
        assert all(r["shares"][p] >= 0 for p in PARTS[:3])
        assert 0 <= r["prefill_padding"] < 1 and r["longest_step"]["ms"] >= r["step_ms"]["plain_p50"]
        assert r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"]
    assert "decode step under bench.text_load's mix" in capsys.readouterr().out


def test_bad_rates_are_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--rates", "fast"])
    assert "--rates takes numbers" in capsys.readouterr().err
