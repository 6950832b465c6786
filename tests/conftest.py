"""Shared set-up: one CPU thread, tidy logging between tests (pytest puts the repo root on sys.path)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.logs import configure_logging


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """The machine is shared with training runs: keep every test on one core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """``main()`` binds structlog to the sys.stderr of the moment (capsys's, say); rebind it afterwards."""
    yield
    configure_logging("console")


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
def small_models(tmp_path: Path, repo_root: Path) -> Path:
    """A models folder with one image model and one text model (links to the bundled ones): a
    server process starts, loads and calibrates less."""
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("vae", "transformer"):
        (folder / f"{name}.safetensors").symlink_to(repo_root / "models" / f"{name}.safetensors")
    return folder
