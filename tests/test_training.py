"""The training package: schedule, bit-exact resume, the CLI's run folder, export, errors and data files."""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.modelfile import export_model, load_model
from engine.models.vae import VAE, VAEConfig
from training import plots
from training.__main__ import build_parser, main
from training.checkpoint import load_checkpoint, module_state
from training.data import DataError, load_mnist, load_shakespeare, read_idx
from training.loop import lr_factor
from training.transformer import SAMPLE_PROMPTS
from training.vae import VAETask

pytestmark = pytest.mark.timeout(120)

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


# -- learning-rate schedule -------------------------------------------------------------------


def test_lr_warmup_is_linear_up_to_peak() -> None:
    f = [lr_factor(s, total_steps=100, warmup_steps=10, min_ratio=0.1) for s in range(10)]
    assert f[0] == pytest.approx(0.1)
    steps = np.diff(f)
    assert np.allclose(steps, 0.1)  # a straight line from 1/10 ...
    assert f[9] == 1.0  # ... to the peak at the last warm-up step
    assert lr_factor(10, 100, 10, 0.1) == 1.0  # and the cosine starts at the peak


def test_lr_cosine_decays_to_min_ratio() -> None:
    f = [lr_factor(s, total_steps=100, warmup_steps=10, min_ratio=0.1) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(f))  # never rises after warm-up
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: the mean of peak and floor
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1, abs=1e-12)
    assert lr_factor(250, 100, 10, 0.1) == pytest.approx(0.1, abs=1e-12)  # stays at the floor
    assert lr_factor(99, 100, 10, 0.1) > 0.1  # the last step taken is still above the floor


def test_lr_without_warmup_starts_at_peak() -> None:
    assert lr_factor(0, 50, 0, 0.01) == 1.0
    assert lr_factor(50, 50, 0, 0.01) == pytest.approx(0.01)
    assert lr_factor(0, 50, 0, 1.0) == lr_factor(49, 50, 0, 1.0) == 1.0  # min_ratio 1: constant


# -- resume = uninterrupted run -----------------------------------------------------------------


@pytest.mark.parametrize("command", ["vae", "vae-ema", "gan", "transformer"])
def test_resume_is_bit_identical(tmp_path: Path, command: str) -> None:
    run = tmp_path / "run"
    assert train(command, run, "--epochs", "4", "--save-every", "2") == 0
    ckpts = run / "checkpoints"
    uninterrupted = ckpts / "last.safetensors"
    kept = tmp_path / "uninterrupted.safetensors"
    uninterrupted.rename(kept)
    middle = load_checkpoint(ckpts / "epoch_0002.safetensors")
    assert middle.state["epoch"] == 2

    # resume writes into the run folder named in the checkpoint (this run's)
    assert main(["resume", str(ckpts / "epoch_0002.safetensors"), "--device", "cpu"]) == 0
    a, b = load_checkpoint(kept), load_checkpoint(ckpts / "last.safetensors")
    assert b.state["epoch"] == a.state["epoch"] == 4
    assert b.state["step"] == a.state["step"]
    assert b.state["best_epoch"] == a.state["best_epoch"]
    assert b.state["python_rng"] == a.state["python_rng"]
    assert a.tensors.keys() == b.tensors.keys()
    assert any(k.startswith("optim.") for k in a.tensors) and "rng.torch" in a.tensors
    for name in a.tensors:  # modules, optimiser moments and RNG states alike
        assert torch.equal(a.tensors[name], b.tensors[name]), name
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a.state["history"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b.state["history"]]
    # the resumed half really trained: weights moved after epoch 2
    moved = [n for n in a.tensors if n.startswith("module.") and not torch.equal(a.tensors[n], middle.tensors[n])]
    assert moved


def test_vae_ema_is_what_gets_exported(tmp_path: Path) -> None:
    assert train("vae-ema", tmp_path / "run", "--epochs", "2") == 0
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.safetensors")
    exported = load_model(tmp_path / "run" / "model.safetensors").module.state_dict()
    assert all(torch.equal(t, ckpt.tensors[f"module.ema.{n}"]) for n, t in exported.items())
    assert not all(torch.equal(t, ckpt.tensors[f"module.vae.{n}"]) for n, t in exported.items())


