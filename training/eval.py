"""``python -m training.eval FILE...``: the figures reported for exported models.

- VAE: negative ELBO in nats per image on the 1000 held-out digits (beta 1; the expectation over
  q(z|x) estimated with ``--elbo-samples`` draws per image).
- Image models (VAE decoder, WGAN-GP generator): from 1000 samples, judged by the project's
  digit classifier: the Frechet distance to the held-out digits in the classifier's feature
  space, the share of samples classified with confidence >= 0.9, and the entropy of the
  predicted-class histogram (ln 10 = 2.303 is perfectly even). The floor (1000 random digits of
  the training split against the held-out 1000) is reported beside them.
- Transformer: validation loss in nats per character over the whole validation split.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import ModelFileError
from engine.logs import configure_logging
from engine.modelfile import LoadedModel, load_model
from engine.models.classifier import DigitClassifier
from training.data import ImageSplit, load_mnist, load_shakespeare

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CLASSIFIER = REPO / "models" / "eval" / "mnist_classifier.safetensors"
N_SAMPLES = 1000


@dataclass(frozen=True)
class ImageFigures:
    frechet_distance: float
    confident_share: float  # share of samples with max class probability >= 0.9
    class_entropy: float  # entropy (nats) of the predicted-class histogram
    class_histogram: list[int]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets (N, D)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    s_a, s_b = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    # tr sqrt(S_a S_b) = sum sqrt(eig(S_a^1/2 S_b S_a^1/2)), a symmetric PSD matrix: no scipy needed
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_sqrt = float(np.sqrt(np.clip(inner, 0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


@torch.no_grad()
def judge_images(images: torch.Tensor, classifier: DigitClassifier, reference: torch.Tensor) -> ImageFigures:
    """Figures of ``images`` (N, 784) in [0, 1] against ``reference`` digits (M, 784)."""
    feats = classifier.features(images)
    probs = F.softmax(classifier.out(feats), dim=1)
    ref_feats = classifier.features(reference)
    hist = torch.bincount(probs.argmax(1), minlength=10)
    p = hist.double() / hist.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return ImageFigures(
        frechet_distance=frechet_distance(feats.numpy(), ref_feats.numpy()),
        confident_share=float((probs.max(1).values >= 0.9).float().mean()),
        class_entropy=entropy,
        class_histogram=hist.tolist(),
    )


@torch.no_grad()
def sample_images(model: LoadedModel, n: int, seed: int) -> torch.Tensor:
    """n samples (n, 784); conditional models get labels 0..9 in turn."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    z = torch.randn(n, cfg.latent_dim, generator=g)
    labels = torch.arange(n) % 10 if cfg.num_classes else None
    if model.kind == "vae":
        return model.module.decode(z, labels)  # type: ignore[operator]
    if model.kind == "flow":
        return model.module.sample(z, labels, steps=cfg.default_steps, guidance=cfg.default_guidance, solver=cfg.solver)  # type: ignore[operator]
    return model.module(z, labels)


@torch.no_grad()
def vae_negative_elbo(model: LoadedModel, data: ImageSplit, samples: int, seed: int) -> float:
    torch.manual_seed(seed)
    labels = data.labels if model.config.num_classes else None
    vae = model.module
    per_image = torch.stack([vae.negative_elbo(data.images, labels, beta=1.0)[2] for _ in range(samples)]).mean(0)  # type: ignore[operator]
    return float(per_image.mean())


@torch.no_grad()
def text_validation_loss(model: LoadedModel) -> float:
    text = load_shakespeare()
    if text.vocab != model.vocab:
        raise ValueError(f"{model.path}: vocabulary differs from tiny shakespeare's")
    t = model.config.block_size
    n = (len(text.val) - 1) // t
    x, y = text.val[: n * t].view(n, t), text.val[1 : n * t + 1].view(n, t)
    total = 0.0
    for i in range(0, n, 64):
        logits = model.module(x[i : i + 64])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i : i + 64].reshape(-1), reduction="sum"))
    return total / y.numel()


