"""bench.peers' accounting and report on a tiny fake run: no peers, no servers, no h2load needed."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import peers_report
from bench.h2load import Run, command, read_log_statuses
from bench.peer_apps import seed_of
from bench.peers import admitted_pct_ms, h2load_figures, open_load, sides, training_section
from bench.serve import plain
from tests.paths import ROOT


def fake_run(durations_s: list[float], statuses: list[int] | None = None, started: int | None = None, wall_s: float = 2.0) -> Run:
    d = np.asarray(durations_s, dtype=np.float64)
    codes = np.asarray(statuses if statuses is not None else [], dtype=np.int32)
    n = len(durations_s)
    return Run(n, started if started is not None else n, n, n, 0, wall_s, d, "", codes)


def test_http_side_counts_its_statuses_from_the_log() -> None:
    run = fake_run([0.010] * 8 + [0.001, 0.002], [200] * 8 + [503, 500], started=12)
    f = h2load_figures(run, None, offered=6.0)
    assert f["req_s"] == 4.0  # 8 OK in 2 s
    assert f["refused"] == 1  # 503 is a refusal, 500 is not
    assert f["not_ok"] == {"HTTP 500": 1, "HTTP 503": 1, "unanswered at the end": 2}
    assert f["p99_ms"] == pytest.approx(10.0)  # OK calls only: the fast failures do not lower it
    assert f["p99_exact"]


def test_grpc_side_takes_the_admitted_to_be_the_slowest_answers() -> None:
    durations = [0.0005] * 50 + [0.020 + i * 0.001 for i in range(50)]  # 50 refusals first back, 50 admitted
    run = fake_run(durations, started=103)
    f = h2load_figures(run, {"OK": 50, "RESOURCE_EXHAUSTED": 50, "CANCELLED": 2}, offered=100.0)
    assert f["req_s"] == 25.0
    assert f["refused"] == 50
    assert f["p99_ms"] == pytest.approx(69.0)  # the slowest of the 50 admitted (inverted cdf): not a refusal's 0.5 ms
    assert not f["p99_exact"] and math.isnan(f["p50_ms"])
    # the 2 CANCELLED are 2 of the 3 calls h2load left open at the end: counted once, as unanswered
    assert f["not_ok"] == {"RESOURCE_EXHAUSTED": 50, "unanswered at the end": 3}


def test_closed_loop_does_not_list_the_calls_in_flight_at_the_end() -> None:
    f = h2load_figures(fake_run([0.001] * 10, started=14), {"OK": 10})
    assert f["not_ok"] == {} and f["p99_exact"]
    assert math.isnan(admitted_pct_ms(np.zeros(0), 5, 99)) and math.isnan(admitted_pct_ms(np.ones(3), 0, 99))


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load is not installed (scripts/bench_setup.sh)")
def test_h2load_command_for_an_http_peer(tmp_path: Path) -> None:
    cmd = command(8000, tmp_path / "b", tmp_path / "l", duration_s=1.5, connections=64, path="/predict", headers=("x: y",), h1=True)
    assert "--h1" in cmd and cmd[-1] == "http://127.0.0.1:8000/predict"
    assert cmd[cmd.index("-m") + 1] == "1" and cmd[cmd.index("-D") + 1] == "1500ms"
    assert "content-type: application/grpc" not in cmd
    log = tmp_path / "log"
    log.write_text("1\t200\t1500\n2\t503\t20\nbad line\n")
    durations, codes = read_log_statuses(log)
    assert durations.tolist() == [0.0015, 0.00002] and codes.tolist() == [200, 503]


def test_open_loop_connections_never_raise_the_rate() -> None:
    http = next(s for s in sides(1) if s.kind == "http")
    assert open_load(http, 100.0)["connections"] == 50  # each sends 2/s: h2load's --rps is per connection
    assert open_load(http, 1e6)["connections"] == 256
    assert open_load(http, 1.0)["connections"] == 1


def test_peer_request_is_checked_by_name() -> None:
    assert seed_of({"seed": 7}) == 7 and seed_of({}) == 0
    for bad in ({"seed": "x"}, {"seed": -1}, {"seed": True}, [1]):
        with pytest.raises(ValueError, match="seed must be an integer"):
            seed_of(bad)


def fake_out() -> dict[str, Any]:
    def row(side: str, mode: str, req_s: float, p99: float, **kw: Any) -> dict[str, Any]:
        base = {"side": side, "mode": mode, "req_s": req_s, "p50_ms": p99 / 2, "p99_ms": p99, "not_ok": {}, "refused": 0}
        return base | {"in_flight": 64, "offered_req_s": None, "p99_exact": True} | kw

    serving = [
        row("genserve Generate", "closed", 3000.0, 20.0),
        row("genserve Generate", "open", 1500.0, 5.0, fraction=0.5, offered_req_s=1500.0),
        row("genserve Generate", "overload", 2900.0, 30.0, offered_req_s=6000.0, refused=3000, p99_exact=False,
            not_ok={"RESOURCE_EXHAUSTED": 3000}, rss_peak_mb=500.0),
        row("LitServe", "closed", 600.0, 100.0),
        row("LitServe", "overload", 300.0, float("inf"), p50_ms=50.0, offered_req_s=1200.0, not_ok={"HTTP 504": 7}, rss_peak_mb=400.0),
    ]  # fmt: skip
    machine = {"date": "2026-12-01 10:00 UTC", "cpu_model": "Fake CPU", "usable_cores": 2, "cpu_count": 2, "threads": 1}
    machine |= {"load_avg_at_start": 0.5, "python": "3.11", "versions": {"torch": "2", "ray": None}, "quick": True}
    return {
        "machine": machine,
        "plan": {"text_tokens": 16},
        "settings": {"genserve Generate": "defaults", "LitServe": "batch 32"},
        "skipped": {"Ray Serve": "ray is not installed"},
        "serving": serving,
        "text": [{"system": "HF generate", "streams": 1, "tokens_s": 80.0, "ttft_ms": 11.0}],
        "engine": [{"batch": 1, "engine_ms": 0.3, "bare_ms": 0.2, "ort_ms": 0.1, "engine_over_bare": 1.5, "engine_over_ort": 3.0}],
        "training": [],
        "total_s": 61.0,
    }


def test_headline_compares_every_side_with_litserve() -> None:
    rows = {r["side"]: r for r in peers_report.headline(plain(fake_out()))}
    g = rows["genserve Generate"]
    assert g["x_litserve"] == 5.0 and g["half_p99_ms"] == 5.0 and g["over_goodput"] == 2900.0 and g["over_refused"] == 3000
    assert rows["LitServe"]["x_litserve"] == 1.0 and rows["LitServe"]["over_p99_ms"] == math.inf


def test_report_and_plots_are_written(tmp_path: Path) -> None:
    written = peers_report.write(fake_out(), tmp_path / "REPORT.md")
    assert [p.name for p in written] == ["REPORT.md", *peers_report.PLOTS]
    for p in written[1:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "REPORT.md").read_text()
    assert "| genserve Generate | 3,000 (64) | 20.0 | 5.00 | 5.00 | 2,900 (6,000) | 30.0 | 3000 | 500 |" in text
    assert "| LitServe | overload | 1,200/s | 300 | 50.0 | inf | HTTP 504 7 |" in text
    assert "30.0*" in text  # the estimated p99 of the admitted is marked
    assert "| Generate best req/s / LitServe's | 5.00 | >= 5 | met |" in text
    assert "| GenerateStream best req/s / LitServe's | - | >= 10 | n/a |" in text
    assert "| Generate p99 at half load / the best peer's | - | < 1 | n/a |" in text  # LitServe has no half-load point
    assert "| Generate overload goodput / the best peer's | 9.67 | > 1 | met |" in text
    assert "**Ray Serve**: not measured: ray is not installed" in text
    assert "Fake CPU" in text and "2026-12-01" in text and "ray" not in text.split("Versions:")[1].split("\n")[0]
    json.dumps(plain(fake_out()), allow_nan=False)  # strict JSON: inf and nan become strings and nulls


def test_training_rows_come_from_the_run_records(tmp_path: Path) -> None:
    record = {"kind": "vae", "epochs_run": 3, "best_epoch": 2, "best_val_loss": 101.5, "train_seconds": 9.0}
    record["history"] = [{"epoch": i, "seconds": s} for i, s in enumerate([1.0, 3.0, 2.0])]
    (tmp_path / "vae_metrics.json").write_text(json.dumps(record))
    [row] = training_section(tmp_path)
    assert row["s_per_epoch"] == 2.0 and row["quality"] == 101.5 and row["epochs"] == 3
    assert "pytorch/examples" in row["reference"]


def test_fastapi_peer_serves_one_image_as_json() -> None:
    """The real peer app, when the peers extra is installed (skipped otherwise)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    port = 52090 + os.getpid() % 10
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.peer_apps", "fastapi", "--port", str(port), "--threads", "1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the FastAPI peer did not start"
                time.sleep(0.2)  # bounded poll of the port: no event to wait on across processes
        req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=b'{"seed": 3}', headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = json.loads(r.read())
        import base64

        assert body["seed"] == 3 and len(base64.b64decode(body["image"])) == 28 * 28
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_rewrite_keeps_the_text_load_section(tmp_path: Path) -> None:
    section = f"{peers_report.TEXT_LOAD_BEGIN}\n## Text under an open loop\n\n| x |\n{peers_report.TEXT_LOAD_END}\n"
    (tmp_path / "REPORT.md").write_text("# old report\n\n" + section)
    peers_report.write(fake_out(), tmp_path / "REPORT.md")
    text = (tmp_path / "REPORT.md").read_text()
    assert "# old report" not in text and text.count(peers_report.TEXT_LOAD_BEGIN) == 1 and section.strip() in text
