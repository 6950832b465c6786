"""One server's life in this process: start it, serve until SIGTERM or SIGINT, drain, exit code.

``python -m server`` runs it once; each worker of a group (server/runtime/workers.py) runs it in its
forked child.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from engine.logs import get_logger
from server.config import ServerConfig

if TYPE_CHECKING:
    from server.runtime.app import GenServer

log = get_logger("server")


async def run_server(config: ServerConfig, setup: Callable[[GenServer], None] | None = None) -> int:
    """Serve until a signal; ``setup`` prepares the server before it starts (a worker of a group)."""
    from server.runtime.app import GenServer  # after logging is configured: imports torch, loads models

    server = GenServer(config)
    if setup is not None:
        setup(server)
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int, frame: object = None) -> None:
        # a plain signal handler (not loop.add_signal_handler): asyncio.Runner's own SIGINT handling
        # would otherwise turn a second Ctrl-C into a KeyboardInterrupt
        # the action comes before its log line, so nothing a log sink does can keep it from happening
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:  # a second signal: stop waiting for the drain
            try:
                log.warning("forced_exit", signal=signal.Signals(signum).name)
            finally:
                os._exit(1)
        loop.call_soon_threadsafe(server.request_shutdown)
        log.info("signal_received", signal=signal.Signals(signum).name, action=f"draining for up to {config.grace_s:g} s")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if hasattr(signal, "SIGHUP"):  # not on Windows
        signal.signal(signal.SIGHUP, lambda signum, frame: loop.call_soon_threadsafe(server.rescan_models))
    try:
        await server.start()
    except (OSError, RuntimeError) as e:
        log.error("start_failed", error=str(e))
        return 1
    return await server.serve_forever()


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on Windows): the stock loop works, just slower
        return asyncio.run(main)
    return uvloop.run(main)
