"""``Client``: the blocking SDK, an ``AsyncClient`` driven on a private event-loop thread.

One implementation serves both faces (the retries, deadlines and the credit accounting live in
the asyncio code only); each blocking call hands a coroutine to the client's loop thread and
waits for it. Ctrl-C while waiting cancels the coroutine there, and so the gRPC call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Generator, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, Unpack, overload

import numpy as np
import numpy.typing as npt

from clients._channel import DEFAULT_TARGET, DEFAULT_TIMEOUT, RetryPolicy
from clients._client import AsyncClient
from clients._exceptions import GenserveError
from clients._protocol import ImageOptions, TextOptions
from clients._session import Result, Session
from clients._types import ImageResult, ImageStep, ModelInfo, TextResult

T = TypeVar("T")
SETTLE_S = 5.0  # after Ctrl-C, how long to wait for the cancelled coroutine to finish


class _Portal:
    """An event loop in a daemon thread, started on first use, that runs coroutines for other threads."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()
                loop.call_soon(started.set)
                self._thread = threading.Thread(target=loop.run_forever, name="genserve-client", daemon=True)
                self._thread.start()
                started.wait()
                self._loop = loop
            return self._loop

    @property
    def started(self) -> bool:
        return self._loop is not None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result; an interrupt cancels it there first."""
        loop = self.loop()
        result: concurrent.futures.Future[T] = concurrent.futures.Future()
        tasks: list[asyncio.Task[T]] = []

        def start() -> None:
            task = loop.create_task(coro)
            tasks.append(task)
            task.add_done_callback(lambda t: _copy(t, result))

        loop.call_soon_threadsafe(start)
        try:
            return result.result()
        except BaseException:
            if not result.done():  # interrupted while waiting (KeyboardInterrupt)
                loop.call_soon_threadsafe(lambda: tasks[0].cancel())
                concurrent.futures.wait([result], timeout=SETTLE_S)
            raise

    def call(self, fn: Callable[[], T]) -> T:
        """Run a plain function on the loop's thread."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def iterate(self, agen: AsyncGenerator[T, None]) -> Generator[T, None, None]:
        """A blocking iterator over an async generator; leaving it early closes the generator on the loop."""

        async def step() -> tuple[bool, T | None]:
            try:
                return True, await agen.__anext__()
            except StopAsyncIteration:
                return False, None

        try:
            while True:
                more, item = self.run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]  # more is True: item is a T
        finally:
            if self.started:
                self.run(agen.aclose())

    def stop(self) -> None:
        with self._lock:
            loop, thread, self._loop = self._loop, self._thread, None
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(loop.shutdown_asyncgens(), loop).result(SETTLE_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def _notify_cancelled(future: concurrent.futures.Future[Any]) -> None:
    """Wake ``concurrent.futures.wait`` on a cancelled future (``cancel()`` alone leaves that to an executor)."""
    with contextlib.suppress(RuntimeError):  # notified already
        future.set_running_or_notify_cancel()


def _cancel(future: concurrent.futures.Future[Any]) -> None:
    if future.cancel():
        _notify_cancelled(future)


def _copy(task: asyncio.Task[T], result: concurrent.futures.Future[T]) -> None:
    if result.done():
        return
    if task.cancelled():
        _cancel(result)
    elif (error := task.exception()) is not None:
        result.set_exception(error)
    else:
        result.set_result(task.result())


def _concurrent(future: asyncio.Future[T], loop: asyncio.AbstractEventLoop) -> concurrent.futures.Future[T]:
    """A thread-safe face of an asyncio future; cancelling it cancels the asyncio one (and so the request)."""
    outer: concurrent.futures.Future[T] = concurrent.futures.Future()

    def settle(inner: asyncio.Future[T]) -> None:
        try:
            if inner.cancelled():
                _cancel(outer)
            elif (error := inner.exception()) is not None:
                outer.set_exception(error)
            else:
                outer.set_result(inner.result())
        except concurrent.futures.InvalidStateError:  # cancelled from the other side meanwhile
            pass

    def propagate(f: concurrent.futures.Future[T]) -> None:
        if f.cancelled():
            _notify_cancelled(f)
            if not loop.is_closed():
                loop.call_soon_threadsafe(future.cancel)

    future.add_done_callback(settle)
    outer.add_done_callback(propagate)
    return outer


class Client:
    """The blocking client: ``AsyncClient``'s methods, for code without an event loop.

    >>> with Client("127.0.0.1:50051") as client:
    ...     digits = client.generate_images("gan", 16, labels=7, seed=1)
    ...     for piece in client.stream_text("transformer", "ROMEO:"):
    ...         print(piece, end="", flush=True)

    The arguments are ``AsyncClient``'s. Methods may be called from several threads.
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008  (frozen: sharing it is safe)
        tls: bool = False,
        root_certificates: bytes | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
        connections: int = 1,
    ) -> None:
        self._async = AsyncClient(
            target,
            timeout=timeout,
            retry=retry,
            tls=tls,
            root_certificates=root_certificates,
            token=token,
            options=options,
            client_certificate=client_certificate,
            client_key=client_key,
            connections=connections,
        )
        self._portal = _Portal()

    def __repr__(self) -> str:
        return repr(self._async).replace("AsyncClient", "Client", 1)

    @property
    def targets(self) -> tuple[str, ...]:
        return self._async.targets

    @property
    def timeout(self) -> float | None:
        return self._async.timeout

    def __enter__(self) -> Self:
        self._portal.run(self._async.__aenter__())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and stop the client's thread. Closing twice is harmless."""
        self._portal.run(self._async.aclose())
        self._portal.stop()

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """See ``AsyncClient.list_models``."""
        return self._portal.run(self._async.list_models(timeout=timeout))

    def generate_images(
        self,
        model: str,
        n: int,
        *,
        timeout: float | None = None,
        progress: Callable[[int], object] | None = None,
        **options: Unpack[ImageOptions],
    ) -> npt.NDArray[np.uint8]:
        """See ``AsyncClient.generate_images``; ``progress`` is called on the client's thread."""
        coro = self._async.generate_images(model, n, timeout=timeout, progress=progress, **options)
        return self._portal.run(coro)

    def stream_images(
        self,
        model: str,
        n: int,
        *,
        timeout: float | None = None,
        **options: Unpack[ImageOptions],
    ) -> Generator[ImageStep, None, None]:
        """See ``AsyncClient.stream_images``; leaving the loop early (or ``close()``) cancels the call."""
        return self._portal.iterate(self._async.stream_images(model, n, timeout=timeout, **options))

    def stream_text(
        self,
        model: str,
        prompt: str,
        *,
        timeout: float | None = None,
        **options: Unpack[TextOptions],
    ) -> Generator[str, None, None]:
        """See ``AsyncClient.stream_text``; leaving the loop early (or ``close()``) cancels the call."""
        agen = self._async.stream_text(model, prompt, timeout=timeout, **options)
        return self._portal.iterate(agen)

    def generate_text(
        self,
        model: str,
        prompt: str,
        *,
        timeout: float | None = None,
        **options: Unpack[TextOptions],
    ) -> str:
        """See ``AsyncClient.generate_text``."""
        coro = self._async.generate_text(model, prompt, timeout=timeout, **options)
        return self._portal.run(coro)

    def session(self, *, timeout: float | None = None, collect: bool = True) -> SyncSession:
        """See ``AsyncClient.session``; use it as ``with client.session() as s``."""
        return SyncSession(self._portal, self._async.session(timeout=timeout, collect=collect))


class SyncSession:
    """A ``Session`` for blocking code: submits return ``concurrent.futures.Future`` objects."""

    def __init__(self, portal: _Portal, session: Session) -> None:
        self._portal = portal
        self._session = session

    def __enter__(self) -> Self:
        self._portal.run(self._session.__aenter__())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._portal.run(self._session.__aexit__(exc_type, exc, tb))

    @property
    def credit(self) -> int:
        return self._session.credit

    def submit_images(
        self,
        model: str,
        n: int,
        *,
        want_float: bool = False,
        id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[ImageOptions],
    ) -> concurrent.futures.Future[ImageResult]:
        """See ``Session.submit_images``."""
        s = self._session
        return self._portal.call(
            lambda: _concurrent(
                s.submit_images(model, n, want_float=want_float, id=id, timeout=timeout, **options),
                asyncio.get_running_loop(),
            )
        )

    def submit_text(
        self,
        model: str,
        prompt: str,
        *,
        id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[TextOptions],
    ) -> concurrent.futures.Future[TextResult]:
        """See ``Session.submit_text``."""
        s = self._session

        def submit() -> concurrent.futures.Future[TextResult]:
            future = s.submit_text(model, prompt, id=id, timeout=timeout, **options)
            return _concurrent(future, asyncio.get_running_loop())

        return self._portal.call(submit)

    def cancel(self, request: str | concurrent.futures.Future[Any]) -> bool:
        """Cancel a request by id or future; False when it had already finished."""
        if isinstance(request, str):
            return self._portal.call(lambda: self._session.cancel(request))
        return request.cancel()

    def drain(self) -> None:
        """See ``Session.drain``."""
        self._portal.run(self._session.drain())

    @overload
    def results(self, *, return_exceptions: Literal[False] = False) -> Iterator[Result]: ...
    @overload
    def results(self, *, return_exceptions: Literal[True]) -> Iterator[Result | GenserveError]: ...

    def results(self, *, return_exceptions: bool = False) -> Iterator[Result | GenserveError]:
        """See ``Session.results``."""
        agen: AsyncIterator[Result | GenserveError] = self._session.results(return_exceptions=return_exceptions)  # type: ignore[call-overload]
        assert isinstance(agen, AsyncGenerator)
        return self._portal.iterate(agen)

    def close(self) -> None:
        """See ``Session.aclose``."""
        self._portal.run(self._session.aclose())
