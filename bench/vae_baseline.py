"""VAE benchmark: the pytorch/examples recipe beside genserve's, trained and judged in one run.

    python -m bench.vae_baseline [--baseline-epochs 50 100] [--ours "vae --epochs ..."]

Baseline: pytorch/examples' ``vae/main.py`` recipe (784-400-20 with ReLU, summed BCE + KL, Adam
1e-3, batch 128, no schedule, no clipping) on all 9000 training digits. Ours: ``python -m
training vae`` with the options given (default: the bundled model's command from docs/training.md).
Both are judged by the same estimator: negative ELBO in nats per image on the 1000 held-out
digits, the expectation over q(z|x) taken with 10 draws per image.
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
import time
from pathlib import Path

import torch

from engine.logs import configure_logging
from engine.modelfile import load_model
from engine.models.vae import VAE, VAEConfig
from training.__main__ import main as training_main
from training.data import TRAIN_COUNT, load_t10k

OURS = "vae --epochs 800 --shift 1 --lr 3e-3 --warmup-epochs 5 --grad-clip 0 --patience 100"


@torch.no_grad()
def heldout_nelbo(model: VAE, images: torch.Tensor, draws: int = 10, seed: int = 0) -> float:
    torch.manual_seed(seed)
    model.eval()
    return float(torch.stack([model.negative_elbo(images)[2] for _ in range(draws)]).mean())


def train_baseline(train: torch.Tensor, heldout: torch.Tensor, checkpoints: list[int], seed: int) -> dict[int, float]:
    """pytorch/examples' loop, verbatim in spirit; returns held-out -ELBO at each checkpoint epoch."""
    torch.manual_seed(seed)
    model = VAE(VAEConfig(activation="relu"))  # fc1/fc21/fc22/fc3/fc4 of the example, same shapes
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    figures: dict[int, float] = {}
    for epoch in range(1, max(checkpoints) + 1):
        model.train()
        for idx in torch.randperm(len(train)).split(128):
            loss = model.negative_elbo(train[idx])[2].sum()  # the example sums over the batch
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch in checkpoints:
            figures[epoch] = heldout_nelbo(model, heldout)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.vae_baseline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline-epochs", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--ours", default=OURS, help=f"arguments of `python -m training` for our run (default: {OURS!r})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, help="keep our run folder here (default: a temporary folder)")
    args = parser.parse_args(argv)
    configure_logging(level="warning")
    images, _ = load_t10k()
    x = torch.from_numpy(images.reshape(len(images), -1).astype("float32")) / 255
    train, heldout = x[:TRAIN_COUNT], x[TRAIN_COUNT:]

    t0 = time.perf_counter()
    baseline = train_baseline(train, heldout, args.baseline_epochs, args.seed)
    baseline_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or Path(tmp)
        t0 = time.perf_counter()
        code = training_main([*shlex.split(args.ours), "--run-dir", str(run_dir), "--save-every", "0", "--seed", str(args.seed)])
        if code:
            return code
        ours_s = time.perf_counter() - t0
        ours = load_model(run_dir / "model.safetensors")
        assert isinstance(ours.module, VAE)
        ours_nelbo = heldout_nelbo(ours.module, heldout)

    print(f"\nnegative ELBO, nats per image, 1000 held-out digits ({torch.get_num_threads()} threads)")
    print(f"{'recipe':64} {'-ELBO':>8} {'seconds':>8}")
    for epoch, value in baseline.items():
        print(f"{f'pytorch/examples (ReLU, Adam 1e-3, batch 128), {epoch} epochs':64} {value:8.2f} {'':>8}")
    print(f"{'  (baseline total)':64} {'':>8} {baseline_s:8.0f}")
    print(f"{'genserve (command below)':64} {ours_nelbo:8.2f} {ours_s:8.0f}")
    print(f"  python -m training {args.ours}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
