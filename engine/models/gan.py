"""WGAN-GP generator and critic for 28x28 digits (Gulrajani et al. 2017).

Two architectures:
- ``conv`` (default): the paper's MNIST nets (its ``gan_mnist.py``): generator
  ``z -> Linear -> 4D x 4 x 4 -> deconv 8x8 (cropped to 7x7) -> 14x14 -> 28x28`` with ReLU and no
  batch norm, critic ``conv 5x5 stride 2`` x 3 with LeakyReLU and no normalisation (the gradient
  penalty is per sample, which batch norm would break);
- ``mlp``: fully connected nets, much cheaper on a CPU.

No layer mixes samples of a batch, so a sample depends only on its own latent vector: the
engine's per-request seeds rely on that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from engine.kinds import Kind, Shape


@dataclass(frozen=True)
class GANConfig:
    latent_dim: int = 128  # the paper's noise size
    arch: Literal["conv", "mlp"] = "conv"
    width: int = 64  # conv: the paper's DIM (channels of the last hidden layer); mlp: see hidden
    mlp_hidden: int = 512  # mlp: width of the hidden layers
    num_classes: int = 0  # > 0: conditional generator (label one-hot joins z) and critic
    image_size: int = 28


class ConvGenerator(nn.Module):
    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        d = cfg.width
        self.d = d
        self.fc = nn.Linear(cfg.latent_dim + cfg.num_classes, 4 * 4 * 4 * d)
        self.up1 = nn.ConvTranspose2d(4 * d, 2 * d, 5, stride=2, padding=2, output_padding=1)  # 4->8
        self.up2 = nn.ConvTranspose2d(2 * d, d, 5, stride=2, padding=2, output_padding=1)  # 7->14
        self.up3 = nn.ConvTranspose2d(d, 1, 5, stride=2, padding=2, output_padding=1)  # 14->28

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc(h)).view(-1, 4 * self.d, 4, 4)  # (B, 4D, 4, 4)
        x = F.relu(self.up1(x))[:, :, :7, :7]  # (B, 2D, 7, 7): the paper's crop
        x = F.relu(self.up2(x))  # (B, D, 14, 14)
        return torch.sigmoid(self.up3(x)).flatten(1)  # (B, 784)


class ConvCritic(nn.Module):
    def __init__(self, cfg: GANConfig, spectral: bool) -> None:
        super().__init__()
        d = cfg.width
        c = cfg.num_classes
        wrap = spectral_norm if spectral else (lambda m: m)
        self.conv1 = wrap(nn.Conv2d(1 + c, d, 5, stride=2, padding=2))  # 28->14
        self.conv2 = wrap(nn.Conv2d(d, 2 * d, 5, stride=2, padding=2))  # 14->7
        self.conv3 = wrap(nn.Conv2d(2 * d, 4 * d, 5, stride=2, padding=2))  # 7->4
        self.out = wrap(nn.Linear(4 * 4 * 4 * d, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.conv1(x), 0.2)
        x = F.leaky_relu(self.conv2(x), 0.2)
        x = F.leaky_relu(self.conv3(x), 0.2)
        return self.out(x.flatten(1)).squeeze(1)  # (B,)


class MLPGenerator(nn.Module):
    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        h = cfg.mlp_hidden
        self.fc1 = nn.Linear(cfg.latent_dim + cfg.num_classes, h)
        self.fc2 = nn.Linear(h, h)
        self.fc3 = nn.Linear(h, cfg.image_size * cfg.image_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc2(F.relu(self.fc1(h))))
        return torch.sigmoid(self.fc3(x))


class MLPCritic(nn.Module):
    def __init__(self, cfg: GANConfig, spectral: bool) -> None:
        super().__init__()
        h = cfg.mlp_hidden
        n = cfg.image_size * cfg.image_size
        wrap = spectral_norm if spectral else (lambda m: m)
        self.fc1 = wrap(nn.Linear(n + cfg.num_classes, h))
        self.fc2 = wrap(nn.Linear(h, h))
        self.out = wrap(nn.Linear(h, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.fc1(x.flatten(1)), 0.2)
        x = F.leaky_relu(self.fc2(x), 0.2)
        return self.out(x).squeeze(1)


class Generator(nn.Module):
    """What is exported and served: ``(z, labels) -> images in [0, 1]``, shape (B, 784)."""

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.config = config
        self.net: nn.Module = ConvGenerator(config) if config.arch == "conv" else MLPGenerator(config)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.num_classes:
            if labels is None:
                raise ValueError("this generator is conditional: labels are required")
            z = torch.cat([z, F.one_hot(labels, self.config.num_classes).to(z.dtype)], dim=1)
        out: torch.Tensor = self.net(z)
        return out


class Critic(nn.Module):
    """Wasserstein critic (training only; not exported): images (B, 784) -> scores (B,)."""

    def __init__(self, config: GANConfig, spectral: bool = False) -> None:
        super().__init__()
        self.config = config
        self.net: nn.Module = ConvCritic(config, spectral) if config.arch == "conv" else MLPCritic(config, spectral)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        s = self.config.image_size
        c = self.config.num_classes
        if self.config.arch == "conv":
            x = x.view(-1, 1, s, s)
            if c:
                assert labels is not None
                # label as constant one-hot planes, the usual conditional-critic input
                planes = F.one_hot(labels, c).to(x.dtype)[:, :, None, None].expand(-1, c, s, s)
                x = torch.cat([x, planes], dim=1)
        elif c:
            assert labels is not None
            x = torch.cat([x.flatten(1), F.one_hot(labels, c).to(x.dtype)], dim=1)
        out: torch.Tensor = self.net(x)
        return out


KIND = Kind(
    "wgan-gp",
    "WGAN-GP generator",
    GANConfig,
    Generator,
    Shape.ONE_SHOT,
    tile=16,  # chosen with python -m bench.tiles (docs/design/tiling.md)
    trainer="training.gan:GANTask",
    command="gan",
)
