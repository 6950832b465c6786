"""Small MNIST classifier used only to judge generated digits (training.eval).

Its penultimate layer (``feature_dim`` wide) is the feature space of the Frechet distance, in the
spirit of FID but with a network trained on the digits themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.kinds import Kind, Shape


@dataclass(frozen=True)
class ClassifierConfig:
    channels: int = 32
    feature_dim: int = 128
    num_classes: int = 10
    dropout: float = 0.25
    image_size: int = 28


class DigitClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.fc = nn.Linear(2 * c * 7 * 7, config.feature_dim)
        self.out = nn.Linear(config.feature_dim, config.num_classes)
        self.drop = nn.Dropout(config.dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 784) in [0, 1] -> features (B, feature_dim)."""
        s = self.config.image_size
        h = F.max_pool2d(F.relu(self.conv1(x.view(-1, 1, s, s))), 2)  # (B, c, 14, 14)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, 2c, 7, 7)
        return F.relu(self.fc(self.drop(h.flatten(1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.features(x)))  # logits (B, classes)


KIND = Kind(
    "mnist-classifier",
    "digit classifier used by evaluation",
    ClassifierConfig,
    DigitClassifier,
    Shape.NOT_SERVED,  # the registry skips it: training.eval's judge
    trainer="training.classifier:ClassifierTask",
    command="classifier",
    figures="training.classifier:evaluation_figures",
)
