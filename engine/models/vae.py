"""Variational auto-encoder on 28x28 digits (Kingma & Welling 2014), the reference script's 784-400-20 MLP.

Encoder ``784 (+classes) -> hidden (act) -> 2*latent`` gives mu and log sigma^2; decoder
``latent (+classes) -> hidden (act) -> 784`` gives per-pixel logits. A conditional VAE appends a
one-hot digit label to both inputs (``num_classes > 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from engine.kinds import Kind, Shape


@dataclass(frozen=True)
class VAEConfig:
    input_dim: int = 784  # 28 x 28 pixels, flattened
    hidden_dim: int = 400  # the reference script's width
    latent_dim: int = 20
    activation: Literal["tanh", "relu"] = "tanh"  # the reference script uses tanh
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"  # gaussian = the reference script's squared error
    # Fixed output std of the Gaussian likelihood; sqrt(0.5) makes its NLL the reference script's summed
    # squared error plus a constant.
    output_std: float = 0.7071067811865476
    num_classes: int = 0  # > 0: conditional VAE, label one-hot on encoder and decoder inputs
    image_size: int = 28


def _activation(name: str) -> nn.Module:
    if name == "tanh":
        return nn.Tanh()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}")


class MLP2(nn.Module):
    """``in -> hidden (act) -> out``; named submodules give readable tensor names."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int, activation: str) -> None:
        super().__init__()
        self.hidden = nn.Linear(n_in, n_hidden)
        self.act = _activation(activation)
        self.out = nn.Linear(n_hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.hidden(x)))


class VAE(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        c = config.num_classes
        self.encoder = MLP2(config.input_dim + c, config.hidden_dim, 2 * config.latent_dim, config.activation)
        self.decoder = MLP2(config.latent_dim + c, config.hidden_dim, config.input_dim, config.activation)

    def _with_label(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.config.num_classes == 0:
            return x
        if labels is None:
            raise ValueError("this VAE is conditional: labels are required")
        return torch.cat([x, F.one_hot(labels, self.config.num_classes).to(x.dtype)], dim=1)

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(self._with_label(x, labels))  # (B, 2 * latent)
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar

    def decode_logits(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(self._with_label(z, labels))  # (B, 784)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean image in [0, 1], shape (B, 784)."""
        return torch.sigmoid(self.decode_logits(z, labels))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(z, labels)

    def reconstruction_nll(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) in nats, summed over pixels, shape (B,)."""
        if self.config.likelihood == "bernoulli":
            return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=1)
        std = self.config.output_std
        mean = torch.sigmoid(logits)
        const = 0.5 * math.log(2 * math.pi * std**2)
        return (0.5 * ((x - mean) / std) ** 2 + const).sum(dim=1)

    def negative_elbo(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        beta: float = 1.0,
        eps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image (reconstruction NLL, KL, reconstruction + beta * KL), each shape (B,).

        ``eps`` (B, latent) fixes the reparameterisation noise (validation uses one fixed draw).
        """
        mu, logvar = self.encode(x, labels)
        if eps is None:
            eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps  # reparameterisation trick
        rec = self.reconstruction_nll(self.decode_logits(z, labels), x)
        kl = gaussian_kl(mu, logvar)
        return rec, kl, rec + beta * kl


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) in closed form, summed over latent dims, shape (B,)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


KIND = Kind(
    "vae",
    "variational auto-encoder (decoder serves images)",
    VAEConfig,
    VAE,  # forward(z, labels) is the decoder's mean image
    Shape.ONE_SHOT,
    tile=32,  # chosen with python -m bench.tiles (docs/design/tiling.md)
    trainer="training.vae:VAETask",
    figures="training.vae:evaluation_figures",
)
