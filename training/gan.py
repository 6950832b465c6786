"""WGAN-GP training task (Gulrajani et al. 2017, Algorithm 1).

Critic loss ``mean D(fake) - mean D(real) + lambda * mean((||grad D(x_hat)|| - 1)^2)`` at random
interpolates ``x_hat``; generator loss ``-mean D(G(z))``; ``n_critic`` critic steps per generator
step; Adam 1e-4, betas (0.5, 0.9). One training step is one generator iteration. An exponential
moving average of the generator's weights (``--ema``) is what gets exported.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from torch import nn

from engine.models.gan import Critic, GANConfig, Generator
from training.data import load_mnist
from training.ema import WeightAverage
from training.plots import image_grid
from training.task import Task

RealBatches = list[tuple[torch.Tensor, torch.Tensor]]  # n_critic (images, labels) batches


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """mean((||grad_x D(x_hat)||_2 - 1)^2), x_hat = alpha real + (1 - alpha) fake, alpha ~ U(0,1) per sample."""
    alpha = torch.rand(real.shape[0], 1, device=real.device, generator=generator)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    scores = critic(x_hat)
    (grads,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)  # (B, 784)
    return ((grads.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


class GANTask(Task):
    kind = "wgan-gp"
    help = "train the WGAN-GP on MNIST"
    select_best = False  # the critic's estimate is no model-selection signal: keep the last epoch

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--arch", choices=["conv", "mlp"], default="conv", help="DCGAN-style conv nets (the paper's) or MLPs")
        parser.add_argument("--width", type=int, default=64, help="conv: the paper's DIM")
        parser.add_argument("--mlp-hidden", type=int, default=512, help="mlp: hidden width")
        parser.add_argument("--latent", type=int, default=128, help="noise dimensions")
        parser.add_argument("--n-critic", type=int, default=5, help="critic steps per generator step")
        parser.add_argument("--gp-weight", type=float, default=10.0, help="lambda of the gradient penalty (0 = off)")
        parser.add_argument("--spectral-norm", action="store_true", help="spectrally normalise the critic's layers")
        parser.add_argument("--conditional", action="store_true", help="condition generator and critic on the digit label")
        parser.add_argument("--ema", type=float, default=0.999, help="decay of the generator weight average that is exported; 0 = off")
        parser.add_argument("--steps-per-epoch", type=int, default=500, help="generator iterations per epoch")
        parser.set_defaults(epochs=40, batch_size=64, lr=1e-4, warmup_epochs=0.0, patience=0, grad_clip=0.0, min_lr_ratio=1.0)

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        super().__init__(args, device)
        self.data = load_mnist(args.data_dir)
        self.config = GANConfig(
            latent_dim=args.latent,
            arch=args.arch,
            width=args.width,
            mlp_hidden=args.mlp_hidden,
            num_classes=10 if args.conditional else 0,
        )
        self.generator = Generator(self.config).to(device)
        self.critic = Critic(self.config, spectral=args.spectral_norm).to(device)
        self.ema = WeightAverage(self.generator, args.ema) if args.ema else None
        betas = (0.5, 0.9)  # the paper's
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=args.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.critic.parameters(), lr=args.lr, betas=betas)
        self.train_images = self.data.train.images.to(device)
        self.train_labels = self.data.train.labels.to(device)
        g = torch.Generator().manual_seed(1234)
        self.val_z = torch.randn(len(self.data.val), self.config.latent_dim, generator=g).to(device)

    def modules(self) -> dict[str, nn.Module]:
        modules = {"generator": self.generator, "critic": self.critic}
        if self.ema:
            modules["ema"] = self.ema.module
        return modules

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.opt_g, "critic": self.opt_d}

    def steps_per_epoch(self) -> int:
        return int(self.args.steps_per_epoch)

    def batches(self, generator: torch.Generator) -> Iterator[RealBatches]:
        n, b = len(self.train_labels), self.args.batch_size
        for _ in range(self.steps_per_epoch()):
            idx = torch.randint(0, n, (self.args.n_critic, b), generator=generator).to(self.device)
            yield [(self.train_images[i], self.train_labels[i]) for i in idx]

    def _labels(self, y: torch.Tensor) -> torch.Tensor | None:
        return y if self.config.num_classes else None

    def train_step(self, batch: RealBatches) -> dict[str, float]:
        args = self.args
        # figures stay on the device until the end of the step: one host sync per step, not per critic step
        d_losses: list[torch.Tensor] = []
        w_dists: list[torch.Tensor] = []
        self.generator.requires_grad_(False)
        for real, y in batch:
            labels = self._labels(y)
            z = torch.randn(real.shape[0], self.config.latent_dim, device=self.device)
            fake = self.generator(z, labels)
            w = self.critic(real, labels).mean() - self.critic(fake, labels).mean()
            loss_d = -w
            if args.gp_weight:
                loss_d = loss_d + args.gp_weight * gradient_penalty(partial(self.critic, labels=labels), real, fake)
            self.optimize(loss_d, self.opt_d)
            d_losses.append(loss_d.detach())
            w_dists.append(w.detach())
        self.generator.requires_grad_(True)
        self.critic.requires_grad_(False)
        y = batch[-1][1]
        z = torch.randn(y.shape[0], self.config.latent_dim, device=self.device)
        loss_g = -self.critic(self.generator(z, self._labels(y)), self._labels(y)).mean()
        self.optimize(loss_g, self.opt_g)
        self.critic.requires_grad_(True)
        if self.ema:
            self.ema.update(self.generator)
        return {"loss": torch.stack(d_losses).mean().item(), "g_loss": loss_g.item(), "wasserstein": torch.stack(w_dists).mean().item()}

    def validate(self) -> dict[str, float]:
        """The critic's Wasserstein estimate between held-back real digits and fixed-noise fakes."""
        real = self.data.val.images.to(self.device)
        labels = self._labels(self.data.val.labels.to(self.device))
        fake = self.export_module()(self.val_z, labels)
        w = self.critic(real, labels).mean() - self.critic(fake, labels).mean()
        return {"val_loss": float(w)}

    def export_module(self) -> nn.Module:
        return self.ema.module if self.ema else self.generator

    @torch.no_grad()
    def write_samples(self, run_dir: Path, seed: int) -> Path:
        g = torch.Generator().manual_seed(seed)
        rows, cols = (10, 10) if self.config.num_classes else (8, 8)
        z = torch.randn(rows * cols, self.config.latent_dim, generator=g).to(self.device)
        labels = torch.arange(10, device=self.device).repeat_interleave(cols) if self.config.num_classes else None
        path = run_dir / "samples.png"
        image_grid(self.export_module()(z, labels), rows, cols).save(path)
        return path
