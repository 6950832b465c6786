"""Pictures a run writes: the loss curve (matplotlib) and sample grids (Pillow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor | np.ndarray, rows: int, cols: int, scale: int = 2, pad: int = 2) -> Image.Image:
    """Images (N, 784) or (N, 28, 28) in [0, 1] -> one greyscale grid image, row by row."""
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    arr = arr.reshape(-1, 28, 28)
    if len(arr) > rows * cols:
        raise ValueError(f"{len(arr)} images do not fit a {rows}x{cols} grid")
    cell = 28 + pad
    canvas = np.zeros((rows * cell + pad, cols * cell + pad), dtype=np.uint8)
    for i, img in enumerate(arr):
        r, c = divmod(i, cols)
        canvas[pad + r * cell : pad + r * cell + 28, pad + c * cell : pad + c * cell + 28] = np.clip(img * 255 + 0.5, 0, 255).astype(
            np.uint8
        )
    picture = Image.fromarray(canvas, mode="L")
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)


def loss_curve(history: list[dict[str, float]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    keys = [k for k in (history[0] if history else {}) if k.endswith("loss")]
    for key in keys:
        ax.plot(epochs, [row[key] for row in history], label=key, marker="." if len(epochs) < 30 else None)
    if len(epochs) >= 20 and keys:
        # the first epochs' losses dwarf the rest: zoom onto everything after the first 5%
        tail = [row[k] for row in history[len(history) // 20 :] for k in keys]
        low, high = min(tail), max(tail)
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(f"{title}: loss per epoch")
    ax.grid(alpha=0.3)
    if keys:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
