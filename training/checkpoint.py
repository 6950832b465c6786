"""Pickle-free training checkpoints: one safetensors file with the loop's state as JSON metadata.

Tensors: ``module.<module>.<param>``, ``optim.<optimizer>.<param index>.<state key>`` and
``rng.<name>`` (torch generator states are uint8 tensors). Metadata ``checkpoint`` holds the rest
(epoch, step, early-stopping state, history, optimiser hyper-parameters, python's RNG, the task's
command-line arguments), so a checkpoint a user hands us is read without unpickling anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from engine.errors import ModelFileError
from engine.modelfile import read_header, save_atomically

CHECKPOINT_VERSION = 1


@dataclass
class Checkpoint:
    state: dict[str, Any]  # JSON part
    tensors: dict[str, torch.Tensor]


def optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(idx), {})[key] = t
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    path: Path,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    for mname, module in modules.items():
        for pname, t in module.state_dict().items():
            tensors[f"module.{mname}.{pname}"] = t.detach().cpu().contiguous()
    optim_meta = {}
    for oname, opt in optimizers.items():
        t, meta = optimizer_tensors(f"optim.{oname}", opt)
        tensors.update(t)
        optim_meta[oname] = meta
    for rname, t in rng.items():
        tensors[f"rng.{rname}"] = t.cpu().contiguous()
    full = dict(state, version=CHECKPOINT_VERSION, optimizers=optim_meta)
    return save_atomically(tensors, path, {"checkpoint": json.dumps(full)})  # an interrupted save leaves no half-written file


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    p = Path(path)
    _, metadata = read_header(p)
    if "checkpoint" not in metadata:
        raise ModelFileError(p, "is not a genserve training checkpoint (no 'checkpoint' metadata)")
    try:
        state = json.loads(metadata["checkpoint"])
    except json.JSONDecodeError as e:
        raise ModelFileError(p, f"checkpoint metadata is not valid JSON ({e})") from e
    if state.get("version") != CHECKPOINT_VERSION:
        raise ModelFileError(p, f"checkpoint version {state.get('version')!r} is not supported")
    try:
        with safe_open(str(p), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:
        raise ModelFileError(p, f"safetensors could not read the tensors: {e}") from e
    return Checkpoint(state=state, tensors=tensors)


def module_state(ckpt: Checkpoint, name: str) -> dict[str, torch.Tensor]:
    prefix = f"module.{name}."
    return {k[len(prefix) :]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
