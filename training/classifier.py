"""Digit-classifier training task: the judge of generated digits in ``training.eval``."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.modelfile import LoadedModel
from engine.models.classifier import ClassifierConfig, DigitClassifier
from training.data import load_mnist
from training.task import Task
from training.vae import Batch, random_shift, shuffled_batches


class ClassifierTask(Task):
    kind = "mnist-classifier"
    help = "train the digit classifier that training.eval uses to judge samples"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--channels", type=int, default=32, help="channels of the first convolution (the second has twice as many)")
        parser.add_argument("--feature-dim", type=int, default=128, help="width of the feature layer used by the Frechet distance")
        parser.add_argument("--shift", type=int, default=2, help="augment: translate training images by up to this many pixels")
        parser.set_defaults(epochs=15, batch_size=128, lr=2e-3, warmup_epochs=0.5, patience=5)

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        super().__init__(args, device)
        self.data = load_mnist(args.data_dir)
        self.config = ClassifierConfig(channels=args.channels, feature_dim=args.feature_dim)
        self.model = DigitClassifier(self.config).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.01)

    def modules(self) -> dict[str, nn.Module]:
        return {"classifier": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adamw": self.opt}

    def steps_per_epoch(self) -> int:
        return -(-len(self.data.train) // self.args.batch_size)

    def batches(self, generator: torch.Generator) -> Iterator[Batch]:
        for x, y in shuffled_batches(self.data.train, self.args.batch_size, generator, self.device):
            yield (random_shift(x, self.args.shift, generator) if self.args.shift else x), y

    def train_step(self, batch: Batch) -> dict[str, float]:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.optimize(loss, self.opt)
        return {"loss": loss.item()}

    def validate(self) -> dict[str, float]:
        logits = self.model(self.data.val.images.to(self.device))
        y = self.data.val.labels.to(self.device)
        return {"val_loss": float(F.cross_entropy(logits, y)), "val_accuracy": float((logits.argmax(1) == y).float().mean())}

    def export_module(self) -> nn.Module:
        return self.model

    @torch.no_grad()
    def write_samples(self, run_dir: Path, seed: int) -> Path:
        """Held-out accuracy and confusion matrix (a classifier has no samples to draw)."""
        logits = self.model(self.data.heldout.images.to(self.device)).cpu()
        y = self.data.heldout.labels
        pred = logits.argmax(1)
        confusion = torch.zeros(10, 10, dtype=torch.int64)
        confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
        lines = [f"held-out accuracy: {float((pred == y).float().mean()):.4f} on {len(y)} images", "rows: true digit, columns: predicted"]
        lines += [" ".join(f"{v:4d}" for v in row) for row in confusion.tolist()]
        path = run_dir / "heldout_accuracy.txt"
        path.write_text("\n".join(lines) + "\n")
        return path


@torch.no_grad()
def evaluation_figures(model: LoadedModel, seed: int, samples: int) -> dict[str, float]:
    """training.eval's classifier figure: accuracy on the held-out digits."""
    data = load_mnist().heldout
    return {"heldout_accuracy": float((model.module(data.images).argmax(1) == data.labels).float().mean())}
