"""The command lines of ``python -m training`` and the benchmarks: the [train] extra check, help texts, usage lines."""

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
from training.__main__ import build_parser, main

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
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
