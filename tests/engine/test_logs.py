"""engine/logs.py: fields bound for the process reach the lines of every thread."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import logs
from engine.logs import bind_process, configure_logging, get_logger
from tests.paths import ROOT


@pytest.fixture
def process_fields() -> Iterator[None]:
    yield
    logs._PROCESS_FIELDS.clear()


def test_a_process_field_is_on_the_lines_of_other_threads(capfd: pytest.CaptureFixture[str], process_fields: None) -> None:
    configure_logging("json", "info")  # bound to capfd's stderr; conftest restores the default afterwards
    bind_process(worker=3)
    log = get_logger("test")
    log.info("on_the_main_thread")
    thread = threading.Thread(target=lambda: log.info("on_another_thread", worker_field_kept=True))
    thread.start()
    thread.join()
    log.info("its_own_value_wins", worker=7)
    events = {e["event"]: e for e in (json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{"))}
    assert events["on_the_main_thread"]["worker"] == 3
    assert events["on_another_thread"]["worker"] == 3
    assert events["its_own_value_wins"]["worker"] == 7


WRITER = """
import sys
from engine.logs import bind_process, configure_logging, get_logger
configure_logging("json", "info")
bind_process(worker=int(sys.argv[1]))
log = get_logger("test")
for i in range(int(sys.argv[2])):
    log.info("line", i=i)
"""


def test_processes_sharing_one_pipe_never_glue_their_lines_together(tmp_path: Path) -> None:
    """The workers of a group write to one stderr: each line must reach it in one write (a line and
    its newline written apart let another process's line in between, and both were lost to JSON)."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    read, write = os.pipe()
    lines = 3000
    writers = [subprocess.Popen([sys.executable, str(script), str(w), str(lines)], stderr=write, cwd=ROOT) for w in range(2)]
    os.close(write)
    with os.fdopen(read) as pipe:
        out = pipe.read()
    assert [p.wait(timeout=60) for p in writers] == [0, 0]
    events = [json.loads(line) for line in out.splitlines()]  # a glued or split line does not parse
    assert sorted((e["worker"], e["i"]) for e in events) == [(w, i) for w in range(2) for i in range(lines)]


class FlakyStream:
    """A text stream whose writes fail with ``error`` while it is set (a closed pipe, a full disk)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.error: OSError | None = None

    def write(self, text: str) -> int:
        if self.error is not None:
            raise self.error
        self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize("error", [BrokenPipeError(32, "Broken pipe"), BlockingIOError(11, "again"), OSError(28, "No space left")])
def test_a_failing_log_sink_drops_and_counts_lines_and_says_so_once_when_it_is_back(
    monkeypatch: pytest.MonkeyPatch, error: OSError, process_fields: None
) -> None:
    stream = FlakyStream()
    monkeypatch.setattr(sys, "stderr", stream)
    before = logs.dropped_lines()
    configure_logging("json", "info")
    log = get_logger("test")
    log.info("before")
    stream.error = error
    for i in range(3):
        log.info("lost", i=i)  # no exception reaches the caller
    assert logs.dropped_lines() - before == 3
    stream.error = None
    log.info("after")
    log.info("later")
    events = [json.loads(line) for line in stream.lines]
    assert [e["event"] for e in events] == ["before", "log_lines_dropped", "after", "later"]
    assert events[1]["dropped"] == 3 and events[1]["level"] == "warning" and type(error).__name__ in events[1]["error"]


def test_a_log_sink_that_was_closed_is_counted_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = open(os.devnull, "w")  # noqa: SIM115  (closed below, on purpose, while still configured)
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("console", "info")
    stream.close()
    before = logs.dropped_lines()
    get_logger("test").warning("into_a_closed_file")
    assert logs.dropped_lines() == before + 1
