"""An out-of-tree model kind, installed as a user would (``pip install``, its ``genserve.kinds``
entry point) or named by ``--kinds``, trained by ``python -m training`` and served end to end:
ListModels, batching with per-request seeds, admission, deadlines, live reload.

The kind is the example package under tests/kinds/genserve-blobs (docs/kinds.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clients import Client, DeadlineExceeded, InvalidRequest
from tests.paths import ROOT
from tests.serving import ServerProcess, run_server_cli

PACKAGE = ROOT / "tests" / "kinds" / "genserve-blobs"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example kind pip-installed into a folder of its own (its dist-info carries the entry point)."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("src") / "genserve-blobs"
    shutil.copytree(PACKAGE, build)  # setuptools writes build/ and *.egg-info beside the sources: not into the repo
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(build)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return target


def with_site(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def trained(site: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m training blobs``: the plugin's recipe through genserve's training loop."""
    run = tmp_path_factory.mktemp("run") / "blobs"
    out = subprocess.run(
        [sys.executable, "-m", "training", "blobs", "--epochs", "1", "--batch-size", "2048", "--run-dir", str(run), "--threads", "1"],
        cwd=ROOT,
        env={**os.environ, **with_site(site)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return run / "model.safetensors"


@pytest.fixture()
def served(site: Path, trained: Path, tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(trained, models / "blobs.safetensors")
    shutil.copy(ROOT / "models" / "vae.safetensors", models / "vae.safetensors")
    proc = ServerProcess("--models-dir", str(models), "--models-poll-s", "0.2", "--models-settle-s", "0.2", env=with_site(site))
    try:
        proc.wait_for("server_ready", timeout=120)
        yield proc, models
    finally:
        proc.stop()


def test_training_lists_the_installed_kind(site: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "training", "--help"], cwd=ROOT, env={**os.environ, **with_site(site)}, capture_output=True, text=True
    )
    assert "blobs" in out.stdout and "train the blobs example kind" in out.stdout


def test_an_installed_kind_is_served_end_to_end(served: tuple[ServerProcess, Path]) -> None:
    proc, models = served
    address = proc.wait_for("server_ready")["address"]
    with Client(address, timeout=30) as client:
        info = {m.name: m for m in client.list_models()}
        assert info["blobs"].kind == "blobs" and "out-of-tree" in info["blobs"].summary
        assert info["blobs"].image is not None and info["blobs"].image.latent_dim == 8 and not info["blobs"].image.conditional

        # batching: many requests at once, each equal to itself alone (per-request seeds, fixed tiles)
        alone = client.generate_images("blobs", 3, seed=11)
        assert alone.shape == (3, 28, 28) and alone.dtype == np.uint8 and alone.max() > 0
        with client.session() as session:
            futures = [session.submit_images("blobs", 1 + i % 3, seed=i) for i in range(48)]
            batch = [f.result(timeout=60) for f in futures]
        eleventh = batch[11]  # seed 11, n = 1 + 11 % 3 = 3
        assert eleventh.seed == 11
        np.testing.assert_array_equal(eleventh.images, alone)

        # admission: the kind's rules, through the engine (unconditional: labels refused, naming the field)
        with pytest.raises(InvalidRequest, match="labels"):
            client.generate_images("blobs", 2, labels=[1, 2])
        with pytest.raises(InvalidRequest, match="n must be"):
            client.generate_images("blobs", 10**6)
        # a deadline that cannot be met ends the request, and the server goes on serving
        with pytest.raises(DeadlineExceeded):
            client.generate_images("blobs", 1000, seed=1, timeout=0.001)
        assert client.generate_images("blobs", 1, seed=2).shape == (1, 28, 28)

        # live reload: a second version dropped into the folder is served beside the first
        shutil.copy(models / "blobs.safetensors", models / "blobs@2.safetensors")
        proc.wait_for("model_loaded", timeout=30, count=3)  # vae, blobs, then blobs@2
        versions = sorted(m.version for m in client.list_models() if m.name == "blobs")
        assert versions == [1, 2]
        np.testing.assert_array_equal(client.generate_images("blobs", 3, seed=11, version=2), alone)


def test_kinds_flag_loads_a_kind_from_a_file(trained: Path, tmp_path: Path) -> None:
    """Without installing: --kinds names the module file."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(trained, models / "blobs.safetensors")
    proc = ServerProcess("--models-dir", str(models), "--kinds", str(PACKAGE / "genserve_blobs" / "__init__.py"))
    try:
        ready = proc.wait_for("server_ready", timeout=120)
        with Client(ready["address"], timeout=30) as client:
            assert client.generate_images("blobs", 2, seed=3).shape == (2, 28, 28)
    finally:
        proc.stop()


def test_a_file_of_an_unknown_kind_is_refused_naming_the_known_ones(trained: Path, tmp_path: Path) -> None:
    """The plugin not installed: its file is refused by name, and the server says why it has nothing to serve."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(trained, models / "blobs.safetensors")
    out = run_server_cli("--models-dir", str(models), "--port", "0", "--metrics-port", "0")
    assert out.returncode != 0
    assert "unknown model kind 'blobs' (known: ['char-transformer', " in out.stderr and "blobs.safetensors" in out.stderr


def test_a_kind_module_that_cannot_be_imported_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken_kind.py"
    bad.write_text("raise ImportError('no such thing')\n")
    out = run_server_cli("--kinds", str(bad), "--port", "0", "--metrics-port", "0")
    assert out.returncode != 0
    assert f"--kinds (GENSERVE_KINDS): --kinds: kind module '{bad}' failed to import: ImportError: no such thing" in out.stderr
    empty = tmp_path / "no_kind.py"
    empty.write_text("X = 1\n")
    out = run_server_cli("--kinds", str(empty), "--port", "0", "--metrics-port", "0")
    assert out.returncode != 0 and "defines no kind" in out.stderr
