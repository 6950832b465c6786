"""uvicorn serving the HTTP edge's app in the server's own event loop, on a socket bound here
(SO_REUSEPORT for the workers of a group), with the server's TLS settings."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp


class _Server(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return _no_capture()  # the server's own handlers drain it (server/runtime/process.py)


@contextlib.contextmanager
def _no_capture() -> Iterator[None]:
    yield


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The HTTP edge's socket, bound before the models load: a taken port fails at once, named."""
    bind_host = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only: a second listener still fails
    if reuse_port:  # the workers of a group share it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((bind_host, port))
    except OSError as e:
        sock.close()
        raise OSError(
            f"cannot listen for HTTP on {host}:{port}: {e.strerror or e}; each server on a machine needs its own HTTP port: "
            "give another with --http-port N, or --http-port 0 to turn HTTP off"
        ) from None
    return sock


class HttpListener:
    """Serve ``app`` on a bound socket (``bind``) until ``stop``."""

    def __init__(self, app: ASGIApp, sock: socket.socket, host: str, *, tls_cert: str = "", tls_key: str = "",
                 tls_client_ca: str = "") -> None:  # fmt: skip
        self.socket = sock
        self.port: int = sock.getsockname()[1]
        shown = "127.0.0.1" if host.strip("[]") in ("0.0.0.0", "::", "") else host
        self.url = f"{'https' if tls_cert else 'http'}://{shown}:{self.port}"
        config = uvicorn.Config(
            app,
            http="httptools",
            ws="none",
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            ssl_certfile=tls_cert or None,
            ssl_keyfile=tls_key or None,
            ssl_ca_certs=tls_client_ca or None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE,
            timeout_graceful_shutdown=1,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.socket]), name="http-edge")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the HTTP listener stopped as it started")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.socket.close()
