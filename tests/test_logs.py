"""engine/logs.py: fields bound for the process reach the lines of every thread."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from engine import logs
from engine.logs import bind_process, configure_logging, get_logger


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
