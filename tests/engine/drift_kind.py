"""A tiny iterative kind for tests (engine/kinds.py ``Shape.ITERATIVE``): ``drift``, an Euler flow
with a small MLP velocity, classifier-free guidance over a null label, and a linear decoder.
Registered by ``register()`` (``load_kind_modules``), as a user's ``--kinds`` module would be."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.kinds import Kind, Shape, Steps, load_kind_modules
from engine.modelfile import export_model


@dataclass(frozen=True)
class DriftConfig:
    latent_dim: int = 4
    num_classes: int = 3  # 0: unconditional
    image_size: int = 4
    hidden: int = 16
    default_steps: int = 8
    max_steps: int = 64
    default_guidance: float = 2.0


class Drift(nn.Module):
    def __init__(self, config: DriftConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.label = nn.Embedding(c.num_classes + 1, c.hidden)  # the last row: no label (guidance's unconditional half)
        self.inp = nn.Linear(c.latent_dim + 1, c.hidden)
        self.out = nn.Linear(c.hidden, c.latent_dim)
        self.dec = nn.Linear(c.latent_dim, c.image_size * c.image_size)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = self.inp(torch.cat([x, t[:, None]], dim=1))
        if labels is not None:
            h = h + self.label(labels)
        return self.out(F.silu(h))

    def guided(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, guidance: torch.Tensor) -> torch.Tensor:
        if labels is None:
            return self.velocity(x, t, None)
        null = torch.full_like(labels, self.config.num_classes)
        v = self.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = v.chunk(2)
        return uncond + guidance[:, None] * (cond - uncond)

    def step(self, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, labels: torch.Tensor | None, guidance: torch.Tensor) -> torch.Tensor:
        return x + dt[:, None] * self.guided(x, t, labels, guidance)

    def estimate(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, guidance: torch.Tensor) -> torch.Tensor:
        return x + (1.0 - t)[:, None] * self.guided(x, t, labels, guidance)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.dec(x))

    def sample(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        c, x = self.config, z
        g = torch.full((len(z),), c.default_guidance)
        for k in range(c.default_steps):
            x = self.step(x, torch.full((len(z),), k / c.default_steps), torch.full((len(z),), 1.0 / c.default_steps), labels, g)
        return self.decode(x)


KIND = Kind(
    "drift",
    "a test's iterative kind",
    DriftConfig,
    Drift,
    Shape.ITERATIVE,
    tile=8,
    steps=lambda c: Steps(1, c.max_steps, c.default_steps, c.default_guidance if c.num_classes else 1.0),
)


def register() -> None:
    load_kind_modules([__name__])


def drift_file(path: Path, seed: int = 0, **config: int) -> Path:
    register()
    torch.manual_seed(seed)
    return export_model(path, "drift", Drift(DriftConfig(**config)))
