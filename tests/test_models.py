"""Model maths and architecture properties: KL, gradient penalty, causality, per-sample generation, overfitting."""

from __future__ import annotations

import math
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.models.gan import Critic, GANConfig, Generator
from engine.models.transformer import CharTransformer, TransformerConfig
from engine.models.vae import VAE, VAEConfig, gaussian_kl
from training.gan import gradient_penalty

# -- closed-form KL ---------------------------------------------------------------------------


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


# -- gradient penalty -------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [0.25, 1.0, 3.0])
def test_gradient_penalty_of_linear_critic(norm: float) -> None:
    torch.manual_seed(1)
    lin = nn.Linear(784, 1, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(F.normalize(torch.randn(1, 784, dtype=torch.float64), dim=1) * norm)
    real = torch.rand(16, 784, dtype=torch.float64)
    fake = torch.rand(16, 784, dtype=torch.float64)
    gp = gradient_penalty(lambda x: lin(x).squeeze(1), real, fake, generator=torch.Generator().manual_seed(0))
    assert float(gp.detach()) == pytest.approx((norm - 1) ** 2, abs=1e-12)
    # create_graph=True: the penalty trains the critic, d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    gp.backward()
    expected = 2 * (norm - 1) * lin.weight.detach() / norm
    assert lin.weight.grad is not None
    torch.testing.assert_close(lin.weight.grad, expected, atol=1e-12, rtol=1e-9)


def test_gradient_penalty_samples_between_real_and_fake() -> None:
    # real = 1, fake = 0: each interpolate is a constant image equal to its alpha
    real = torch.ones(64, 784, dtype=torch.float64)
    fake = torch.zeros(64, 784, dtype=torch.float64)
    seen: list[torch.Tensor] = []

    def critic(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.detach().clone())
        return 0.5 * (x**2).sum(dim=1)  # gradient x_hat, norm 28 alpha

    gp = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(0))
    x_hat = seen[0]
    alpha = x_hat[:, 0]
    assert torch.equal(x_hat, alpha[:, None].expand_as(x_hat))  # one alpha per image...
    assert alpha.unique().numel() == 64  # ...and a different one per sample
    assert ((alpha > 0) & (alpha < 1)).all()
    assert float(gp.detach()) == pytest.approx(float(((28 * alpha - 1) ** 2).mean()), rel=1e-12)


# -- causal mask ------------------------------------------------------------------------------


@pytest.mark.parametrize("block", ["gpt2", "seed"])
def test_transformer_is_causal(block: Literal["gpt2", "seed"]) -> None:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=11, block_size=12, n_layer=2, n_head=2, d_model=16, d_ff=32, dropout=0.1, block=block)
    model = CharTransformer(cfg).eval()
    idx = torch.randint(0, 11, (3, 12))
    with torch.no_grad():
        base = model(idx)
        for t in range(12):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 11
            out = model(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
            # the changed position (and later ones) must see the change, or the test proves nothing
            assert (out[:, t] - base[:, t]).abs().max() > 1e-3


def test_transformer_rejects_too_long_input() -> None:
    model = CharTransformer(TransformerConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, d_model=4, d_ff=8))
    with pytest.raises(ValueError, match=r"sequence of 5 tokens exceeds the context window of 4"):
        model(torch.zeros(1, 5, dtype=torch.long))


# -- per-sample generator -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        GANConfig(latent_dim=8, arch="mlp", mlp_hidden=32),
        GANConfig(latent_dim=8, arch="conv", width=4),
        GANConfig(latent_dim=8, arch="mlp", mlp_hidden=32, num_classes=10),
        GANConfig(latent_dim=8, arch="conv", width=4, num_classes=10),
    ],
    ids=["mlp", "conv", "mlp-conditional", "conv-conditional"],
)
def test_generator_rows_are_independent(cfg: GANConfig) -> None:
    torch.manual_seed(0)
    gen = Generator(cfg).eval()
    z = torch.randn(6, 8)
    labels = torch.arange(6) if cfg.num_classes else None
    other_z = torch.randn(6, 8)
    other_labels = torch.tensor([9, 8, 7, 6, 5, 4]) if cfg.num_classes else None
    with torch.no_grad():
        out = gen(z, labels)
        assert out.shape == (6, 784)
        assert ((out >= 0) & (out <= 1)).all()
        for i in range(6):
            z2 = other_z.clone()
            z2[i] = z[i]
            l2 = None
            if other_labels is not None and labels is not None:
                l2 = other_labels.clone()
                l2[i] = labels[i]
            mixed = gen(z2, l2)
            assert torch.equal(mixed[i], out[i])  # same batch shape: bit-identical
            alone = gen(z[i : i + 1], None if labels is None else labels[i : i + 1])
            torch.testing.assert_close(alone[0], out[i], atol=1e-6, rtol=0)  # other batch sizes: same image
        assert not torch.equal(out[0], out[1])


