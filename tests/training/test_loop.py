"""The training loop (training/loop.py): its learning-rate schedule, and a resumed run that is the
uninterrupted one bit for bit (modules, optimisers, RNGs), the EMA weights exported."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.modelfile import load_model
from tests.training.tiny_runs import train
from training.__main__ import main
from training.checkpoint import load_checkpoint
from training.loop import lr_factor

pytestmark = pytest.mark.timeout(120)


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
