"""Toy training data for the models' overfitting tests."""

from __future__ import annotations

import torch


def blobs(n: int, generator: torch.Generator) -> torch.Tensor:
    """n binary 28x28 images, each a random rectangle, flattened (n, 784)."""
    images = torch.zeros(n, 28, 28)
    for i in range(n):
        y0, x0 = (int(v) for v in torch.randint(0, 18, (2,), generator=generator))
        h, w = (int(v) for v in torch.randint(4, 10, (2,), generator=generator))
        images[i, y0 : y0 + h, x0 : x0 + w] = 1.0
    return images.flatten(1)