def test_conditional_generator_requires_labels() -> None:
    gen = Generator(GANConfig(latent_dim=4, arch="mlp", mlp_hidden=8, num_classes=10))
    with pytest.raises(ValueError, match=r"this generator is conditional: labels are required"):
        gen(torch.randn(2, 4))


# -- overfitting one small batch --------------------------------------------------------------


def _blobs(n: int, generator: torch.Generator) -> torch.Tensor:
    """n binary 28x28 images, each a random rectangle, flattened (n, 784)."""
    images = torch.zeros(n, 28, 28)
    for i in range(n):
        y0, x0 = (int(v) for v in torch.randint(0, 18, (2,), generator=generator))
        h, w = (int(v) for v in torch.randint(4, 10, (2,), generator=generator))
        images[i, y0 : y0 + h, x0 : x0 + w] = 1.0
    return images.flatten(1)


def test_vae_overfits_one_batch() -> None:
    torch.manual_seed(0)
    x = _blobs(8, torch.Generator().manual_seed(0))
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


def test_wgan_critic_separates_fixed_batches() -> None:
    torch.manual_seed(0)
    cfg = GANConfig(latent_dim=8, arch="mlp", mlp_hidden=32)
    critic = Critic(cfg)
    real = _blobs(16, torch.Generator().manual_seed(0))
    fake = torch.rand(16, 784, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.5, 0.9))
    with torch.no_grad():
        w_start = float(critic(real).mean() - critic(fake).mean())
    for _ in range(200):
        w = critic(real).mean() - critic(fake).mean()
        loss = -w + 10 * gradient_penalty(critic, real, fake)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        w_end = float(critic(real).mean() - critic(fake).mean())
    distance = float((real - fake).norm(dim=1).mean())  # a 1-Lipschitz critic cannot beat this by much
    assert abs(w_start) < 1.0
    assert w_end > 0.5 * distance, (w_start, w_end, distance)


def test_wgan_gp_generator_overfits_one_image() -> None:
    torch.manual_seed(0)
    cfg = GANConfig(latent_dim=8, arch="mlp", mlp_hidden=32)
    gen, critic = Generator(cfg), Critic(cfg)
    target = torch.zeros(28, 28)
    target[8:20, 12:16] = 1.0
    real = target.flatten().repeat(16, 1)
    z = torch.randn(16, 8)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.5, 0.9))

    def distance() -> float:
        with torch.no_grad():
            return float(((gen(z) - real) ** 2).mean())

    start = distance()
    for _ in range(200):
        for _ in range(3):
            fake = gen(z).detach()
            loss_d = critic(fake).mean() - critic(real).mean() + 10 * gradient_penalty(critic, real, fake)
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
        loss_g = -critic(gen(z)).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
    end = distance()
    assert start > 0.1
    assert end < 0.01 * start, (start, end)


@pytest.mark.parametrize("block", ["gpt2", "seed"])
def test_transformer_overfits_one_batch(block: Literal["gpt2", "seed"]) -> None:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, d_model=32, d_ff=64, dropout=0.0, block=block)
    model = CharTransformer(cfg)
    data = torch.randint(0, 11, (4, 17))
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def ce() -> torch.Tensor:
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1))

    with torch.no_grad():
        start = float(ce())
    for _ in range(200):
        loss = ce()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = float(ce())
    assert start == pytest.approx(math.log(11), abs=0.3)  # small init: near-uniform predictions
    assert end < 0.1, (start, end)
