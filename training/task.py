"""What the training loop needs from a model: the reference design's ``loss`` / ``generate`` interface, widened.

A task owns its modules, optimisers and data; the loop (training/loop.py) owns epochs, the
learning-rate schedule, clipping, validation, early stopping, checkpoints and the run folder.
"""

from __future__ import annotations

import argparse
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Task(ABC):
    """One model's training recipe."""

    kind: str  # the model kind written into the exported file
    help: str  # one line for ``python -m training --help``
    # False: validation loss is no model-selection signal (a GAN's critic estimate), so the
    # "best" checkpoint is always the latest epoch and early stopping never fires.
    select_best: bool = True

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.grad_clip: float = args.grad_clip

    @staticmethod
    @abstractmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add this task's options (with defaults) to its sub-command."""

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Every module whose state a checkpoint must hold."""

    @abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimiser; the loop scales each group's ``initial_lr`` by the schedule."""

    @abstractmethod
    def steps_per_epoch(self) -> int: ...

    @abstractmethod
    def batches(self, generator: torch.Generator) -> Iterator[Any]:
        """One epoch of batches, shuffled or sampled with ``generator`` (saved in checkpoints)."""

    @abstractmethod
    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimisation step; returns figures to average over the epoch (``loss`` first)."""

    @abstractmethod
    def validate(self) -> dict[str, float]:
        """Figures on the validation split; must include ``val_loss``."""

    @abstractmethod
    def export_module(self) -> nn.Module:
        """The module that is exported and served."""

    def export_vocab(self) -> str | None:
        return None

    @abstractmethod
    def write_samples(self, run_dir: Path, seed: int) -> Path:
        """Write the run's sample artefact (PNG grid or text file)."""

    def optimize(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Backward, global-norm gradient clipping, step; returns the pre-clip gradient norm.

        The norm stays a tensor: reading it forces a device sync, which a GPU caller may skip.
        """
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        # with clipping off, an infinite limit still measures the norm (a figure worth logging)
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else math.inf)
        optimizer.step()
        return norm.detach()
