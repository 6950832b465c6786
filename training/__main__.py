"""``python -m training``: train, resume and export genserve's models."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

# The [train] extra (pyproject.toml). matplotlib draws only the loss curve, so `export` runs without it.
TRAIN_MODULES = ("torch", "safetensors", "structlog", "matplotlib")


def missing_train_modules() -> list[str]:
    """The modules of the [train] extra that this environment lacks."""
    return [name for name in TRAIN_MODULES if importlib.util.find_spec(name) is None]


def train_extra_error(missing: list[str]) -> str:
    return f"python -m training needs the [train] extra ({', '.join(missing)} not installed): pip install 'genserve[train]'"


# before the imports below need them (as server/__main__.py does for [server]); main() checks
# matplotlib once it knows the command, so that a missing plot library stops a run before its first epoch
if __name__ == "__main__" and set(_missing := missing_train_modules()) - {"matplotlib"}:
    sys.exit(train_extra_error(_missing))

import torch  # noqa: E402  (after the check above)

from engine.errors import ModelFileError  # noqa: E402
from engine.logs import configure_logging, get_logger  # noqa: E402
from engine.modelfile import export_model  # noqa: E402
from training.checkpoint import load_checkpoint, module_state  # noqa: E402
from training.data import DataError  # noqa: E402
from training.loop import LoopConfig, TrainingRun, seed_everything  # noqa: E402
from training.task import Task  # noqa: E402

log = get_logger("training")


def task_classes() -> dict[str, type[Task]]:
    from training.classifier import ClassifierTask
    from training.flow import FlowTask
    from training.gan import GANTask
    from training.transformer import TransformerTask
    from training.vae import VAETask

    return {"vae": VAETask, "gan": GANTask, "transformer": TransformerTask, "classifier": ClassifierTask, "flow": FlowTask}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" from the parser's own default, so each default has one source (a
    task's ``set_defaults`` included) and no help text repeats it; nothing for None and False,
    whose help says what happens."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training loop")
    g.add_argument("--epochs", type=int, help="maximum number of epochs")
    g.add_argument("--batch-size", type=int, help="examples per optimisation step")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up length in epochs, then cosine decay")
    g.add_argument("--min-lr-ratio", type=float, default=0.01, help="final learning rate as a fraction of the peak")
    g.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip; 0 = off")
    g.add_argument("--patience", type=int, help="early stopping after this many epochs without a better validation loss; 0 = off")
    g.add_argument("--save-every", type=int, default=10, help="checkpoint every N epochs, besides best and last")
    g.add_argument("--max-minutes", type=float, default=0.0, help="stop training after this much wall-clock time; 0 = no limit")
    g.add_argument("--seed", type=int, default=0, help="seed of every RNG, for reproducible runs")
    g = p.add_argument_group("environment")
    g.add_argument("--data-dir", type=Path, help="folder of standard MNIST IDX files (the 60k set) to train on instead of the bundled 9000")
    g.add_argument("--run-dir", type=Path, help="output folder (default runs/<model>-<time>)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train (auto: cuda if there is one)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    add_log_format(g)


LOG_FORMAT_HELP = "log lines as readable text or as one JSON object each"


def add_log_format(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--log-format", choices=["console", "json"], default="console", help=LOG_FORMAT_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train genserve's generative models, resume a run, or export a checkpoint.",
        epilog="Each run folder gets loss_curve.png, samples.png (or samples.txt), metrics.json, model.safetensors and checkpoints/.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do; COMMAND --help lists its options")
    helps = {
        "vae": "train the VAE on MNIST",
        "gan": "train the WGAN-GP on MNIST",
        "transformer": "train the character-level Transformer on tiny shakespeare",
        "classifier": "train the digit classifier that training.eval uses to judge samples",
        "flow": "train the latent flow-matching model on the bundled VAE's latents",
    }
    for name, cls in task_classes().items():
        p = sub.add_parser(name, help=helps[name], description=helps[name], formatter_class=DefaultsFormatter)
        add_common(p)  # first, so that a task's set_defaults() overrides the common defaults
        cls.add_arguments(p)
    p = sub.add_parser(
        "resume",
        help="continue a run from one of its checkpoints",
        description="Continue a run from a checkpoint, as if it had never stopped.",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("checkpoint", type=Path, help="a checkpoint of the run (RUN/checkpoints/*.safetensors)")
    p.add_argument(
        "--epochs", type=int, help="raise the run's epoch limit (changes the cosine schedule's length; default: the run's own limit)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train (auto: cuda if there is one)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    add_log_format(p)
    p = sub.add_parser(
        "export",
        help="write a model file from a checkpoint",
        description="Export the served model of a checkpoint as a .safetensors model file.",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("checkpoint", type=Path, help="a checkpoint of a run (RUN/checkpoints/*.safetensors)")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="model file to write; to publish into a served models folder, write elsewhere on its file system, then mv it in",
    )
    add_log_format(p)
    return parser


def _loop_config(args: argparse.Namespace) -> LoopConfig:
    return LoopConfig(
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        min_lr_ratio=args.min_lr_ratio,
        patience=args.patience,
        save_every=args.save_every,
        seed=args.seed,
        max_minutes=args.max_minutes,
    )


def _task_args(args: argparse.Namespace) -> dict[str, Any]:
    # absolute paths, so that resume and export work from any working directory
    return {
        k: (str(v.resolve()) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in {"log_format", "threads", "device"}
    }


def _namespace(task_args: dict[str, Any]) -> argparse.Namespace:
    ns = argparse.Namespace(**task_args)
    for key in ("data_dir", "run_dir"):
        value = getattr(ns, key, None)
        setattr(ns, key, Path(value) if value else None)
    return ns


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    seed_everything(args.seed)
    run_dir = args.run_dir or Path("runs") / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    args.run_dir = run_dir
    log.info("training", model=args.command, device=str(device), threads=torch.get_num_threads(), run_dir=str(run_dir))
    task = task_classes()[args.command](args, device)
    return TrainingRun(task, _loop_config(args), run_dir, _task_args(args)).run()


def cmd_resume(args: argparse.Namespace) -> dict[str, Any]:
    ckpt = load_checkpoint(args.checkpoint)
    saved = _namespace(ckpt.state["task_args"])
    if args.epochs:
        saved.epochs = args.epochs
    device = pick_device(args.device)
    seed_everything(saved.seed)
    task = task_classes()[saved.command](saved, device)
    run = TrainingRun(task, _loop_config(saved), saved.run_dir, _task_args(saved))
    run.restore(ckpt)
    log.info("resuming", checkpoint=str(args.checkpoint), epoch=run.epoch, step=run.step, device=str(device))
    return run.run()


def cmd_export(args: argparse.Namespace) -> Path:
    ckpt = load_checkpoint(args.checkpoint)
    saved = _namespace(ckpt.state["task_args"])
    task = task_classes()[saved.command](saved, torch.device("cpu"))
    for name, module in task.modules().items():
        module.load_state_dict(module_state(ckpt, name))
    history = ckpt.state["history"]
    figures = {
        "kind": task.kind,
        "epochs_run": ckpt.state["epoch"],
        "steps": ckpt.state["step"],
        "last_val_loss": history[-1]["val_loss"] if history else None,
    }
    out = export_model(args.out, task.kind, task.export_module().eval(), vocab=task.export_vocab(), training=figures)
    log.info("exported", checkpoint=str(args.checkpoint), out=str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "export" and (missing := missing_train_modules()):
        raise SystemExit(train_extra_error(missing))  # before any epoch: a run must not die at its end
    configure_logging(args.log_format)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    try:
        if args.command == "resume":
            cmd_resume(args)
        elif args.command == "export":
            cmd_export(args)
        else:
            metrics = cmd_train(args)
            print(json.dumps({k: v for k, v in metrics.items() if k not in {"history", "task_args", "loop"}}))
    except (ModelFileError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:  # a checkpoint whose JSON lacks a field the loop needs
        print(f"error: {getattr(args, 'checkpoint', '')}: checkpoint lacks {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