def load_classifier(path: Path) -> tuple[DigitClassifier, LoadedModel]:
    loaded = load_model(path)
    if loaded.kind != "mnist-classifier":
        raise ModelFileError(path, f"is a {loaded.kind}, not an mnist-classifier")
    assert isinstance(loaded.module, DigitClassifier)
    return loaded.module, loaded


def evaluate(paths: list[Path], classifier_path: Path, seed: int, elbo_samples: int) -> dict[str, Any]:
    mnist = load_mnist()
    report: dict[str, Any] = {"models": {}}
    classifier: DigitClassifier | None = None
    for path in paths:
        model = load_model(path)
        row: dict[str, Any] = {"kind": model.kind}
        if model.kind == "vae":
            row["negative_elbo_nats"] = vae_negative_elbo(model, mnist.heldout, elbo_samples, seed)
        if model.kind in ("vae", "wgan-gp", "flow"):
            if classifier is None:
                classifier, _ = load_classifier(classifier_path)
                acc = float((classifier(mnist.heldout.images).argmax(1) == mnist.heldout.labels).float().mean())
                # a seeded random 1000 of the training split: its first 1000 come from the t10k's
                # easier writers and would overstate the floor
                pick = torch.randperm(len(mnist.train), generator=torch.Generator().manual_seed(seed))[:N_SAMPLES]
                floor = judge_images(mnist.train.images[pick], classifier, mnist.heldout.images)
                report["classifier"] = {"path": str(classifier_path), "heldout_accuracy": acc}
                report["floor_train_vs_heldout"] = asdict(floor)
            row.update(asdict(judge_images(sample_images(model, N_SAMPLES, seed), classifier, mnist.heldout.images)))
        if model.kind == "char-transformer":
            row["val_loss_nats_per_char"] = text_validation_loss(model)
        if model.kind == "mnist-classifier":
            assert isinstance(model.module, DigitClassifier)
            row["heldout_accuracy"] = float((model.module(mnist.heldout.images).argmax(1) == mnist.heldout.labels).float().mean())
        report["models"][str(path)] = row
    return report


def print_table(report: dict[str, Any]) -> None:
    if "classifier" in report:
        c = report["classifier"]
        print(f"judge: {c['path']} (held-out accuracy {c['heldout_accuracy']:.4f})")
    rows = list(report["models"].items())
    if "floor_train_vs_heldout" in report:
        rows.append(("floor: 1000 training digits vs held-out", dict(report["floor_train_vs_heldout"], kind="data")))
    print(f"{'model':44} {'kind':17} {'-ELBO':>8} {'FD':>8} {'conf>=.9':>9} {'H(class)':>9} {'val nats/char':>14}")

    def fmt(v: Any, spec: str) -> str:
        return format(v, spec) if isinstance(v, float) else "-"

    for name, r in rows:
        elbo, fd = fmt(r.get("negative_elbo_nats"), "8.2f"), fmt(r.get("frechet_distance"), "8.2f")
        conf, ent = fmt(r.get("confident_share"), "9.3f"), fmt(r.get("class_entropy"), "9.3f")
        print(f"{name[-44:]:44} {r['kind']:17} {elbo:>8} {fd:>8} {conf:>9} {ent:>9} {fmt(r.get('val_loss_nats_per_char'), '14.4f'):>14}")
    print(f"(class entropy of a perfectly even histogram: ln 10 = {math.log(10):.3f}; target >= {0.95 * math.log(10):.3f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path, help="exported model files (.safetensors)")
    parser.add_argument(
        "--classifier", type=Path, default=DEFAULT_CLASSIFIER, help="digit classifier model file (default: the bundled one)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples and of the ELBO's noise")
    parser.add_argument("--elbo-samples", type=int, default=10, help="draws of z per image for the ELBO's expectation")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        report = evaluate(args.files, args.classifier, args.seed, args.elbo_samples)
    except (ModelFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
