"""One structlog set-up for the whole project (training, engine, server, clients).

Logs go to stderr, one line per event, so that stdout stays free for a command's real output
(tables, generated text).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["console", "json"]

# Fields on every line this process logs, from any thread. Context variables (structlog's
# bind_contextvars) reach the event loop's tasks but not the threads the engine loads and runs
# models on, whose lines then lacked e.g. a server worker's ``worker`` label.
_PROCESS_FIELDS: dict[str, object] = {}


def bind_process(**fields: object) -> None:
    """Put ``fields`` on every later log line of this process, whichever thread logs it."""
    _PROCESS_FIELDS.update(fields)


def _add_process_fields(logger: object, method: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    for key, value in _PROCESS_FIELDS.items():
        event.setdefault(key, value)
    return event


def configure_logging(fmt: LogFormat = "console", level: str = "info") -> None:
    """Configure structlog for a process; call once at start-up of each entry point."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        raise ValueError(f"unknown log format {fmt!r} (expected 'console' or 'json')")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_process_fields,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # WriteLogger writes a line and its newline in one write; PrintLogger's print() made two
        # (stderr is write-through), so a worker of a group could put its line between another's
        # line and newline on the shared pipe, and a JSON reader lost both (tests/test_logs.py).
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger for a component (``component=name`` on every line).

    Lazy: the configuration is read at each event, so module-level loggers follow a later
    ``configure_logging`` (binding eagerly would freeze the configuration of import time).
    """
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=name)
    return logger
