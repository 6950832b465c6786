"""python -m server: serve the models of a folder over gRPC until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

# `pip install genserve` is the SDK only; the server's packages come with the [server] extra.
# Checked before anything imports them, so a client-only install gets one clear line, not a traceback.
SERVER_MODULES = ("torch", "safetensors", "structlog", "anyio", "prometheus_client", "grpc_health", "grpc_reflection")


def missing_server_modules() -> list[str]:
    """The modules of the [server] extra that this environment lacks."""
    return [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]


if __name__ == "__main__" and (_missing := missing_server_modules()):
    sys.exit(f"python -m server needs the [server] extra ({', '.join(_missing)} not installed): pip install 'genserve[server]'")

from engine.logs import configure_logging, get_logger  # noqa: E402  (after the check above)
from server.config import ServerConfig, parse_args  # noqa: E402

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from server.app import GenServer

log = get_logger("server")


async def _main(config: ServerConfig, setup: Callable[[GenServer], None] | None = None) -> int:
    """Serve until a signal; ``setup`` prepares the server before it starts (a worker of a group)."""
    from server.app import GenServer  # after logging is configured: imports torch, loads models

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


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)  # --help and bad flags exit here, before anything heavy is imported
    configure_logging(config.log_format, config.log_level)  # type: ignore[arg-type]
    if config.front_limit:
        return serve_behind_front(config)
    return serve(config)


def serve(config: ServerConfig, collectors: Sequence[Collector] = ()) -> int:
    """One server, or a group of workers; ``collectors`` join the /metrics they serve."""
    if config.workers != 1:
        from server.workers import serve_workers  # the parent of a group: no torch, no gRPC object

        return serve_workers(config, collectors)

    def setup(server: GenServer) -> None:
        for collector in collectors:
            server.metrics.registry.register(collector)

    return run_loop(_main(config, setup if collectors else None))


def serve_behind_front(config: ServerConfig) -> int:
    """--front-limit: HAProxy on the port (server/front.py), the server behind it on 127.0.0.1."""
    from server.front import Front, FrontError

    try:
        front = Front(config)
        front.start()
    except FrontError as e:
        log.error("start_failed", error=str(e))
        return 1
    try:
        code = serve(front.server_config(), [front.stats])
    finally:
        front.stop()
    return code or (1 if front.died else 0)


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on Windows): the stock loop works, just slower
        return asyncio.run(main)
    return uvloop.run(main)


if __name__ == "__main__":
    sys.exit(main())
