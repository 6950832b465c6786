"""Model files made to be refused: a tiny model, safetensors written by hand, a pickle that gives
itself away, and the full-message regex a refusal must match."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.models.vae import VAE, VAEConfig


def tiny_vae(num_classes: int = 0) -> VAE:
    return VAE(VAEConfig(hidden_dim=8, latent_dim=3, num_classes=num_classes))


def expect(path: Path, reason: str, tensor: str | None = None, any_tensor: bool = False) -> str:
    """The full-message regex: ``<path>: [tensor 'name': ]<reason>``."""
    where = re.escape(str(path)) + ": "
    if tensor:
        where += re.escape(f"tensor {tensor!r}: ")
    elif any_tensor:
        where += r"tensor '[^']+': "
    return "^" + where + reason


def save_st(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """save_file, returning the path."""
    save_file(tensors, str(path), metadata=metadata or None)
    return path


class PickleCanary:
    """Unpickling this creates a folder: proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))
