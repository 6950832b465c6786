"""The WGAN-GP's gradient penalty (training/gan.py): exact on a linear critic, taken between real and fake."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.gan import gradient_penalty


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
