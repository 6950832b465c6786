"""Run a real server in tests and examples: on the current event loop, or on its own thread.

    async with running_server(models_dir="models", batch_size=32) as srv:
        channel = grpc.aio.insecure_channel(srv.address)

    with ServerThread(models_dir="models") as srv:   # for synchronous code
        client = Client(srv.address)

Keyword arguments are ServerConfig fields; the port defaults to 0 (a free one) and metrics to off.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from types import TracebackType
from typing import Any

from server.app import GenServer
from server.config import ServerConfig

TEST_DEFAULTS: dict[str, Any] = {"port": 0, "metrics_port": 0, "grace_s": 5.0}


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