# -- the CLI end to end -------------------------------------------------------------------------


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


# -- help and errors ----------------------------------------------------------------------------


def test_module_help_runs(repo_root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training", "--help"], check=False, cwd=repo_root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m training")
    for command in ("vae", "gan", "transformer", "classifier", "resume", "export"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["vae", "gan", "transformer", "classifier", "resume", "export"])
def test_subcommand_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    # in-process: a subprocess per sub-command costs ~2 s of torch import each
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m training {command}")


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["diffusion"])
    assert info.value.code == 2
    assert "invalid choice: 'diffusion'" in capsys.readouterr().err


def test_gan_defaults_are_the_papers() -> None:
    args = build_parser().parse_args(["gan"])
    assert args.min_lr_ratio == 1.0  # constant learning rate
    assert args.grad_clip == 0.0  # no clipping of the critic


def test_task_defaults_reach_the_parser() -> None:
    p = build_parser()
    vae = p.parse_args(["vae"])  # the bundled model's recipe
    assert (vae.epochs, vae.lr, vae.shift, vae.grad_clip) == (800, 3e-3, 1, 0.0)
    assert (p.parse_args(["gan"]).batch_size, p.parse_args(["gan"]).lr) == (64, 1e-4)
    assert p.parse_args(["transformer"]).warmup_epochs == 0.4


@pytest.mark.parametrize("task", ["vae", "gan", "transformer", "classifier"])
def test_help_states_each_default_once_as_the_parser_has_it(task: str) -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[task]
    args = vars(sub.parse_args([]))
    formatter = sub._get_formatter()
    for action in sub._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        text = formatter._get_help_string(action) or ""
        assert len(re.findall(r"\(default[: ]", text)) <= 1, f"{task} {action.option_strings[0]}: {text}"
        if "%(default)s" in text:
            assert args[action.dest] == action.default  # the figure shown is the one in force
    help_text = " ".join(sub.format_help().split())
    expected = {"vae": "0 = off (default: 0.0)", "gan": "0 = off (default: 0.0)", "transformer": "0 = off (default: 1.0)"}
    if task in expected:  # --grad-clip, whose common default each task overrides
        assert f"global gradient-norm clip; {expected[task]}" in help_text


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_resume_from_garbage_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "epoch_0002.safetensors"
    path.write_bytes(b"\x00" * 3)
    assert main(["resume", str(path)]) == 2
    assert (
        _error_line(capsys.readouterr().err)
        == f"error: {path}: is not a safetensors file: 3 bytes is shorter than the 8-byte header length"
    )


def test_resume_from_truncated_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert train("gan", run, "--epochs", "1") == 0
    path = run / "checkpoints" / "last.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    capsys.readouterr()
    assert main(["resume", str(path)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {path}: tensor '")
    assert line.endswith("(truncated?)")


def test_resume_from_a_model_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = export_model(tmp_path / "model.safetensors", "vae", VAE(VAEConfig(hidden_dim=8, latent_dim=3)))
    assert main(["resume", str(path)]) == 2
    assert _error_line(capsys.readouterr().err) == f"error: {path}: is not a genserve training checkpoint (no 'checkpoint' metadata)"
    assert main(["export", str(path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert _error_line(capsys.readouterr().err) == f"error: {path}: is not a genserve training checkpoint (no 'checkpoint' metadata)"
    assert not (tmp_path / "x.safetensors").exists()


# -- IDX data files -----------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack(">II", magic, len(array)) + (struct.pack(">II", *array.shape[1:]) if array.ndim == 3 else b"")
    return header + array.astype(np.uint8).tobytes()


def synthetic_mnist(folder: Path, n: int, gz: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        data = idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data, compresslevel=1))
        else:
            (folder / stem).write_bytes(data)
    return images, labels


def test_read_idx_round_trip(tmp_path: Path) -> None:
    arr = np.arange(2 * 28 * 28, dtype=np.uint64).reshape(2, 28, 28) % 256
    (tmp_path / "i").write_bytes(idx_bytes(arr))
    (tmp_path / "l.gz").write_bytes(gzip.compress(idx_bytes(np.array([3, 7]))))
    assert np.array_equal(read_idx(tmp_path / "i"), arr)
    assert read_idx(tmp_path / "l.gz").tolist() == [3, 7]


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">II", 2052, 1) + b"\0" * 4)
    with pytest.raises(
        DataError, match="^" + str(path).replace(".", r"\.") + r": magic number 2052 is neither 2049 \(labels\) nor 2051 \(images\)$"
    ):
        read_idx(path)


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("short", b"\0\0\x08", r"too short for an IDX header$"),
        ("short-image", struct.pack(">II", 2051, 1) + b"\0\0", r"too short for an IDX image header$"),
        ("count", struct.pack(">II", 2049, 10) + b"\0" * 9, r"header promises 10 bytes of data, file holds 9$"),
        ("bad.gz", b"not gzip at all", r"cannot be read as an IDX file: "),
    ],
)
def test_read_idx_refuses(tmp_path: Path, name: str, data: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError, match="^" + str(path).replace(".", r"\.") + ": " + reason):
        read_idx(path)


