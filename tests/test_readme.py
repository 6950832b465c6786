"""The README's and the docs' examples work as typed: a broken example fails CI.

Pages: README.md and every docs/**/*.md.

- every ``$`` command of a ``console`` block runs against a real server (one, on a free port,
  reached through ``$GENSERVE_TARGET`` so the commands stay as a user types them), in a scratch
  folder; the output shown must be what it prints (a shown output ending in ``...`` is checked
  up to its first line, for sampled text), an error shown must be the error printed;
- every ``python`` block runs as a script, its ``127.0.0.1:50051`` pointed at that server (a block
  that needs a RabbitMQ broker is only compiled);
- the README's training example (an ``sh`` block that trains, resumes or exports) runs for real, in
  a scratch folder whose ``models/`` stands in for the served one: the real ``models/`` is never
  written;
- every ``python -m server``, ``python -m clients``, ``python -m training`` and
  ``scripts/serve.sh`` line of an ``sh`` block is parsed by the real argument parser, so a renamed
  or removed flag fails (those commands serve, train or benchmark for minutes: not run here).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.runtime.front import free_port

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
README_ADDRESS = "127.0.0.1:50051"  # what the examples' Python dials; the test's server is elsewhere
README_HTTP = "127.0.0.1:8000"  # ... and its HTTP edge
TRAINS = re.compile(r"-m training (vae|gan|transformer|classifier|resume|export)\b")  # an sh line that trains or writes a model
NEEDS_BROKER = "AmqpClient("  # a python block that dials RabbitMQ: compiled, not run


def page_name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def blocks(kind: str, page: Path = README) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```", page.read_text(), flags=re.S | re.M)


@dataclass(frozen=True)
class Example:
    page: str
    command: str
    shown: list[str]  # the output printed under it on the page


def console_examples() -> list[Example]:
    examples: list[Example] = []
    for page in PAGES:
        for block in blocks("console", page):
            for line in block.splitlines():
                if line.startswith("$ "):
                    examples.append(Example(page_name(page), line[2:], []))
                elif examples:
                    examples[-1].shown.append(line)
    return examples


def command_lines(block: str) -> list[str]:
    """Each command line of an sh block, continuation lines joined, comments dropped."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(" ".join(shlex.quote(w) for w in words))
    return commands


def sh_commands(pages: list[Path] = PAGES) -> list[str]:
    return [command for page in pages for block in blocks("sh", page) for command in command_lines(block)]


def python_blocks() -> list[tuple[str, str]]:
    """(page:index, code) of every python block."""
    return [(f"{page_name(page)}:{i}", code) for page in PAGES for i, code in enumerate(blocks("python", page))]


def training_blocks() -> list[str]:
    """The README's sh blocks that train or export a model: run for real."""
    return [block for block in blocks("sh") if any(TRAINS.search(c) for c in command_lines(block))]


class Server:
    """``python -m server`` on a free port (CPU, so ``models`` prints as in the README), JSON logs read on a thread."""

    def __init__(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "server",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            str(free_port()),
            "--device",
            "cpu",
            "--threads",
            "1",
            "--log-format",
            "json",
        ]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.address = ""
        self.http = ""  # host:port of its HTTP edge
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(90) or not self.address:
            self.proc.kill()
            raise AssertionError("server did not become ready:\n" + "".join(self.lines[-5:]))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(line).get("event") == "server_ready":
                    self.address = json.loads(line)["address"]
                    self.http = json.loads(line)["http"].split("://", 1)[1]
                    self._ready.set()
        self._ready.set()  # it exited before it was ready

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.stop()


