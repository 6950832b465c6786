"""python -m server: serve the models of a folder over gRPC until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from engine.logs import configure_logging, get_logger
from server.config import parse_args

log = get_logger("server")


async def _main(argv: Sequence[str] | None) -> int:
    from server.app import GenServer  # after logging is configured: imports torch, loads models

    config = parse_args(argv)
    server = GenServer(config)
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int, frame: object = None) -> None:
        # a plain signal handler (not loop.add_signal_handler): asyncio.Runner's own SIGINT handling
        # would otherwise turn a second Ctrl-C into a KeyboardInterrupt
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:  # a second signal: stop waiting for the drain
            log.warning("forced_exit", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("signal_received", signal=signal.Signals(signum).name, action=f"draining for up to {config.grace_s:g} s")
        loop.call_soon_threadsafe(server.request_shutdown)

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
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on Windows): the stock loop works, just slower
        return asyncio.run(_main(argv))
    return uvloop.run(_main(argv))


if __name__ == "__main__":
    sys.exit(main())
