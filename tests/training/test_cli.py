"""The command lines of ``python -m training`` and the benchmarks: the [train] extra check, help texts and
their defaults, usage lines, and errors that exit 2."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import training.__main__ as training_cli
from engine.modelfile import export_model
from engine.models.vae import VAE, VAEConfig
from tests.paths import ROOT
from tests.training.tiny_runs import train
from training.__main__ import build_parser, main

pytestmark = pytest.mark.timeout(120)

EXTRA_ERROR = "python -m training needs the [train] extra ({} not installed): pip install 'genserve[train]'"


# -- the [train] extra is checked before the first epoch ----------------------------------------


def without(monkeypatch: pytest.MonkeyPatch, *absent: str) -> None:
    """Make ``importlib.util.find_spec`` report ``absent`` as not installed."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name in absent else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("command", ["vae", "gan", "transformer", "classifier"])
def test_training_without_matplotlib_stops_before_the_first_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    without(monkeypatch, "matplotlib")
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main([command, "--epochs", "1", "--device", "cpu", "--run-dir", str(run)])
    assert info.value.code == EXTRA_ERROR.format("matplotlib")
    assert not run.exists()  # no run folder, so no epoch: the check came first


def test_resume_without_matplotlib_stops_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    without(monkeypatch, "matplotlib")
    with pytest.raises(SystemExit) as info:
        main(["resume", str(tmp_path / "missing.safetensors")])
    assert info.value.code == EXTRA_ERROR.format("matplotlib")


def test_export_needs_no_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    without(monkeypatch, "matplotlib")
    assert training_cli.missing_train_modules() == ["matplotlib"]
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    # past the extra check: export reads the checkpoint and refuses it (exit status 2, not the extra's 1)
    assert main(["export", str(garbage), "--out", str(tmp_path / "out.safetensors")]) == 2
    assert str(garbage) in capsys.readouterr().err


@pytest.mark.parametrize("blocked", [["matplotlib"], ["torch", "matplotlib"]], ids=["matplotlib", "torch+matplotlib"])
def test_module_without_the_train_extra_exits_with_one_line(tmp_path: Path, blocked: list[str]) -> None:
    """As in the [server]-only venv of scripts/serve.sh: the module's import is refused (sys.modules[name] = None)."""
    run = tmp_path / "run"
    argv = ["training", "vae", "--epochs", "1", "--device", "cpu", "--run-dir", str(run)]
    code = (
        "import runpy, sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        f"sys.argv = {argv!r}\n"
        "runpy.run_module('training', run_name='__main__', alter_sys=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [EXTRA_ERROR.format(", ".join(blocked))]
    assert not run.exists()


# -- every option says what it does and what its default is -------------------------------------


def help_entries(text: str) -> dict[str, str]:
    """Each argument of an argparse --help page (by its first option string or its name) -> its help text."""
    entries: dict[str, str] = {}
    current = ""
    in_section = False
    for line in text.splitlines():
        if line and not line.startswith(" "):  # a section heading ("options:"), or usage / description text
            in_section = line.endswith(":") and not line.startswith("usage:")
            current = ""
        elif in_section and re.match(r"  \S", line):  # an argument: invocation, then its help after 2+ spaces
            invocation, _, help_text = line.strip().partition("  ")
            current = invocation.split()[0].rstrip(",")
            entries[current] = help_text.strip()
        elif in_section and current and line.strip():  # help continued on the next lines
            entries[current] = f"{entries[current]} {line.strip()}".strip()
    return entries


def parsers() -> dict[str, argparse.ArgumentParser]:
    top = build_parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {"": top, **subs.choices}


@pytest.mark.parametrize("command", list(parsers()))
def test_every_option_has_a_help_and_shows_its_default(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal's width
    parser = parsers()[command]
    entries = help_entries(parser.format_help())
    names = {(a.option_strings[0] if a.option_strings else a.metavar or a.dest) for a in parser._actions}
    assert set(entries) == names  # the parsing above found every argument
    lacking = [name for name, text in entries.items() if not text]
    assert not lacking, f"python -m training {command}: no help for {lacking}"
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            text = entries[action.option_strings[0]]
            assert "(default: " in text, f"python -m training {command} {action.option_strings[0]}: no default shown: {text}"


# -- every `python -m` entry point of training/ and bench/ names its module ------------------------


def entry_points() -> list[str]:
    """Modules run as ``python -m``: packages with a __main__.py, modules with a __main__ block."""
    found = []
    for package in ("training", "bench"):
        if (ROOT / package / "__main__.py").exists():
            found.append(package)
        for path in sorted((ROOT / package).glob("*.py")):
            if path.stem != "__main__" and re.search(r'^if __name__ == "__main__":', path.read_text(), flags=re.M):
                found.append(f"{package}.{path.stem}")
    return found


def test_entry_points_are_found() -> None:
    modules = entry_points()
    assert {"training", "training.eval", "bench.tiles", "bench.engine", "bench.serve"} <= set(modules)


def test_every_entry_point_names_its_module_in_usage() -> None:
    def usage(module: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        return module, result

    # a couple of seconds each for those that import torch: in parallel, about 10 s in all on 2 cores
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(usage, entry_points()))
    wrong = {}
    for module, result in results:
        if result.returncode != 0 or result.stdout.split()[:4] != ["usage:", "python", "-m", module]:
            wrong[module] = (result.stdout.splitlines() or [""])[0] + result.stderr[-300:]
    assert not wrong, wrong


# -- help and errors ----------------------------------------------------------------------------


def test_module_help_runs(repo_root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training", "--help"], check=False, cwd=repo_root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m training")
    for command in ("vae", "gan", "transformer", "classifier", "flow", "resume", "export"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["vae", "gan", "transformer", "classifier", "flow", "resume", "export"])
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


@pytest.mark.parametrize("task", ["vae", "gan", "transformer", "classifier", "flow"])
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
