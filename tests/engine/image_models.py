"""Tiny models of every served image architecture, and the documented recipe written out independently."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.images import ImageGenerator
from engine.limits import ImageLimits
from engine.modelfile import LoadedModel
from engine.models.gan import GANConfig, Generator
from engine.models.vae import VAE, VAEConfig

# Tiny models of every served image architecture; conditional ones take labels 0..9. The
# conditional ones have 16 hidden units, not 8: MKL's AVX-512 kernels (seen on an AMD EPYC) give
# a row of a layer with under ~10 outputs and an odd number of inputs (13 = 3 latents + 10
# labels) floats that depend on the row's place in its tile, which no tiling can undo; the
# registry warns of such a model at load (ImageGenerator.batch_invariant).
BUILDERS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "vae": ("vae", lambda: VAE(VAEConfig(hidden_dim=8, latent_dim=3))),
    "cvae": ("vae", lambda: VAE(VAEConfig(hidden_dim=16, latent_dim=3, num_classes=10))),
    "gan-mlp-cond": ("wgan-gp", lambda: Generator(GANConfig(latent_dim=4, arch="mlp", mlp_hidden=16, num_classes=10))),
    "gan-conv": ("wgan-gp", lambda: Generator(GANConfig(latent_dim=4, arch="conv", width=2))),
}
CONDITIONAL = ("cvae", "gan-mlp-cond")


def gen(models: dict[str, LoadedModel], name: str, max_n: int = 64, max_batch: int = 64) -> ImageGenerator:
    return ImageGenerator(models[name], ImageLimits(max_n=max_n, max_batch=max_batch))


def expected_floats(model: LoadedModel, n: int, seed: int, labels: list[int] | None = None) -> torch.Tensor:
    """The documented recipe, written out independently: z ~ N(0, I) from the request's own generator, then labels."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, model.config.latent_dim), generator=g)
    lab: torch.Tensor | None = None
    if model.config.num_classes:
        lab = torch.tensor(labels) if labels is not None else torch.randint(0, model.config.num_classes, (n,), generator=g)
    with torch.no_grad():
        module = model.module
        x = module.decode(z, lab) if isinstance(module, VAE) else module(z, lab)
    return x.reshape(n, 28, 28)
