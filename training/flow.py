"""Latent flow-matching task: a DiT velocity network on the bundled VAE's encoder means (docs/design/flow.md).

The training digits are encoded once to the VAE encoder's means (and, with ``--shift``, re-encoded
each epoch from randomly shifted digits); the latents are normalised per dimension by the
unshifted training latents' mean and std. Each step draws noise x0 ~ N(0, I) and a time t, and
regresses the velocity network at ``x_t = (1 - t) x0 + t x1`` on ``x1 - x0``; a share of the
labels is replaced by the "no label" token so that one network gives both velocities of
classifier-free guidance.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from engine.modelfile import load_model
from engine.models.flow import FlowConfig, LatentFlow, check_config
from engine.models.vae import VAE
from training.data import load_mnist
from training.ema import WeightAverage
from training.plots import image_grid
from training.task import Task
from training.vae import random_shift

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VAE = REPO / "models" / "vae.safetensors"

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # x1 (normalised latents), labels, x0, t


def sample_times(n: int, how: str, mean: float, std: float, generator: torch.Generator) -> torch.Tensor:
    """n times in (0, 1): uniform, or logit-normal (sigmoid of N(mean, std^2), SD3's choice)."""
    if how == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


class FlowTask(Task):
    kind = "flow"
    help = "train the latent flow-matching model on the bundled VAE's latents"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--vae", type=Path, default=DEFAULT_VAE, help="the unconditional VAE whose latent space the flow models")
        parser.add_argument("--d-model", type=int, default=128, help="width of the velocity network (DiT)")
        parser.add_argument("--layers", type=int, default=4, help="DiT blocks")
        parser.add_argument("--heads", type=int, default=4, help="attention heads")
        parser.add_argument("--tokens", type=int, default=5, help="patches the latent is cut into (must divide the latent size)")
        parser.add_argument("--mlp-ratio", type=int, default=4, help="MLP width as a multiple of --d-model")
        parser.add_argument(
            "--time-sampling",
            choices=["uniform", "logit-normal"],
            default="uniform",
            help="distribution of the training times t",
        )
        parser.add_argument("--logit-mean", type=float, default=0.0, help="logit-normal time sampling: mean of the logit")
        parser.add_argument("--logit-std", type=float, default=1.0, help="logit-normal time sampling: std of the logit")
        parser.add_argument("--label-drop", type=float, default=0.1, help="share of training labels replaced by 'no label' (for guidance)")
        parser.add_argument(
            "--shift", type=int, default=0, help="augment: re-encode digits shifted by up to this many pixels each epoch (0 = off)"
        )
        parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
        parser.add_argument(
            "--ema", type=float, default=0.995, help="validate and export a moving average of the weights with this decay; 0 = off"
        )
        g = parser.add_argument_group("sampling defaults written into the model file")
        g.add_argument("--sample-steps", type=int, default=10, help="default number of solver steps")
        g.add_argument("--max-steps", type=int, default=200, help="most steps a request may ask for")
        g.add_argument("--guidance", type=float, default=1.5, help="default classifier-free guidance scale (1 = none)")
        g.add_argument("--solver", choices=["euler", "heun"], default="heun", help="default ODE solver")
        parser.set_defaults(epochs=80, batch_size=256, lr=1e-3, warmup_epochs=5.0, patience=0, grad_clip=1.0)

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        super().__init__(args, device)
        self.data = load_mnist(args.data_dir)
        loaded = load_model(args.vae)
        if loaded.kind != "vae" or not isinstance(loaded.module, VAE):
            raise SystemExit(f"error: {args.vae} is a {loaded.kind}, not a vae")
        vae_cfg = loaded.config
        if vae_cfg.num_classes:
            raise SystemExit(f"error: {args.vae} is a conditional VAE; the flow needs an unconditional one")
        self.vae: VAE = loaded.module.to(device).eval()
        self.config = FlowConfig(
            latent_dim=vae_cfg.latent_dim,
            num_classes=10,
            image_size=vae_cfg.image_size,
            vae_hidden_dim=vae_cfg.hidden_dim,
            vae_activation=vae_cfg.activation,
            tokens=args.tokens,
            d_model=args.d_model,
            n_layers=args.layers,
            n_heads=args.heads,
            mlp_ratio=args.mlp_ratio,
            default_steps=args.sample_steps,
            max_steps=args.max_steps,
            default_guidance=args.guidance,
            solver=args.solver,
        )
        try:
            check_config(self.config)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from e
        self.model = LatentFlow(self.config)
        self.model.decoder.load_state_dict(self.vae.decoder.state_dict())
        self.train_mu = self._encode(self.data.train.images)
        mean, std = self.train_mu.mean(0), self.train_mu.std(0)
        self.model.latent_mean.copy_(mean)
        self.model.latent_std.copy_(std)
        self.model.to(device)
        self.opt = torch.optim.AdamW(self.model.net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        self.ema = WeightAverage(self.model, args.ema) if args.ema else None
        # validation: the val split's latents with one fixed draw of noise and times, so epochs compare
        g = torch.Generator().manual_seed(1234)
        self.val_x1 = self._normalise(self._encode(self.data.val.images))
        self.val_labels = self.data.val.labels.to(device)
        self.val_x0 = torch.randn(self.val_x1.shape, generator=g).to(device)
        self.val_t = sample_times(len(self.val_x1), args.time_sampling, args.logit_mean, args.logit_std, g).to(device)

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        mus = [self.vae.encode(images[i : i + 2048].to(self.device))[0] for i in range(0, len(images), 2048)]
        return torch.cat(mus)

    def _normalise(self, mu: torch.Tensor) -> torch.Tensor:
        return (mu - self.model.latent_mean) / self.model.latent_std

    def modules(self) -> dict[str, nn.Module]:
        return {"flow": self.model, "ema": self.ema.module} if self.ema else {"flow": self.model}

    def served(self) -> LatentFlow:
        """The weights that are validated, sampled and exported: the average when there is one."""
        return self.ema.module if self.ema else self.model

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adamw": self.opt}

    def steps_per_epoch(self) -> int:
        return -(-len(self.data.train) // self.args.batch_size)

    def batches(self, generator: torch.Generator) -> Iterator[Batch]:
        a = self.args
        if a.shift:
            x1 = self._normalise(self._encode(random_shift(self.data.train.images, a.shift, generator)))
        else:
            x1 = self._normalise(self.train_mu)
        labels = self.data.train.labels.to(self.device)
        order = torch.randperm(len(x1), generator=generator)
        for i in range(0, len(order), a.batch_size):
            idx = order[i : i + a.batch_size].to(self.device)
            n = len(idx)
            y = labels[idx]
            drop = torch.rand(n, generator=generator).to(self.device) < a.label_drop
            y = torch.where(drop, torch.full_like(y, self.config.num_classes), y)
            x0 = torch.randn(n, self.config.latent_dim, generator=generator).to(self.device)
            t = sample_times(n, a.time_sampling, a.logit_mean, a.logit_std, generator).to(self.device)
            yield x1[idx], y, x0, t

    def flow_loss(self, model: LatentFlow, x1: torch.Tensor, labels: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the predicted velocity against x1 - x0, per latent number."""
        xt = (1 - t)[:, None] * x0 + t[:, None] * x1
        return ((model.velocity(xt, t, labels) - (x1 - x0)) ** 2).mean()

    def train_step(self, batch: Batch) -> dict[str, float]:
        loss = self.flow_loss(self.model, *batch)
        grad_norm = self.optimize(loss, self.opt)
        if self.ema:
            self.ema.update(self.model)
        return {"loss": loss.item(), "grad_norm": grad_norm.item()}

    def validate(self) -> dict[str, float]:
        loss = self.flow_loss(self.served(), self.val_x1, self.val_labels, self.val_x0, self.val_t)
        return {"val_loss": float(loss.detach())}

    def export_module(self) -> nn.Module:
        return self.served()

    @torch.no_grad()
    def write_samples(self, run_dir: Path, seed: int) -> Path:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(100, self.config.latent_dim, generator=g).to(self.device)
        labels = torch.arange(10, device=self.device).repeat_interleave(10)  # row r: digit r
        images = self.served().sample(z, labels)
        path = run_dir / "samples.png"
        image_grid(images, 10, 10).save(path)
        return path
