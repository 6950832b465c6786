"""An out-of-tree genserve model kind: ``blobs``, soft round blobs placed and sized by a latent vector.

Everything genserve needs to serve the kind is here: its config (written into each file), its
module (``forward(z, labels)`` gives images in [0, 1]) and its ``KIND``. pip-installing this
package registers the kind through the ``genserve.kinds`` entry point (pyproject.toml); without
installing it, ``python -m server --kinds path/to/genserve_blobs/__init__.py`` does the same.
Its training recipe lives in ``genserve_blobs.train`` (imported only by ``python -m training blobs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.kinds import Kind, Shape


@dataclass(frozen=True)
class BlobsConfig:
    latent_dim: int = 8  # a one-shot image kind's config has latent_dim, num_classes and image_size
    num_classes: int = 0  # unconditional
    image_size: int = 28
    blobs: int = 3  # blobs per image
    sharpness: float = 6.0  # how quickly a blob fades at its edge


class Blobs(nn.Module):
    """z -> (x, y, radius) of each blob -> a rendered image; every op is row-wise (no batch statistics)."""

    xs: torch.Tensor
    ys: torch.Tensor

    def __init__(self, config: BlobsConfig) -> None:
        super().__init__()
        self.config = config
        self.place = nn.Linear(config.latent_dim, 3 * config.blobs)
        grid = torch.linspace(-1.0, 1.0, config.image_size)
        self.register_buffer("ys", grid.view(1, 1, -1, 1).expand(1, 1, -1, config.image_size).clone())
        self.register_buffer("xs", grid.view(1, 1, 1, -1).expand(1, 1, config.image_size, -1).clone())

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        b, k = z.shape[0], self.config.blobs
        p = self.place(z).view(b, k, 3, 1, 1)
        x, y, r = torch.tanh(p[:, :, 0]), torch.tanh(p[:, :, 1]), 0.15 + 0.25 * torch.sigmoid(p[:, :, 2])
        d = ((self.xs - x) ** 2 + (self.ys - y) ** 2).sqrt() / r  # (B, k, H, W): distance in radii
        ink = torch.sigmoid(self.config.sharpness * (1.0 - d)).amax(dim=1)  # the brightest blob at each pixel
        return ink.reshape(b, -1)  # (B, H * W) in [0, 1]


KIND = Kind(
    name="blobs",
    summary="soft blobs placed by a latent vector (an out-of-tree example kind)",
    config_cls=BlobsConfig,
    module_cls=Blobs,
    shape=Shape.ONE_SHOT,
    tile=16,  # rows per forward pass: every call sees exactly this many (batch invariance)
    trainer="genserve_blobs.train:BlobsTask",
)
