"""The image tests' models: each tiny model of tests/engine/image_models.py exported and loaded back, once per module."""

from __future__ import annotations

import pytest
import torch

from engine.modelfile import LoadedModel, export_model, load_model
from tests.engine.image_models import BUILDERS


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    """Each tiny model exported and loaded back, as the registry does."""
    folder = tmp_path_factory.mktemp("models")
    out: dict[str, LoadedModel] = {}
    for i, (name, (kind, build)) in enumerate(BUILDERS.items()):
        torch.manual_seed(i)
        out[name] = load_model(export_model(folder / f"{name}.safetensors", kind, build()))
    return out
