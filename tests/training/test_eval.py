"""training.eval: the Frechet distance and the evaluation command on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch

from engine.modelfile import export_model
from engine.models.classifier import ClassifierConfig, DigitClassifier
from engine.models.gan import GANConfig, Generator
from engine.models.vae import VAE, VAEConfig
from training import eval as evaluation


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    a = np.random.default_rng(0).normal(size=(500, 8))
    assert evaluation.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_the_gaussian_closed_form() -> None:
    # Same covariance S, means apart by d: FD = ||d||^2. Scaled by 3: FD = ||2 mu||^2 + tr(S + 9S - 2 * 3S).
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2000, 4)) @ rng.normal(size=(4, 4))
    shifted = a + np.array([3.0, 0.0, 4.0, 0.0])
    assert evaluation.frechet_distance(a, shifted) == pytest.approx(25.0, rel=1e-6)
    mu, cov = a.mean(0), np.cov(a, rowvar=False)
    assert evaluation.frechet_distance(a, 3 * a) == pytest.approx(float((2 * mu) @ (2 * mu) + 4 * np.trace(cov)), rel=1e-6)


class ScriptedClassifier:
    """Features are the first 10 pixels and the logits are those features: the figures are known in advance."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :10]

    def out(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


def test_judge_images_counts_confident_samples_and_entropy() -> None:
    images = torch.zeros(50, 784)
    images[:20, 3] = 10.0  # class 3, softmax 0.9989: confident
    images[20:40, 7] = 10.0  # class 7, confident
    images[40:, 1] = 1.0  # class 1, softmax e / (e + 9) = 0.23: not confident
    figures = evaluation.judge_images(images, cast(DigitClassifier, ScriptedClassifier()), images.clone())
    assert figures.class_histogram == [0, 10, 0, 20, 0, 0, 0, 20, 0, 0]
    assert figures.confident_share == pytest.approx(40 / 50)
    assert figures.class_entropy == pytest.approx(-(0.2 * math.log(0.2) + 2 * 0.4 * math.log(0.4)))
    assert figures.frechet_distance == pytest.approx(0.0, abs=1e-6)  # against themselves


def test_eval_command_reports_each_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    clf = export_model(tmp_path / "clf.safetensors", "mnist-classifier", DigitClassifier(ClassifierConfig(channels=2, feature_dim=4)))
    vae = export_model(tmp_path / "vae.safetensors", "vae", VAE(VAEConfig(hidden_dim=8, latent_dim=2)))
    gan = export_model(
        tmp_path / "gan.safetensors", "wgan-gp", Generator(GANConfig(latent_dim=4, arch="mlp", mlp_hidden=8, num_classes=10))
    )
    out = tmp_path / "report.json"
    code = evaluation.main([str(vae), str(gan), "--classifier", str(clf), "--elbo-samples", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    vae_row, gan_row = report["models"][str(vae)], report["models"][str(gan)]
    # an untrained VAE with Bernoulli pixels costs several hundred nats per image
    assert vae_row["negative_elbo_nats"] > 300
    assert gan_row["class_histogram"] and sum(gan_row["class_histogram"]) == evaluation.N_SAMPLES
    assert "floor_train_vs_heldout" in report
    table = capsys.readouterr().out
    assert "vae.safetensors" in table and "gan.safetensors" in table and "floor" in table


def test_eval_command_refuses_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    assert evaluation.main([str(bad)]) == 2
    assert f"error: {bad}:" in capsys.readouterr().err
