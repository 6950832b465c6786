"""``AsyncClient``: the asyncio SDK for a genserve server (or several)."""

from __future__ import annotations

import enum
import itertools
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from types import TracebackType
from typing import Any, Self, Unpack

import grpc
import numpy as np
import numpy.typing as npt

from clients._channel import DEFAULT_TARGET, DEFAULT_TIMEOUT, RetryPolicy, open_channel, resolve_targets, split_host_port, with_default_port
from clients._exceptions import ServerError, from_rpc_error, from_status
from clients._protocol import ImageAssembler, ImageOptions, TextAssembler, TextOptions, image_request, text_request
from clients._session import Session
from clients._types import ImageStep, ModelInfo
from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc


class _State(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


class AsyncClient:
    """A client for the genserve ``Generator`` service.

    >>> async with AsyncClient("127.0.0.1:50051") as client:
    ...     digits = await client.generate_images("vae", 16, seed=0)   # (16, 28, 28) uint8
    ...     async for piece in client.stream_text("transformer", "ROMEO:", max_new_tokens=50):
    ...         print(piece, end="")

    target: ``host:port`` (or any gRPC target), or several ``host:port`` served round robin.
    timeout: the default deadline of each call, in seconds (None: no deadline); every method
        takes its own ``timeout`` too (None there means this default).
    retry: how UNAVAILABLE and RESOURCE_EXHAUSTED are retried; None turns retries off.
    tls: connect with TLS, trusting ``root_certificates`` (PEM) or the system's roots.
    client_certificate, client_key: PEM chain and key this client presents (mutual TLS; implies tls).
    token: a bearer token sent as ``authorization: Bearer <token>`` with every call.
    options: extra gRPC channel options.
    connections: channels (so TCP connections) to open, each call taking the next one. A server
        run with ``--workers N`` spreads connections, not calls, over its workers: one channel
        reaches one worker, so give about 2N here. Each channel round-robins over the targets.
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
        if connections < 1:
            raise ValueError(f"connections must be >= 1, got {connections}")
        self.connections = connections
        if (client_certificate is None) != (client_key is None):
            raise ValueError("client_certificate and client_key go together (mutual TLS needs both)")
        self.targets = tuple(with_default_port(t) for t in ((target,) if isinstance(target, str) else target))
        if not self.targets:
            raise ValueError("no target given")
        if len(self.targets) > 1:
            for t in self.targets:
                split_host_port(t)  # several targets must each be host:port: say so now, not at the first call
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 or None, got {timeout}")
        self.timeout = timeout
        self.retry = retry
        secure = tls or root_certificates is not None or client_certificate is not None
        self._credentials = grpc.ssl_channel_credentials(root_certificates, client_key, client_certificate) if secure else None
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._options = tuple(options)
        self._state = _State.UNOPENED
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[Any] = []
        self._calls = itertools.count()

    def __repr__(self) -> str:
        return f"AsyncClient({', '.join(self.targets)}, {self._state.name.lower()})"

    async def __aenter__(self) -> Self:
        if self._state is _State.OPENED:
            raise RuntimeError("Cannot open a client instance more than once.")
        if self._state is _State.CLOSED:
            raise RuntimeError("Cannot reopen a client instance, once it has been closed.")
        await self._open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections; calls still running end with CANCELLED. Closing twice is harmless."""
        self._state = _State.CLOSED
        channels, self._channels, self._stubs = self._channels, [], []
        for channel in channels:
            await channel.close()

    async def _open(self) -> Any:
        if self._state is _State.CLOSED:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        if not self._stubs:
            target = await resolve_targets(self.targets)
            if not self._stubs:  # another call may have opened it meanwhile
                authority = self.targets[0] if len(self.targets) > 1 else None
                options = self._options
                if self.connections > 1:  # channels alike share one connection from grpc's global pool; not these
                    options = (*options, ("grpc.use_local_subchannel_pool", 1))
                self._channels = [
                    open_channel(target, authority=authority, retry=self.retry, credentials=self._credentials, options=options)
                    for _ in range(self.connections)
                ]
                self._stubs = [pb_grpc.GeneratorStub(channel) for channel in self._channels]
                self._state = _State.OPENED
        return self._stubs[next(self._calls) % len(self._stubs)]

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model version the server serves."""
        stub = await self._open()
        try:
            response = await stub.ListModels(pb.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        return [ModelInfo.from_proto(m) for m in response.models]

    async def _generate(self, request: pb.GenerateRequest, timeout: float | None) -> AsyncGenerator[pb.GenerateResponse, None]:
        """The messages of one ``Generate`` call up to its finish; cancels the call when the consumer stops early."""
        stub = await self._open()
        call = stub.Generate(request, timeout=self._deadline(timeout), metadata=self._metadata)
        try:
            async for response in call:
                if response.WhichOneof("payload") == "finish" and response.finish.code != 0:
                    raise from_status(response.finish.code, response.finish.message)
                yield response
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()  # a no-op once the call has ended

    async def generate_images(
        self,
        model: str,
        n: int,
        *,
        timeout: float | None = None,
        progress: Callable[[int], object] | None = None,
        **options: Unpack[ImageOptions],
    ) -> npt.NDArray[np.uint8]:
        """``n`` samples of an image model as a (n, 28, 28) uint8 array.

        options: seed, labels, version (``ImageOptions``).
        progress: called with the number of samples of each chunk as it arrives (``tqdm.update`` fits).
        """
        assembler = ImageAssembler(n)
        request = image_request(model, n, **options)
        finish: pb.Finish | None = None
        async with aclosing(self._generate(request, timeout)) as responses:
            async for response in responses:
                which = response.WhichOneof("payload")
                if which == "images":
                    if response.images.preview:  # an iterative model's estimate (preview_every): stream_images has them
                        continue
                    count = assembler.add(response.images)
                    if progress is not None:
                        progress(count)
                elif which == "finish":
                    finish = response.finish
        if finish is None:
            raise ServerError("the server ended the call without a finish")
        return assembler.result(finish).images

    async def stream_images(
        self,
        model: str,
        n: int,
        *,
        timeout: float | None = None,
        **options: Unpack[ImageOptions],
    ) -> AsyncGenerator[ImageStep, None]:
        """An iterative model's (flow's) previews, every ``preview_every`` steps, then its final samples:
        each an ``ImageStep`` (images (n, 28, 28) uint8, the step, ``final``). Leaving the loop early cancels the call.

        options: seed, labels, version, steps, guidance, preview_every (``ImageOptions``).
        """
        assembler = ImageAssembler(n)
        request = image_request(model, n, **options)
        finish: pb.Finish | None = None
        step = 0
        async with aclosing(self._generate(request, timeout)) as responses:
            async for response in responses:
                which = response.WhichOneof("payload")
                if which == "images":
                    chunk = response.images
                    step = max(step, chunk.step)
                    if chunk.preview:
                        pixels = np.frombuffer(chunk.pixels, np.uint8).reshape(chunk.count, chunk.height, chunk.width)
                        yield ImageStep(pixels, chunk.step, final=False)
                    else:
                        assembler.add(chunk)
                elif which == "finish":
                    finish = response.finish
        if finish is None:
            raise ServerError("the server ended the call without a finish")
        yield ImageStep(assembler.result(finish).images, step, final=True)

    async def stream_text(
        self,
        model: str,
        prompt: str,
        *,
        timeout: float | None = None,
        **options: Unpack[TextOptions],
    ) -> AsyncGenerator[str, None]:
        """The text generated after ``prompt``, piece by piece as the server produces it.

        options: max_new_tokens, temperature, top_k, top_p, seed, stop, version (``TextOptions``:
        unset ones take the server's defaults). Leaving the loop early cancels the call.
        """
        request = text_request(model, prompt, **options)
        async with aclosing(self._generate(request, timeout)) as responses:
            async for response in responses:
                if response.WhichOneof("payload") == "text":
                    yield response.text.text

    async def generate_text(
        self,
        model: str,
        prompt: str,
        *,
        timeout: float | None = None,
        **options: Unpack[TextOptions],
    ) -> str:
        """The whole text ``stream_text`` would give (without the prompt)."""
        assembler = TextAssembler()
        request = text_request(model, prompt, **options)
        async with aclosing(self._generate(request, timeout)) as responses:
            async for response in responses:
                if response.WhichOneof("payload") == "text":
                    assembler.add(response.text)
        return "".join(assembler.pieces)

    def session(self, *, timeout: float | None = None, collect: bool = True) -> Session:
        """A high-throughput session: many requests on one ``GenerateStream``, within the server's credits.

        timeout: the default deadline of each request (None: the client's).
        collect: keep finished results for ``Session.results()``; turn it off when you only
            use the futures, so that a long session does not hold every result.

        >>> async with client.session() as s:
        ...     futures = [s.submit_images("vae", 16, seed=i) for i in range(1000)]
        ...     async for result in s.results():       # completion order
        ...         ...
        """
        return Session(self._open, metadata=self._metadata, timeout=self._deadline(timeout), retry=self.retry, collect=collect)