def environment(address: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENSERVE_")}
    # one torch thread, as for every test: the machine is shared (tests/conftest.py)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if address:
        env["GENSERVE_TARGET"] = address
    return env


def test_the_readme_has_the_tour_and_the_training_example() -> None:  # the parsing below finds what it should
    commands = [e.command for e in console_examples()]
    assert any(" clients models" in c for c in commands) and any(" clients images gan" in c for c in commands)
    assert any(" clients text " in c for c in commands) and any("from clients import Client" in b for b in blocks("python"))
    assert [b for b in training_blocks() if "training export" in b and "\nmv " in b], "the README trains, exports and publishes a model"
    assert len(sh_commands()) >= 30 and len(python_blocks()) >= 3


@pytest.mark.parametrize("example", console_examples(), ids=lambda e: e.command.split(" -m ")[-1][:40])
def test_console_commands_work_as_typed(example: Example, server: Server, tmp_path: Path) -> None:
    argv = shlex.split(example.command.replace(README_HTTP, server.http))
    assert argv[0] in (".venv/bin/python", "curl"), f"{example.page}: commands run the project's venv python (or curl)"
    if argv[0] == "curl":
        assert shutil.which("curl"), "curl is not installed"
    else:
        argv[0] = sys.executable
    result = subprocess.run(argv, cwd=tmp_path, env=environment(server.address), capture_output=True, text=True, timeout=60)
    shown = "\n".join(example.shown).strip("\n")
    if shown.startswith("python -m clients: error:"):
        assert (result.returncode, result.stderr.strip()) == (1, shown)
        return
    assert result.returncode == 0, result.stderr
    if shown.endswith("..."):  # sampled text: the first line is the prompt (or a line's start, when it ends in ...)
        assert result.stdout.startswith(example.shown[0].removesuffix("...")), result.stdout
    else:
        assert result.stdout.strip("\n") == shown
    for path in re.findall(r"^wrote (\S+)", result.stdout, flags=re.M):
        assert (tmp_path / path).is_file()


@pytest.mark.parametrize(("where", "code"), python_blocks(), ids=[where for where, _ in python_blocks()])
def test_python_blocks_run(where: str, code: str, server: Server, tmp_path: Path) -> None:
    if NEEDS_BROKER in code:  # no RabbitMQ here: it must at least be valid Python
        compile(code, where, "exec")
        return
    script = tmp_path / "example.py"
    script.write_text(code.replace(README_ADDRESS, server.address).replace(README_HTTP, server.http))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=environment(server.address), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{where}:\n{code}\n{result.stderr[-2000:]}"


@pytest.mark.parametrize("block", training_blocks(), ids=lambda b: f"{len(command_lines(b))} commands")
def test_the_training_example_runs(block: str, tmp_path: Path) -> None:
    """Train, resume, export and publish as typed, in a scratch folder: runs/ and models/ are its own."""
    served = sorted(p.name for p in (ROOT / "models").iterdir())
    (tmp_path / "models").mkdir()
    for command in command_lines(block):
        argv = shlex.split(command)
        if argv[0] == ".venv/bin/python":
            argv[0] = sys.executable
        else:
            assert argv[0] in ("mv", "cp", "mkdir"), f"the example runs a program the test does not expect: {command}"
        result = subprocess.run(argv, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
    from engine.modelfile import load_model

    published = sorted((tmp_path / "models").glob("*.safetensors"))
    assert published, "the example leaves a model in models/"
    for path in published:
        assert load_model(path).kind in ("vae", "wgan-gp", "char-transformer")
    assert sorted(p.name for p in (ROOT / "models").iterdir()) == served, "the real models/ folder was written"


def parse(command: str) -> None:
    """Parse one command line with the parser of the program it runs; SystemExit(2) is a usage error."""
    from clients.cli import build_parser as clients_parser
    from server.config import parse_args as server_args
    from training.__main__ import build_parser as training_parser

    words = shlex.split(command)
    environ = {}
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        key, _, value = words.pop(0).partition("=")
        environ[key] = value
    if words[:2] == ["bash", "scripts/serve.sh"]:
        program, argv = "server", ["--models-dir", "models", *words[2:]]
    elif len(words) >= 3 and words[0].endswith("python") and words[1] == "-m":
        program, argv = words[2], words[3:]
    else:
        return  # another program (grpcurl, cp, bash scripts/test.sh) or module (bench, training.eval, tests.chaos)
    with contextlib.redirect_stdout(io.StringIO()):  # --help prints and exits 0
        try:
            if program == "server":
                server_args(argv, environ)
            elif program == "clients":
                clients_parser().parse_args(argv)
            elif program == "training":
                training_parser().parse_args(argv)
        except SystemExit as e:
            assert e.code == 0, f"command does not parse: {command}"


@pytest.mark.parametrize("command", sh_commands())
def test_sh_commands_parse(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    parse(command)
    assert "error:" not in capsys.readouterr().err
