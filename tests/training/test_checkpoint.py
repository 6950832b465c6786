"""Training checkpoints (training/checkpoint.py): an exact round trip (modules, optimiser, RNG), and
every file that is not one refused with its own message naming the file."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.errors import ModelFileError
from engine.modelfile import (
    export_model,
)
from tests.engine.model_files import PickleCanary, expect, save_st, tiny_vae
from training.checkpoint import (
    load_checkpoint,
    module_state,
    restore_optimizer,
    save_checkpoint,
)


def _checkpoint(path: Path) -> tuple[Path, nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    opt = torch.optim.Adam(module.parameters(), lr=0.1)
    module(torch.randn(4, 3)).sum().backward()
    opt.step()
    rng = {"torch": torch.get_rng_state()}
    save_checkpoint(path, {"net": module}, {"adam": opt}, rng, {"epoch": 1, "step": 1, "task_args": {}})
    return path, module, opt, rng["torch"]


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path, module, opt, rng = _checkpoint(tmp_path / "ckpts" / "c.safetensors")
    ckpt = load_checkpoint(path)
    assert ckpt.state["epoch"] == 1 and ckpt.state["version"] == 1
    for k, v in module.state_dict().items():
        assert torch.equal(module_state(ckpt, "net")[k], v)
    fresh = torch.optim.Adam(nn.Linear(3, 2).parameters(), lr=0.5)
    restore_optimizer("optim.adam", fresh, ckpt.tensors, ckpt.state["optimizers"]["adam"])
    a, b = opt.state_dict(), fresh.state_dict()
    assert json.loads(json.dumps(a["param_groups"])) == b["param_groups"]  # JSON turns betas into a list
    for idx in a["state"]:
        for key, value in a["state"][idx].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][idx][key])), (idx, key)
    assert torch.equal(ckpt.tensors["rng.torch"], rng)


def test_checkpoint_refuses_a_model_file(tmp_path: Path) -> None:
    path = export_model(tmp_path / "model.safetensors", "vae", tiny_vae())
    with pytest.raises(ModelFileError, match=expect(path, r"is not a genserve training checkpoint \(no 'checkpoint' metadata\)$")):
        load_checkpoint(path)


def test_checkpoint_refuses_text(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    path.write_text("definitely not a checkpoint")
    with pytest.raises(ModelFileError, match=expect(path, r"is not a safetensors file \(or is truncated\): header claims")):
        load_checkpoint(path)


def test_checkpoint_refuses_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "c.pt"
    path.write_bytes(pickle.dumps({"boom": PickleCanary(marker)}))
    with pytest.raises(ModelFileError, match=expect(path, r"is a Python pickle")):
        load_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_refuses_truncation(tmp_path: Path) -> None:
    path, *_ = _checkpoint(tmp_path / "c.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(
        ModelFileError, match=expect(path, r"data offsets \[\d+, \d+\] fall outside the \d+ data bytes \(truncated\?\)$", any_tensor=True)
    ):
        load_checkpoint(path)


def test_checkpoint_refuses_other_version(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_st(path, {"w": torch.zeros(1)}, {"checkpoint": json.dumps({"version": 99})})
    with pytest.raises(ModelFileError, match=expect(path, r"checkpoint version 99 is not supported$")):
        load_checkpoint(path)


def test_checkpoint_metadata_not_json(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_st(path, {"w": torch.zeros(1)}, {"checkpoint": "{epoch"})
    with pytest.raises(ModelFileError, match=expect(path, r"checkpoint metadata is not valid JSON \(")):
        load_checkpoint(path)
