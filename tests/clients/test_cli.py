"""The command line, ``python -m clients`` (clients/cli.py): argument parsing, usage errors, error lines,
image grids, and a reader that closes the pipe (against a fake server)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clients import (
    DeadlineExceeded,
    GenserveError,
    Unavailable,
)
from clients._protocol import TextOptions
from clients.cli import PAD, PAD_VALUE, Received, _error_line, build_parser, image_format, image_grid, main, make_client, write_grid
from tests.clients.fake_server import fake_server
from tests.paths import ROOT

pytestmark = pytest.mark.timeout(60)  # the async tests carry their own asyncio mark

LABELS = "labels must be integers in the model's range (see its label_min and label_max), got"
TEMPERATURE = "temperature must be a finite number >= 0 (0 means greedy), got"


def test_image_grid_tiles_samples_row_by_row() -> None:
    images = np.stack([np.full((4, 4), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = image_grid(images)  # 5 samples: 3 columns, 2 rows
    assert grid.shape == (2 * (4 + PAD) + PAD, 3 * (4 + PAD) + PAD)
    assert grid[0, 0] == PAD_VALUE
    assert grid[PAD, PAD] == 10 and grid[PAD, PAD + 2 * (4 + PAD)] == 30 and grid[PAD + 4 + PAD, PAD + 4 + PAD] == 50
    assert grid[-3, -3] == PAD_VALUE  # the empty sixth tile
    assert image_grid(images, cols=5, scale=3).shape == (3 * (4 + 2 * PAD), 3 * (5 * (4 + PAD) + PAD))


def test_write_grid_writes_a_grayscale_png(tmp_path: Path) -> None:
    images = np.zeros((16, 28, 28), np.uint8)
    images[:, 10:18, 10:18] = 255
    path = tmp_path / "grid.png"
    write_grid(images, path)
    with Image.open(path) as png:
        assert (png.format, png.mode, png.size) == ("PNG", "L", (4 * 30 + 2, 4 * 30 + 2))
        assert np.asarray(png)[PAD + 12, PAD + 12] == 255


@pytest.mark.parametrize(("name", "format"), [("grid.jpg", "JPEG"), ("grid.JPEG", "JPEG"), ("grid.webp", "WEBP"), ("grid.png", "PNG")])
def test_write_grid_picks_the_format_by_extension(tmp_path: Path, name: str, format: str) -> None:
    path = tmp_path / name
    write_grid(np.zeros((4, 28, 28), np.uint8), path)
    with Image.open(path) as image:
        assert image.format == format


def test_an_unknown_image_extension_is_refused_before_any_request(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:  # the target is down: a request would fail otherwise
        main(["images", "vae", "--out", "grid.xyz", "--target", "127.0.0.1:1"])
    assert exit.value.code == 2
    assert "--out grid.xyz: cannot tell the image format from .xyz; end it in one of .png, .jpg" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a name without an extension"):
        image_format("grid")


@pytest.mark.parametrize(
    ("error", "received", "line"),
    [
        (
            Unavailable("failed to connect to all addresses; last error: Connection refused"),
            Received(),
            "cannot reach the server at h:1: failed to connect",
        ),
        (
            Unavailable("server is shutting down; send the request to another server"),
            Received(),
            "the server at h:1 is unavailable: server is shutting down",
        ),
        (Unavailable("Stream removed (Socket closed)"), Received(57, "characters"), "the connection to the server at h:1 closed after 57"),
        (Unavailable("Socket closed"), Received(), "the connection to the server at h:1 closed mid-call: Socket closed"),
        (DeadlineExceeded("Deadline Exceeded"), Received(8, "samples"), "DeadlineExceeded after 8 samples: Deadline Exceeded"),
    ],
)
def test_error_lines_say_what_happened(error: GenserveError, received: Received, line: str) -> None:
    assert _error_line(error, ["h:1"], received).startswith(line)


def test_connection_options_go_before_or_after_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GENSERVE_TARGET", raising=False)
    parser = build_parser()
    args = parser.parse_args(["--target", "a:1", "--timeout", "5", "images", "vae", "--target", "b:2", "-n", "4", "--target", "c:3"])
    assert make_client(args, parser).targets == ("a:1", "b:2", "c:3")
    assert (args.timeout, args.n, args.out, args.labels) == (5.0, 4, "grid.png", None)
    args = parser.parse_args(["text", "transformer", "--prompt", "ROMEO:", "--stop", "\n", "--token", "t", "--timeout", "2"])
    assert (args.timeout, args.token, args.stop, args.max_tokens) == (2.0, "t", ["\n"], None)
    assert make_client(args, parser).targets == ("127.0.0.1:50051",)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["images", "vae", "-n", "4", "--seed", "-1"], "seed must be an integer from 0 to 2**63-1, got -1"),
        (
            ["images", "vae", "-n", "4", "--seed", "18446744073709551616"],
            "seed must be an integer from 0 to 2**63-1, got 18446744073709551616",
        ),
        (["images", "gan", "-n", "2", "--version", "-1"], "version must be an integer from 0 to 2**32-1 (0: the latest), got -1"),
        (
            ["images", "gan", "-n", "4", "--labels", "0-9"],
            "labels has 10 entries, more than the 4 samples; give at most 4 labels (fewer are cycled)",
        ),
        (["images", "gan", "--labels", "3000000000"], f"{LABELS} 3000000000"),
        (["images", "vae", "-n", "4294967296"], "n must be an integer from 1 to the model's max_n, got 4294967296"),
        (["text", "transformer", "-p", "ROMEO:", "--top-k", "-1"], "top_k must be an integer from 0 to 2**32-1 (0 turns it off), got -1"),
        (["text", "transformer", "-p", "ROMEO:", "--seed", "-1"], "seed must be an integer from 0 to 2**64-1, got -1"),
        (["text", "transformer", "-p", "ROMEO:", "--temperature", "nan"], f"{TEMPERATURE} nan"),
        (["text", "transformer", "-p", "ROMEO:", "--top-p", "inf"], "top_p must be in (0, 1] (1 turns it off), got inf"),
        (
            ["text", "transformer", "-p", "ROMEO:", "--max-tokens", "4294967296"],
            "max_new_tokens must be an integer from 1 to the server's max_new_tokens, got 4294967296",
        ),
    ],
)
def test_a_value_no_request_can_carry_is_a_usage_error_before_any_call(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:  # the target is down: a request would fail otherwise, with status 1
        main([*argv, "--target", "127.0.0.1:1", "--timeout", "2"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith(f"\npython -m clients: error: {message}\n") and "Traceback" not in err


def test_text_help_gives_no_number_for_the_servers_default_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["text", "--help"])
    usage = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "tokens to generate (default: the server's --default-new-tokens)" in usage.replace("- ", "-") and "256" not in usage
    assert TextOptions.__doc__ is not None and "256" not in TextOptions.__doc__  # no number that can drift from the server's


@pytest.mark.parametrize("argv", [[], ["images"], ["images", "vae", "-n", "0"], ["text", "t"], ["models", "--timeout", "-1"]])
def test_usage_errors_exit_with_status_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(argv)
    assert exit.value.code == 2
    assert "usage: python -m clients" in capsys.readouterr().err


async def run_cli(argv: list[str], stdout: int) -> tuple[int, str]:
    """``python -m clients ARGV`` in a child process writing to ``stdout`` (a file descriptor); its status and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients", *argv, stdout=stdout, stderr=asyncio.subprocess.PIPE, cwd=ROOT
    )
    os.close(stdout)  # the child has its copy
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, err.decode()


@pytest.mark.asyncio
async def test_the_cli_ends_quietly_when_the_reader_has_closed_the_pipe() -> None:
    """``python -m clients models --json | head -1``: a reader that stops reading has what it wanted; no error."""
    async with fake_server() as (address, fake):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first line: every write meets EPIPE
        assert await run_cli(["models", "--json", "--target", address], write) == (0, "")  # no "error: Broken pipe", no traceback
        assert fake.calls["ListModels"] == 1


@pytest.mark.asyncio
async def test_the_cli_ends_quietly_when_the_reader_closes_the_pipe_mid_stream() -> None:
    """``python -m clients text ... | head -c 1``: the stream meets a pipe its reader closed after the first piece."""
    async with fake_server() as (address, fake):
        fake.text_delay = 0.05
        read, write = os.pipe()
        cli = asyncio.create_task(run_cli(["text", "transformer", "-p", "abcdefgh", "--no-echo", "--target", address], write))
        assert await asyncio.to_thread(os.read, read, 1) == b"a"
        os.close(read)
        assert await cli == (0, "")
        assert fake.calls["Generate"] == 1
