"""Run a real server in tests and examples: on the current event loop, or on its own thread.

    async with running_server(models_dir="models", batch_size=32) as srv:
        channel = grpc.aio.insecure_channel(srv.address)

    with ServerThread(models_dir="models") as srv:   # for synchronous code
        client = Client(srv.address)

    proc = ServerProcess("--models-dir", "models")   # ``python -m server``, its JSON log read
    proc.wait_for("server_ready")

    result = run_server_cli("--help")                 # ``python -m server`` to its end, its output kept

    haproxy = haproxy_or_skip()                       # the front's HAProxy, or the test skips (fails with CI=true)

Keyword arguments are ServerConfig fields; the port defaults to 0 (a free one) and metrics to off.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from types import TracebackType
from typing import Any

import pytest

from server.config import ServerConfig
from server.runtime.app import GenServer
from server.runtime.front import find_haproxy
from tests.paths import ROOT

TEST_DEFAULTS: dict[str, Any] = {"port": 0, "metrics_port": 0, "http_port": 0, "grace_s": 5.0}  # 0: off (HTTP, metrics)


def make_config(**overrides: Any) -> ServerConfig:
    return replace(ServerConfig(), **{**TEST_DEFAULTS, **overrides})


@asynccontextmanager
async def running_server(**overrides: Any) -> AsyncIterator[GenServer]:
    """A started server on this loop; drained and stopped on exit."""
    server = GenServer(make_config(**overrides))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=server.config.grace_s)


class ServerThread:
    """A server on its own event loop thread, for synchronous callers."""

    def __init__(self, **overrides: Any) -> None:
        self.config = make_config(**overrides)
        self.server: GenServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="genserve-test-server", daemon=True)

    @property
    def address(self) -> str:
        assert self.server is not None, "the server has not started"
        return self.server.address

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self.server = GenServer(self.config)
            await self.server.start()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        await self.server.serve_forever()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(timeout=120)
        if self._error is not None:
            raise RuntimeError(f"test server failed to start: {self._error}") from self._error
        if self.server is None:
            raise RuntimeError("test server did not start within 120 s")
        return self

    def stop(self) -> None:
        if self.server is not None and self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.server.request_shutdown)
        self._thread.join(timeout=60)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class ServerProcess:
    """``python -m server`` as a process: a free port, no metrics port and JSON logs unless ``args``
    say otherwise (argparse keeps the last), its log lines read on a thread into ``events``."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "server", "--port", "0", "--metrics-port", "0", "--http-port", "0", "--log-format", "json", *args]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        with self._changed:  # the log ended: the process is gone, nobody need wait longer
            self._changed.notify_all()

    def find(self, name: str) -> list[dict[str, Any]]:
        """The events called ``name``, oldest first."""
        with self._changed:
            return [e for e in self.events if e.get("event") == name]

    def names(self) -> list[object]:
        with self._changed:
            return [e.get("event") for e in self.events]

    def wait_for(self, name: str, timeout: float = 60.0, count: int = 1) -> dict[str, Any]:
        """The ``count``-th event called ``name``; AssertionError naming the last events if it does
        not come within ``timeout`` s or the process ends first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [e for e in self.events if e.get("event") == name]
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):  # exited, log read
                    raise AssertionError(f"no {count} x {name!r} from the server (exit {self.proc.poll()}): {self.events[-5:]}")
                self._changed.wait(min(left, 0.5))

    def wait_exit(self, timeout: float) -> int:
        """The exit status, once the process has ended and all of its log has been read (``find``
        then sees its last lines: the reader thread can lag behind the process)."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        return code

    def stop(self) -> None:
        """Kill the process if it still runs, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_server_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m server ARGS`` run to its end (60 s at most), with ``env`` over this environment."""
    http_off = [] if "GENSERVE_HTTP_PORT" in (env or {}) else ["--http-port", "0"]  # ARGS may turn it on again: the last wins
    return subprocess.run(
        [sys.executable, "-m", "server", *http_off, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def haproxy_or_skip() -> str:
    """The haproxy the front would run; without one the test skips, naming scripts/front_setup.sh (CI=true: fails)."""
    try:
        return find_haproxy("haproxy")
    except RuntimeError as e:
        reason = f"{e} (scripts/front_setup.sh)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true requires the front's tests")
        pytest.skip(reason)
