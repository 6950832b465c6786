"""The one training loop for every model.

Per epoch: a progress bar (tqdm), mean train figures, a validation pass, early stopping on
validation loss, a checkpoint every ``save_every`` epochs and at the best epoch. The learning rate
follows linear warm-up then cosine decay, computed from the global step, so a resumed run is on
the same schedule. Resume restores modules, optimisers, the step, the epoch, early-stopping state
and every RNG, and continues as if never stopped (the training tests check bit equality).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.logs import get_logger
from engine.modelfile import export_model
from training import plots
from training.checkpoint import Checkpoint, load_checkpoint, module_state, restore_optimizer, save_checkpoint
from training.task import Task

log = get_logger("training")


@dataclass(frozen=True)
class LoopConfig:
    epochs: int
    warmup_epochs: float = 0.0  # linear warm-up length, in epochs (fractions allowed)
    min_lr_ratio: float = 0.01  # cosine decays to base_lr * this (the reference script: 1e-3 -> 1e-5)
    patience: int = 15  # epochs without a better validation loss before stopping; 0 = never
    save_every: int = 10  # checkpoint period in epochs; 0 = only best and last
    seed: int = 0
    max_minutes: float = 0.0  # wall-clock budget for training steps; 0 = none


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _rng_state(data_gen: torch.Generator) -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


class TrainingRun:
    """State of one run; ``run()`` trains from wherever the state says."""

    def __init__(self, task: Task, config: LoopConfig, run_dir: Path, task_args: dict[str, Any]) -> None:
        self.task = task
        self.config = config
        self.run_dir = run_dir
        self.task_args = task_args
        self.epoch = 0  # epochs completed
        self.step = 0
        self.best_val = math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.history: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self.data_gen = torch.Generator()
        self.data_gen.manual_seed(config.seed)
        for opt in task.optimizers().values():
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])

    # -- checkpoints -------------------------------------------------------------------------
    def _loop_state(self) -> dict[str, Any]:
        return {
            "kind": self.task.kind,
            "task_args": self.task_args,
            "loop": self.config.__dict__,
            "epoch": self.epoch,
            "step": self.step,
            "best_val": self.best_val if math.isfinite(self.best_val) else None,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "python_rng": random.getstate(),
        }

    def save(self, name: str) -> Path:
        return save_checkpoint(
            self.run_dir / "checkpoints" / f"{name}.safetensors",
            self.task.modules(),
            self.task.optimizers(),
            _rng_state(self.data_gen),
            self._loop_state(),
        )

    def restore(self, ckpt: Checkpoint) -> None:
        s = ckpt.state
        for name, module in self.task.modules().items():
            module.load_state_dict(module_state(ckpt, name))
        for name, opt in self.task.optimizers().items():
            restore_optimizer(f"optim.{name}", opt, ckpt.tensors, s["optimizers"][name])
        self.epoch, self.step = s["epoch"], s["step"]
        self.best_val = math.inf if s["best_val"] is None else s["best_val"]
        self.best_epoch, self.bad_epochs = s["best_epoch"], s["bad_epochs"]
        self.history, self.train_seconds = s["history"], s["train_seconds"]
        version, internal, gauss = s["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(ckpt.tensors["rng.torch"])
        self.data_gen.set_state(ckpt.tensors["rng.data"])
        if "rng.cuda" in ckpt.tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt.tensors["rng.cuda"])

    # -- training ----------------------------------------------------------------------------
    def _set_lr(self, total_steps: int, warmup_steps: int) -> float:
        factor = lr_factor(self.step, total_steps, warmup_steps, self.config.min_lr_ratio)
        for opt in self.task.optimizers().values():
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        return factor

    def _train_epoch(self, total_steps: int, warmup_steps: int, deadline: float) -> tuple[dict[str, float], bool]:
        task = self.task
        for m in task.modules().values():
            m.train()
        sums: dict[str, float] = {}
        count = 0
        out_of_time = False
        bar = tqdm(
            total=task.steps_per_epoch(),
            desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
            leave=False,
            disable=not sys.stderr.isatty(),
            file=sys.stderr,
        )
        started = time.perf_counter()
        for batch in task.batches(self.data_gen):
            self._set_lr(total_steps, warmup_steps)
            figures = task.train_step(batch)
            self.step += 1
            count += 1
            for k, v in figures.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix(loss=f"{figures['loss']:.4f}")
            if deadline and time.perf_counter() > deadline:
                out_of_time = True
                break
        bar.close()
        self.train_seconds += time.perf_counter() - started
        return {k: v / max(count, 1) for k, v in sums.items()}, out_of_time

    def run(self) -> dict[str, Any]:
        cfg = self.config
        total_steps = cfg.epochs * self.task.steps_per_epoch()
        warmup_steps = round(cfg.warmup_epochs * self.task.steps_per_epoch())
        budget = cfg.max_minutes * 60 - self.train_seconds
        deadline = time.perf_counter() + budget if cfg.max_minutes else 0.0
        stop_reason = "epochs"
        while self.epoch < cfg.epochs:
            t0 = time.perf_counter()
            train, out_of_time = self._train_epoch(total_steps, warmup_steps, deadline)
            for m in self.task.modules().values():
                m.eval()
            with torch.no_grad():
                val = self.task.validate()
            self.epoch += 1
            lr = self.task.optimizers()[next(iter(self.task.optimizers()))].param_groups[0]["lr"]
            row = {"epoch": self.epoch, **{f"train_{k}": v for k, v in train.items()}, **val, "lr": lr, "seconds": time.perf_counter() - t0}
            self.history.append(row)
            log.info("epoch", **{k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})
            improved = val["val_loss"] < self.best_val or not self.task.select_best
            if improved:
                self.best_val, self.best_epoch, self.bad_epochs = val["val_loss"], self.epoch, 0
                self.save("best")
            else:
                self.bad_epochs += 1
            if cfg.save_every and self.epoch % cfg.save_every == 0:
                self.save(f"epoch_{self.epoch:04d}")
            if out_of_time:
                stop_reason = "time budget"
                break
            if cfg.patience and self.bad_epochs >= cfg.patience:
                stop_reason = f"early stopping (no better validation loss for {cfg.patience} epochs)"
                break
        self.save("last")
        log.info("stopped", reason=stop_reason, best_epoch=self.best_epoch, best_val=self.best_val)
        return self.finish(stop_reason)

    def finish(self, stop_reason: str) -> dict[str, Any]:
        """Load the best epoch's weights, write the model file, metrics.json, the samples, then the loss curve."""
        best = self.run_dir / "checkpoints" / "best.safetensors"
        if best.exists():
            ckpt = load_checkpoint(best)
            for name, module in self.task.modules().items():
                module.load_state_dict(module_state(ckpt, name))
        for m in self.task.modules().values():
            m.eval()
        figures = {
            "kind": self.task.kind,
            "epochs_run": self.epoch,
            "steps": self.step,
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val,
            "train_seconds": round(self.train_seconds, 1),
            "stop_reason": stop_reason,
        }
        model_path = export_model(
            self.run_dir / "model.safetensors",
            self.task.kind,
            self.task.export_module(),
            vocab=self.task.export_vocab(),
            training=figures,
        )
        metrics = dict(figures, task_args=self.task_args, loop=self.config.__dict__, history=self.history)
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        samples = self.task.write_samples(self.run_dir, seed=self.config.seed)
        self._plot_loss_curve()
        log.info("run written", run_dir=str(self.run_dir), model=str(model_path), samples=str(samples))
        return metrics

    def _plot_loss_curve(self) -> None:
        """Last, and never fatal: a plot that cannot be drawn (no matplotlib, no font, a full disk)
        must not throw away a finished run, whose files are all written by now."""
        path = self.run_dir / "loss_curve.png"
        try:
            plots.loss_curve(self.history, path, title=self.task.kind)
        except Exception as e:
            log.warning("plot not drawn", path=str(path), error=" ".join(f"{type(e).__name__}: {e}".split()))  # one line
