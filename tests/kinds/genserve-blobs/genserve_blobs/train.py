"""``python -m training blobs``: fit the blobs' placement so that their mean image matches the digits'."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from genserve_blobs import Blobs, BlobsConfig
from training.data import load_mnist
from training.plots import image_grid
from training.task import Task


class BlobsTask(Task):
    kind = "blobs"
    help = "train the blobs example kind (docs/kinds.md)"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--blobs", type=int, default=3, help="blobs per image")
        parser.set_defaults(epochs=2, batch_size=256, lr=1e-2, warmup_epochs=0.0, patience=0)

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        super().__init__(args, device)
        self.data = load_mnist(args.data_dir)
        self.model = Blobs(BlobsConfig(blobs=args.blobs)).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr)

    def modules(self) -> dict[str, nn.Module]:
        return {"blobs": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adam": self.opt}

    def steps_per_epoch(self) -> int:
        return -(-len(self.data.train) // self.args.batch_size)

    def batches(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        order = torch.randperm(len(self.data.train), generator=generator)
        for i in range(0, len(order), self.args.batch_size):
            yield self.data.train.images[order[i : i + self.args.batch_size]].to(self.device)

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.randn(len(x), self.model.config.latent_dim, device=self.device)
        return ((self.model(z).mean(0) - x.mean(0)) ** 2).sum()  # match the mean image: a toy objective

    def train_step(self, batch: torch.Tensor) -> dict[str, float]:
        loss = self._loss(batch)
        self.optimize(loss, self.opt)
        return {"loss": loss.item()}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        torch.manual_seed(0)
        return {"val_loss": float(self._loss(self.data.val.images.to(self.device)))}

    def export_module(self) -> nn.Module:
        return self.model

    @torch.no_grad()
    def write_samples(self, run_dir: Path, seed: int) -> Path:
        z = torch.randn(16, self.model.config.latent_dim, generator=torch.Generator().manual_seed(seed))
        path = run_dir / "samples.png"
        image_grid(self.model(z.to(self.device)), 4, 4).save(path)
        return path
