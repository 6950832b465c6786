"""python -m server: serve the models of a folder over gRPC until SIGTERM or SIGINT."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

# `pip install genserve` is the SDK only; the server's packages come with the [server] extra.
# Checked before anything imports them, so a client-only install gets one clear line, not a traceback.
SERVER_MODULES = (
    *("torch", "safetensors", "structlog", "anyio", "prometheus_client", "grpc_health", "grpc_reflection"),
    *("starlette", "uvicorn"),  # the HTTP edge (on by default)
)


def missing_server_modules() -> list[str]:
    """The modules of the [server] extra that this environment lacks."""
    return [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]


if __name__ == "__main__" and (_missing := missing_server_modules()):
    sys.exit(f"python -m server needs the [server] extra ({', '.join(_missing)} not installed): pip install 'genserve[server]'")

from engine.logs import configure_logging, get_logger  # noqa: E402  (after the check above)
from server.config import ServerConfig, parse_args  # noqa: E402
from server.runtime.process import run_loop, run_server  # noqa: E402

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from server.runtime.app import GenServer

log = get_logger("server")


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)  # --help and bad flags exit here, before anything heavy is imported
    configure_logging(config.log_format, config.log_level)  # type: ignore[arg-type]
    if config.front_limit:
        return serve_behind_front(config)
    return serve(config)


def serve(config: ServerConfig, collectors: Sequence[Collector] = ()) -> int:
    """One server, or a group of workers; ``collectors`` join the /metrics they serve."""
    if config.workers != 1:
        from server.runtime.workers import serve_workers  # the parent of a group: no torch, no gRPC object

        return serve_workers(config, collectors)

    def setup(server: GenServer) -> None:
        for collector in collectors:
            server.metrics.registry.register(collector)

    return run_loop(run_server(config, setup if collectors else None))


def serve_behind_front(config: ServerConfig) -> int:
    """--front-limit: HAProxy on the port (server/runtime/front.py), the server behind it on 127.0.0.1."""
    from server.runtime.front import Front, FrontError

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


if __name__ == "__main__":
    sys.exit(main())
