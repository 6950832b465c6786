"""Exponential moving average of a module's weights (Polyak averaging).

The average usually generalises better than the last iterate; tasks that use it validate and
export the average, so early stopping and the model file both see the weights that are served.
"""

from __future__ import annotations

import copy
from typing import Generic, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


class WeightAverage(Generic[M]):
    def __init__(self, module: M, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module: M = copy.deepcopy(module).requires_grad_(False)

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        for avg, p in zip(self.module.parameters(), source.parameters(), strict=True):
            avg.lerp_(p, 1.0 - self.decay)
