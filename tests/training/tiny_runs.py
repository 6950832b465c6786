"""Tiny training runs, one per model kind: every flag that sizes the work is given, on the CPU."""

from __future__ import annotations

from pathlib import Path

from training.__main__ import main

# Tiny runs, one per model kind: every flag that sizes the work is given.
TINY: dict[str, list[str]] = {
    "vae": ["vae", "--hidden", "16", "--latent", "4", "--batch-size", "256", "--patience", "0"],
    "vae-ema": ["vae", "--hidden", "16", "--latent", "4", "--batch-size", "256", "--patience", "0", "--ema", "0.9", "--shift", "1"],
    "gan": [
        "gan", "--arch", "mlp", "--mlp-hidden", "16", "--latent", "8", "--steps-per-epoch", "3", "--batch-size", "16", "--n-critic", "2",
    ],
    "transformer": [
        "transformer", "--n-layer", "1", "--n-head", "2", "--d-model", "16", "--block-size", "16",
        "--batch-size", "4", "--steps-per-epoch", "5", "--patience", "0",
    ],
}  # fmt: skip
KIND = {"vae": "vae", "gan": "wgan-gp", "transformer": "char-transformer"}


def train(command: str, run_dir: Path, *extra: str) -> int:
    # CPU even where CUDA exists: resume is compared bit for bit, and CUDA's embedding backward is not deterministic
    return main([*TINY[command], "--device", "cpu", "--run-dir", str(run_dir), *extra])
