"""One structlog set-up for the whole project (training, engine, server, clients).

Logs go to stderr, one line per event, so that stdout stays free for a command's real output
(tables, generated text). A log sink that fails (a closed pipe, a full disk) never stops the
program: its lines are dropped and counted (``dropped_lines``), and one line says so when the
sink takes lines again.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal, TextIO

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


class SafeSink:
    """A text stream that never raises: what cannot be written is dropped and counted.

    A server whose stderr is a pipe with no reader (a log collector restarted, ``| head``) got
    BrokenPipeError from every log call, and a call in a signal handler or a stage then stopped the
    shutdown or the stage. Errors counted: OSError (EPIPE, EAGAIN, ENOSPC, EIO) and ValueError (a
    closed file). Writes come in one ``write`` per line under structlog's lock for this object.
    """

    def __init__(self, stream: TextIO, notice: Callable[[int, str], str] | None = None) -> None:
        self.stream = stream
        self.dropped = 0  # lines lost since the process started
        self._dropped_unreported = 0  # lost since the last line that got through
        self._error = ""
        self._notice = notice or (lambda dropped, error: f"log_lines_dropped dropped={dropped} error={error!r}\n")
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            try:
                if self._dropped_unreported:  # the sink is back: say once what it missed
                    self.stream.write(self._notice(self._dropped_unreported, self._error))
                    self._dropped_unreported = 0
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError) as e:
                self.dropped += 1
                self._dropped_unreported += 1
                self._error = f"{type(e).__name__}: {e}"
        return len(text)

    def flush(self) -> None:  # write() flushes each line itself
        pass

    def isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (OSError, ValueError):
            return False


_sink: SafeSink | None = None
_dropped_before = 0  # lines dropped by sinks that an earlier configure_logging replaced


def dropped_lines() -> int:
    """Log lines this process could not write (its sink failed), for ``genserve_log_lines_dropped_total``."""
    return _dropped_before + (_sink.dropped if _sink is not None else 0)


def configure_logging(fmt: LogFormat = "console", level: str = "info") -> None:
    """Configure structlog for a process; call once at start-up of each entry point."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=SafeSink(sys.stderr).isatty())
    else:
        raise ValueError(f"unknown log format {fmt!r} (expected 'console' or 'json')")

    def notice(dropped: int, error: str) -> str:
        event = {"component": "logs", "dropped": dropped, "error": error, **_PROCESS_FIELDS}
        event |= {"level": "warning", "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z")}
        return str(renderer(None, "warning", {"event": "log_lines_dropped", **event})) + "\n"

    global _sink, _dropped_before
    if _sink is not None:
        _dropped_before += _sink.dropped
    _sink = SafeSink(sys.stderr, notice)
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
        # line and newline on the shared pipe, and a JSON reader lost both.
        logger_factory=structlog.WriteLoggerFactory(file=_sink),  # type: ignore[arg-type]  # a TextIO in all WriteLogger uses
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger for a component (``component=name`` on every line).

    Lazy: the configuration is read at each event, so module-level loggers follow a later
    ``configure_logging`` (binding eagerly would freeze the configuration of import time).
    """
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=name)
    return logger
