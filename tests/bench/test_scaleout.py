"""``python -m bench.scaleout`` on a tiny run: its gRPC half counts calls by gRPC status from the
group's /metrics, so its rate is of OK calls and every answered call is accounted for; its AMQP
half, driven by bench/amqp/load.mjs, counts OK replies from the server's counters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import h2load
from tests.paths import ROOT

pytestmark = [pytest.mark.timeout(240), pytest.mark.skipif(shutil.which("h2load") is None, reason=h2load.INSTALL_HINT)]


def test_the_grpc_half_reports_ok_calls_and_nothing_unaccounted(tmp_path: Path) -> None:
    out = tmp_path / "scaleout.json"
    args = ["--duration", "1", "--warmup", "1", "--workers", "1", "--connections", "2", "--streams", "4"]
    args += ["--amqp-url", "amqp://guest:guest@127.0.0.1:1/", "--json", str(out)]  # no broker there: the AMQP half is skipped
    result = subprocess.run([sys.executable, "-m", "bench.scaleout", *args], cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "amqp: no broker reachable, skipped" in result.stdout
    [point] = json.loads(out.read_text())["grpc"]
    assert point["workers"] == 1 and point["ok"] > 0 and point["unseen"] == 0
    # CANCELLED: calls cut when h2load stopped; RESOURCE_EXHAUSTED: refused on a busy machine, not in the rate
    assert point["by_status"]["OK"] == point["ok"] and set(point["by_status"]) <= {"OK", "CANCELLED", "RESOURCE_EXHAUSTED"}
    assert point["calls_per_s"] > 0 and point["ok"] <= point["started"]  # OK may exceed done: calls cut at the end, served


def test_the_amqp_half_with_the_node_client_counts_ok_replies(tmp_path: Path) -> None:
    from bench.scaleout import broker_up, node_available

    url = "amqp://guest:guest@127.0.0.1:5672/"
    if not node_available():
        pytest.skip("node or bench/amqp's amqplib is missing: run scripts/bench_setup.sh")
    if not broker_up(url):
        reason = "no RabbitMQ broker at 127.0.0.1:5672 (start one: rabbitmq-server -detached)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true requires the broker tests")
        pytest.skip(reason)
    out = tmp_path / "scaleout.json"
    args = ["--duration", "1", "--warmup", "1", "--workers", "", "--servers", "1", "--amqp-driver", "node", "--inflight", "8"]
    args += ["--amqp-url", url, "--json", str(out)]
    result = subprocess.run([sys.executable, "-m", "bench.scaleout", *args], cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["grpc"] == []
    [point] = report["amqp"]
    assert point["servers"] == 1 and point["driver"] == "node" and point["duplicates"] == 0
    # the rate is of the OK replies the server counted; the client saw replies to (nearly) as many
    assert point["by_status"]["OK"] > 0 and set(point["by_status"]) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert point["calls_per_s"] > 0 and point["done"] > 0
