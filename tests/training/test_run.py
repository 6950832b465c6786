"""A training run end to end: its run folder (metrics, plots, samples, checkpoints, the model file), a
plot that cannot be drawn, early stopping, export of any epoch, and each model option."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from engine.modelfile import load_model
from tests.training.tiny_runs import KIND, TINY, train
from training import plots
from training.__main__ import main
from training.checkpoint import load_checkpoint, module_state
from training.data import load_shakespeare
from training.transformer import SAMPLE_PROMPTS
from training.vae import VAETask

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("command", ["vae", "gan", "transformer"])
def test_cli_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    run = tmp_path / "run"
    assert train(command, run, "--epochs", "2", "--save-every", "1") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kind"] == KIND[command]
    assert summary["epochs_run"] == 2

    with Image.open(run / "loss_curve.png") as im:
        assert im.format == "PNG"
        im.verify()
    if command == "transformer":
        text = (run / "samples.txt").read_text(encoding="utf-8")
        assert text.endswith("\n")
        pieces = text[:-1].split("\n\n----\n\n")
        assert len(pieces) == len(SAMPLE_PROMPTS) == 3
        vocab = set(load_shakespeare().vocab)
        for piece, prompt in zip(pieces, SAMPLE_PROMPTS, strict=True):
            assert piece.startswith(prompt)
            assert len(piece) == len(prompt) + 400
            assert set(piece) <= vocab
        assert not (run / "samples.png").exists()
    else:
        with Image.open(run / "samples.png") as im:
            assert im.format == "PNG"
            assert im.mode == "L"
            assert im.size == (2 * (8 * 30 + 2), 2 * (8 * 30 + 2))  # 8x8 grid of 28px cells, 2px padding, scale 2

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["kind"] == KIND[command]
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    assert all(math.isfinite(row["val_loss"]) and math.isfinite(row["train_loss"]) for row in metrics["history"])
    losses = [row["val_loss"] for row in metrics["history"]]
    # the best epoch is the lowest validation loss (the GAN keeps its last: no loss of its ranks its epochs)
    assert metrics["best_epoch"] == (2 if command == "gan" else 1 + losses.index(min(losses)))
    assert metrics["task_args"]["command"] == command
    for name in ("best", "last", "epoch_0001", "epoch_0002"):
        assert (run / "checkpoints" / f"{name}.safetensors").is_file(), name

    model = load_model(run / "model.safetensors")
    assert model.kind == KIND[command]
    assert model.training["best_epoch"] == metrics["best_epoch"]
    if command == "vae":
        assert (model.config.hidden_dim, model.config.latent_dim) == (16, 4)
    elif command == "gan":
        assert (model.config.arch, model.config.mlp_hidden, model.config.latent_dim) == ("mlp", 16, 8)
    else:
        assert model.vocab == load_shakespeare().vocab
        assert (model.config.d_model, model.config.block_size, model.config.vocab_size) == (16, 16, 65)

    # the run's model file is the best epoch's: exporting best.safetensors gives the same weights
    out = tmp_path / "exported.safetensors"
    assert main(["export", str(run / "checkpoints" / "best.safetensors"), "--out", str(out)]) == 0
    exported = load_model(out)
    assert exported.kind == model.kind and exported.config == model.config and exported.vocab == model.vocab
    a, b = model.module.state_dict(), exported.module.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with torch.no_grad():
        if command == "transformer":
            x = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
            assert torch.equal(model.module(x), exported.module(x))
        else:
            z = torch.randn(4, model.config.latent_dim, generator=torch.Generator().manual_seed(0))
            assert torch.equal(model.module(z), exported.module(z))

    best = load_checkpoint(run / "checkpoints" / "best.safetensors")
    served = "ema" if command == "gan" else {"vae": "vae", "transformer": "transformer"}[command]
    for name, t in module_state(best, served).items():
        assert torch.equal(a[name], t), name
    if command == "gan":  # the exported generator is the weight average, not the raw generator
        raw = module_state(best, "generator")
        assert any(not torch.equal(raw[n], a[n]) for n in a)


@pytest.mark.parametrize("error", [ModuleNotFoundError("No module named 'matplotlib'"), RuntimeError("no font\nat all")])
def test_a_plot_that_cannot_be_drawn_keeps_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Exception
) -> None:
    def loss_curve(*args: Any, **kwargs: Any) -> Path:
        raise error

    monkeypatch.setattr(plots, "loss_curve", loss_curve)
    run = tmp_path / "run"
    assert train("vae", run, "--epochs", "1") == 0
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 1
    with Image.open(run / "samples.png") as im:
        im.verify()
    assert load_model(run / "model.safetensors").kind == "vae"
    assert (run / "checkpoints" / "best.safetensors").is_file() and (run / "checkpoints" / "last.safetensors").is_file()
    assert not (run / "loss_curve.png").exists()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "plot not drawn" in line]
    assert len(warnings) == 1 and str(run / "loss_curve.png") in warnings[0] and type(error).__name__ in warnings[0]


def test_early_stopping_exports_the_best_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The validation figure is scripted (it rises after epoch 1 by construction), so the set-up
    # holds on every CPU and thread count; the weights still train, so epochs really differ.
    scripted = iter([10.0, 20.0, 15.0, 12.0, 11.0])
    real_validate = VAETask.validate

    def validate(self: VAETask) -> dict[str, float]:
        return {**real_validate(self), "val_loss": next(scripted)}

    monkeypatch.setattr(VAETask, "validate", validate)
    run = tmp_path / "run"
    assert train("vae", run, "--epochs", "5", "--save-every", "1", "--patience", "1") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert [row["val_loss"] for row in metrics["history"]] == [10.0, 20.0]
    assert metrics["epochs_run"] == 2
    assert metrics["best_epoch"] == 1
    assert metrics["stop_reason"].startswith("early stopping")
    assert not (run / "checkpoints" / "epoch_0003.safetensors").exists()
    model = load_model(run / "model.safetensors").module.state_dict()
    first = module_state(load_checkpoint(run / "checkpoints" / "epoch_0001.safetensors"), "vae")
    last = module_state(load_checkpoint(run / "checkpoints" / "last.safetensors"), "vae")
    assert all(torch.equal(model[n], first[n]) for n in model)
    assert not all(torch.equal(model[n], last[n]) for n in model)


def test_export_of_an_earlier_epoch_differs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train("vae", run, "--epochs", "2", "--save-every", "1") == 0
    out1, out2 = tmp_path / "e1.safetensors", tmp_path / "e2.safetensors"
    assert main(["export", str(run / "checkpoints" / "epoch_0001.safetensors"), "--out", str(out1)]) == 0
    assert main(["export", str(run / "checkpoints" / "epoch_0002.safetensors"), "--out", str(out2)]) == 0
    m1, m2 = load_model(out1), load_model(out2)
    assert m1.training["epochs_run"] == 1 and m2.training["epochs_run"] == 2
    w1, w2 = m1.module.state_dict()["decoder.out.weight"], m2.module.state_dict()["decoder.out.weight"]
    assert not torch.equal(w1, w2)


VARIANTS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "vae-gaussian-beta-conditional": (
        [*TINY["vae"], "--likelihood", "gaussian", "--beta", "4", "--conditional"],
        {"likelihood": "gaussian", "num_classes": 10},
    ),
    "gan-spectral-conditional": ([*TINY["gan"], "--spectral-norm", "--gp-weight", "0", "--conditional"], {"num_classes": 10}),
    "gan-conv": (
        ["gan", "--arch", "conv", "--width", "2", "--latent", "4", "--steps-per-epoch", "1", "--batch-size", "4", "--n-critic", "1"],
        {"arch": "conv", "width": 2},
    ),
    "transformer-original-block": (
        [*TINY["transformer"], "--block", "original", "--dropout", "0.1"],
        {"block": "original", "dropout": 0.1},
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_options_train_and_export(tmp_path: Path, variant: str) -> None:
    args, expected = VARIANTS[variant]
    assert main([*args, "--device", "cpu", "--epochs", "1", "--run-dir", str(tmp_path)]) == 0
    config = load_model(tmp_path / "model.safetensors").config
    assert {k: getattr(config, k) for k in expected} == expected
