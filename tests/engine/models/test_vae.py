"""The VAE (engine/models/vae.py): its closed-form KL, and it overfits one small batch."""

from __future__ import annotations

import math

import pytest
import torch

from engine.models.vae import VAE, VAEConfig, gaussian_kl
from tests.engine.models.toy_data import blobs


def test_gaussian_kl_is_zero_for_the_prior() -> None:
    mu = torch.zeros(3, 5)
    logvar = torch.zeros(3, 5)
    assert torch.equal(gaussian_kl(mu, logvar), torch.zeros(3))


def test_gaussian_kl_matches_monte_carlo() -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([[0.5, -1.0, 0.0, 2.0], [0.0, 0.3, -0.7, 0.1]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, -1.0, 1.0, 0.5], [-2.0, 0.4, 0.0, 1.5]], dtype=torch.float64)
    closed = gaussian_kl(mu, logvar)
    assert closed.shape == (2,)

    n = 200_000
    for row in range(2):
        sigma = torch.exp(0.5 * logvar[row])
        eps = torch.randn(n, 4, generator=g, dtype=torch.float64)
        z = mu[row] + sigma * eps
        # log q(z) - log p(z), summed over dims; the 0.5 log(2 pi) constants cancel
        log_ratio = (-0.5 * eps**2 - 0.5 * logvar[row] + 0.5 * z**2).sum(dim=1)
        estimate = log_ratio.mean()
        stderr = log_ratio.std() / math.sqrt(n)
        assert abs(float(estimate - closed[row])) < 5 * float(stderr), (float(estimate), float(closed[row]), float(stderr))
        assert float(stderr) < 0.02  # the check is tight enough to catch a wrong formula


def test_gaussian_kl_known_value() -> None:
    # one dim, mu = 1, sigma^2 = e: KL = 0.5 * (e + 1 - 1 - 1) = 0.5 * (e - 1)
    kl = gaussian_kl(torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64))
    assert float(kl) == pytest.approx(0.5 * (math.e - 1), abs=1e-12)


def test_vae_overfits_one_batch() -> None:
    torch.manual_seed(0)
    x = blobs(8, torch.Generator().manual_seed(0))
    model = VAE(VAEConfig(hidden_dim=64, latent_dim=4))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    fixed_eps = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))

    def loss_now() -> float:
        with torch.no_grad():
            return float(model.negative_elbo(x, eps=fixed_eps)[2].mean())

    start = loss_now()
    for _ in range(300):
        rec, kl, loss = model.negative_elbo(x)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    end = loss_now()
    with torch.no_grad():
        rec, kl, _ = model.negative_elbo(x, eps=fixed_eps)
    assert (rec >= 0).all() and (kl >= 0).all()  # a Bernoulli -ELBO cannot go below 0
    assert start > 400  # ~784 ln 2 nats for an untrained Bernoulli decoder
    assert end < 0.2 * start, (start, end)
