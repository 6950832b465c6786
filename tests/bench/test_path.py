"""bench.path on a tiny run: every request is accounted for, and the command line runs two trees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import path

pytestmark = pytest.mark.timeout(120)


@pytest.mark.asyncio
async def test_measure_accounts_for_every_request(small_models: Path) -> None:
    figures = await path.measure(str(small_models), requests=600, window=300, rounds=2, model="vae")
    assert len(figures) == 2
    for rate, cpu_us in figures:
        assert rate > 0 and cpu_us > 0


@pytest.mark.asyncio
async def test_a_request_that_fails_fails_the_run(small_models: Path) -> None:
    with pytest.raises(RuntimeError, match=r"ended with code 5: .*'nope'"):  # NOT_FOUND, named
        await path.measure(str(small_models), requests=10, window=10, rounds=1, model="nope")


def test_the_command_runs_this_tree_beside_a_baseline(small_models: Path, repo_root: Path) -> None:
    args = ["--baseline", str(repo_root), "--runs", "1", "--rounds", "1", "--requests", "300", "--window", "100"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.path", *args, "--models-dir", str(small_models)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = done.stdout.splitlines()[-2:]
    assert [line.split()[0] for line in summary] == ["baseline", "this"], done.stdout


def test_a_baseline_that_is_not_a_source_tree_is_refused(tmp_path: Path, repo_root: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.path", "--baseline", str(tmp_path)], cwd=repo_root, capture_output=True, text=True, check=False
    )
    assert done.returncode == 2 and f"--baseline {tmp_path}: not a genserve source tree" in done.stderr