def test_data_dir_replaces_training_images(tmp_path: Path) -> None:
    images, labels = synthetic_mnist(tmp_path / "raw", 6000)
    splits = load_mnist(tmp_path / "raw")
    assert len(splits.train) + len(splits.val) == 6000
    assert len(splits.train) > 0 and len(splits.val) > 0
    both = torch.cat([splits.train.images, splits.val.images])
    assert torch.equal(both, torch.from_numpy(images.reshape(6000, 784).astype(np.float32) / 255.0))
    assert torch.cat([splits.train.labels, splits.val.labels]).tolist() == labels.tolist()
    assert len(splits.heldout) == 1000  # the bundled t10k tail still evaluates


def test_data_dir_gzipped(tmp_path: Path) -> None:
    images, _ = synthetic_mnist(tmp_path / "raw", 5100, gz=True)
    splits = load_mnist(tmp_path / "raw")
    assert len(splits.train) + len(splits.val) == 5100
    assert torch.equal(splits.train.images[0], torch.from_numpy(images[0].reshape(784).astype(np.float32) / 255.0))


def test_small_data_dir_keeps_a_training_split(tmp_path: Path) -> None:
    synthetic_mnist(tmp_path / "raw", 600)
    splits = load_mnist(tmp_path / "raw")
    assert len(splits.train) + len(splits.val) == 600
    assert len(splits.train) > 0 and len(splits.val) > 0


def test_data_dir_without_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="^" + str(tmp_path).replace(".", r"\.") + r": no train-images-idx3-ubyte\[\.gz\] found"):
        load_mnist(tmp_path)


def test_cli_trains_on_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthetic_mnist(tmp_path / "raw", 6000)
    expected_train = len(load_mnist(tmp_path / "raw").train)
    run = tmp_path / "run"
    assert train("vae", run, "--epochs", "1", "--data-dir", str(tmp_path / "raw")) == 0
    metrics: dict[str, Any] = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == -(-expected_train // 256)
    assert metrics["task_args"]["data_dir"] == str(tmp_path / "raw")


def test_cli_missing_data_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train("vae", tmp_path / "run", "--epochs", "1", "--data-dir", str(tmp_path / "empty")) == 2
    assert _error_line(capsys.readouterr().err).startswith(f"error: {tmp_path / 'empty'}: no train-images-idx3-ubyte")


# -- the options of each model train and export ---------------------------------------------------

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
    "transformer-seed-block": ([*TINY["transformer"], "--block", "seed", "--dropout", "0.1"], {"block": "seed", "dropout": 0.1}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_options_train_and_export(tmp_path: Path, variant: str) -> None:
    args, expected = VARIANTS[variant]
    assert main([*args, "--device", "cpu", "--epochs", "1", "--run-dir", str(tmp_path)]) == 0
    config = load_model(tmp_path / "model.safetensors").config
    assert {k: getattr(config, k) for k in expected} == expected
