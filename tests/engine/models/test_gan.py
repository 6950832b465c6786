"""The GAN (engine/models/gan.py): each generated row independent of the others in its batch, labels
required when conditional, and a critic and generator that learn under the gradient penalty."""

from __future__ import annotations

import pytest
import torch

from engine.models.gan import Critic, GANConfig, Generator
from tests.engine.models.toy_data import blobs
from training.gan import gradient_penalty


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


def test_wgan_critic_separates_fixed_batches() -> None:
    torch.manual_seed(0)
    cfg = GANConfig(latent_dim=8, arch="mlp", mlp_hidden=32)
    critic = Critic(cfg)
    real = blobs(16, torch.Generator().manual_seed(0))
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
