"""grpc's completion wake-ups never block its poller thread (server/grpc_edge/wakeups.py): the seam is there
in the pinned grpcio, a full wake-up socket refuses a write at once instead of blocking it, and a
server whose loop falls far behind still answers every call."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from server.grpc_edge import wakeups
from server.grpc_edge.accept import aio_server, grpc_server_options

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

SERVICE = "test.Echo"
ECHO = f"/{SERVICE}/Echo"


async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def serving() -> tuple[grpc.aio.Server, int]:
    server = aio_server(options=grpc_server_options(0, 8192))  # grpc core's backlog holds the test's bursts
    server.add_registered_method_handlers(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_the_completion_queues_write_socket_is_found_and_made_non_blocking() -> None:
    server, _ = await serving()
    try:
        assert wakeups.unblock_completion_writes(), (
            f"grpcio {grpc.__version__} moved grpc.aio's completion queue: see server/grpc_edge/wakeups.py"
        )
        writers = [s for s in wakeups._unblocked if s.fileno() != -1]
        assert writers and all(not s.getblocking() for s in writers)
    finally:
        await server.stop(None)


async def test_a_full_wake_up_socket_refuses_a_write_at_once_and_serving_goes_on() -> None:
    server, port = await serving()
    try:
        assert wakeups.unblock_completion_writes()
        writer = next(s for s in wakeups._unblocked if s.fileno() != -1)
        outcome: list[str] = []

        def fill() -> None:  # what grpc's poller thread does when the loop is far behind: a byte per completion
            for _ in range(100_000):  # the buffer holds a few hundred one-byte writes
                try:
                    writer.send(b"1")
                except BlockingIOError:
                    outcome.append("refused")
                    return
            outcome.append("never full")

        thread = threading.Thread(target=fill, daemon=True)
        thread.start()
        thread.join(10.0)  # the loop is not running meanwhile: nothing reads the socket
        assert outcome == ["refused"], "a write into a full wake-up socket blocked (or the socket never filled)"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:  # the extra bytes are only extra wake-ups
            call = channel.unary_unary(ECHO)
            assert await asyncio.gather(*(call(b"%d" % i) for i in range(200))) == [b"%d" % i for i in range(200)]
    finally:
        await server.stop(None)


async def test_calls_complete_while_the_loop_falls_far_behind() -> None:
    """Thousands of completions arrive while the loop is held (more bytes than the socket holds): none is lost."""
    server, port = await serving()
    try:
        assert wakeups.unblock_completion_writes()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(ECHO)
            held = 0

            async def hold_the_loop() -> None:
                nonlocal held
                while True:
                    time.sleep(0.03)  # a loop busy elsewhere: grpc's poller thread keeps writing meanwhile
                    held += 1
                    await asyncio.sleep(0.01)

            holder = asyncio.create_task(hold_the_loop())
            try:
                n = 2000
                replies = await asyncio.wait_for(asyncio.gather(*(call(b"%d" % i) for i in range(n))), 45.0)
            finally:
                holder.cancel()
            assert replies == [b"%d" % i for i in range(n)]
            assert held > 0
    finally:
        await server.stop(None)
