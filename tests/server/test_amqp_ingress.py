"""The RabbitMQ ingress (server/amqp_ingress.py) and the SDK's AmqpClient, against a real broker on localhost.

Without a broker at 127.0.0.1:5672 the tests that need one skip, saying so; with CI=true they
fail instead (CI machines run one). Each test uses queues named after itself, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import AmqpClient, AsyncAmqpClient, AsyncClient, ImageOptions, ModelNotFound
from genserve.v1 import generator_pb2 as pb
from genserve.v1.amqp import CONTENT_TYPE, dead_letter_queue
from server.amqp_ingress import declare_queues
from server.runtime.app import AMQP_NAME
from server.wire import SERVICE as SERVICE_NAME
from tests.engine.drift_kind import drift_file
from tests.serving import ServerProcess, running_server

pytestmark = pytest.mark.timeout(180)

BROKER = ("127.0.0.1", 5672)
URL = "amqp://guest:guest@127.0.0.1:5672/"


def broker_reachable() -> bool:
    try:
        with socket.create_connection(BROKER, timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def broker() -> None:
    if broker_reachable():
        return
    reason = f"no RabbitMQ broker at {BROKER[0]}:{BROKER[1]} (start one: rabbitmq-server -detached)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true requires the broker tests")
    pytest.skip(reason)


@pytest.fixture
def queue(broker: None, request: pytest.FixtureRequest) -> Iterator[str]:
    """A request queue private to this test; it and its dead letters are deleted afterwards."""
    name = f"test.{request.node.name}.{uuid.uuid4().hex[:8]}"
    yield name

    async def delete() -> None:
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel()
            for q in (name, dead_letter_queue(name)):
                await channel.queue_delete(q)

    asyncio.run(delete())


async def wait_until(condition: object, what: str, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.05)
    assert condition(), what  # type: ignore[operator]


async def dead_letters(queue: str, expected: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """The first ``expected`` messages of the queue's dead-letter queue (a bounded poll)."""
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(dead_letter_queue(queue), durable=True)
        found: list[aio_pika.abc.AbstractIncomingMessage] = []
        async with asyncio.timeout(20):
            while len(found) < expected:
                message = await dead.get(no_ack=True, fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                else:
                    found.append(message)
        return found


@pytest.mark.asyncio
async def test_requests_over_amqp_get_the_same_answers_as_over_grpc(small_models: Path, queue: str) -> None:
    async with running_server(models_dir=str(small_models), amqp_url=URL, amqp_queue=queue) as server:
        assert server.amqp is not None
        await wait_until(lambda: server.amqp is not None and server.amqp.up, "the AMQP ingress to consume")
        assert server.readiness() == {"": True, SERVICE_NAME: True, AMQP_NAME: True}
        async with AsyncAmqpClient(URL, queue=queue, timeout=20) as amqp, AsyncClient(server.address) as grpc_client:
            images = await amqp.generate_images("vae", 8, seed=3)
            assert images.shape == (8, 28, 28)
            np.testing.assert_array_equal(images, await grpc_client.generate_images("vae", 8, seed=3))
            text = await amqp.generate_text("transformer", "ROMEO:", max_new_tokens=30, seed=5)
            assert text == await grpc_client.generate_text("transformer", "ROMEO:", max_new_tokens=30, seed=5)
            with pytest.raises(ModelNotFound, match="model 'nope' is not served"):  # an error reply, not a lost request
                await amqp.generate_images("nope", 1)
            reply = await amqp.call(pb.GenerateRequest(model="vae", image=pb.ImageParams(n=2, seed=1)))
            assert {r.id for r in reply.results} == {reply.results[-1].id} and reply.results[-1].HasField("finish")


def test_the_blocking_amqp_client(small_models: Path, queue: str) -> None:
    async def serve(started: threading.Event, done: threading.Event) -> None:
        async with running_server(models_dir=str(small_models), amqp_url=URL, amqp_queue=queue):
            started.set()
            await asyncio.get_running_loop().run_in_executor(None, done.wait)

    started, done = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(serve(started, done)), daemon=True)
    thread.start()
    try:
        assert started.wait(120)
        with AmqpClient(URL, queue=queue, timeout=20) as client:  # its request waits in the queue until the ingress consumes
            assert client.generate_images("vae", 4, seed=1).shape == (4, 28, 28)
            assert len(client.generate_text("transformer", "A", max_new_tokens=5, temperature=0)) > 0
    finally:
        done.set()
        thread.join(60)


@pytest.mark.asyncio
async def test_an_iterative_model_is_served_over_amqp_as_over_grpc(tmp_path: Path, queue: str) -> None:
    models = tmp_path / "models"
    models.mkdir()
    drift_file(models / "drift.safetensors")
    async with running_server(models_dir=str(models), amqp_url=URL, amqp_queue=queue) as server:
        await wait_until(lambda: server.amqp is not None and server.amqp.up, "the AMQP ingress to consume")
        async with AsyncAmqpClient(URL, queue=queue, timeout=20) as amqp, AsyncClient(server.address) as grpc_client:
            options: ImageOptions = {"seed": 2, "steps": 5, "guidance": 1.5, "labels": [0, 1, 2]}
            images = await amqp.generate_images("drift", 3, **options)
            np.testing.assert_array_equal(images, await grpc_client.generate_images("drift", 3, **options))


@pytest.mark.asyncio
async def test_malformed_messages_and_missing_reply_to_are_dead_lettered(small_models: Path, queue: str) -> None:
    async with running_server(models_dir=str(small_models), amqp_url=URL, amqp_queue=queue) as server:
        await wait_until(lambda: server.amqp is not None and server.amqp.up, "the AMQP ingress to consume")
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel()
            good = pb.GenerateRequest(model="vae", image=pb.ImageParams(n=1)).SerializeToString()
            bad = [
                aio_pika.Message(b"\xff\xff not protobuf", reply_to="nowhere", correlation_id="a", content_type=CONTENT_TYPE),
                aio_pika.Message(good, correlation_id="b", content_type=CONTENT_TYPE),  # no reply_to
                aio_pika.Message(good, reply_to="nowhere", content_type=CONTENT_TYPE),  # no correlation_id
                aio_pika.Message(good, reply_to="nowhere", correlation_id="d", content_type="application/json"),
            ]
            for message in bad:
                await channel.default_exchange.publish(message, routing_key=queue)
        found = await dead_letters(queue, len(bad))
    assert sorted(m.body for m in found) == sorted(m.body for m in bad)
    assert {m.headers["x-death"][0]["reason"] for m in found} == {"rejected"}  # type: ignore[index,call-overload]


@pytest.mark.asyncio
async def test_a_request_whose_ttl_passes_in_the_queue_is_dead_lettered(queue: str) -> None:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        await declare_queues(channel, queue)  # as a server declares it, but no server consumes
        body = pb.GenerateRequest(model="vae", image=pb.ImageParams(n=1)).SerializeToString()
        message = aio_pika.Message(body, reply_to="nowhere", correlation_id="late", expiration=0.01)
        await channel.default_exchange.publish(message, routing_key=queue)
    (found,) = await dead_letters(queue, 1)
    assert found.correlation_id == "late" and found.headers["x-death"][0]["reason"] == "expired"  # type: ignore[index,call-overload]


@pytest.mark.asyncio
async def test_prefetch_is_the_pipelines_room(small_models: Path, queue: str) -> None:
    """queue_size 4: the server holds at most 4 unacknowledged requests; the rest wait in the broker."""
    async with running_server(models_dir=str(small_models), amqp_url=URL, amqp_queue=queue, queue_size=4) as server:
        assert server.amqp is not None and server.amqp.prefetch == 4
        await wait_until(lambda: server.amqp is not None and server.amqp.up, "the AMQP ingress to consume")
        async with AsyncAmqpClient(URL, queue=queue, timeout=60) as client:
            calls = [asyncio.create_task(client.generate_text("transformer", "A", max_new_tokens=1000, temperature=0)) for _ in range(12)]
            await wait_until(lambda: len(server.pipeline.inflight) == 4, "4 requests in flight")
            connection = await aio_pika.connect(URL)
            async with connection:
                waiting = await (await connection.channel()).declare_queue(queue, passive=True)
                ready = waiting.declaration_result.message_count
            assert len(server.pipeline.inflight) == 4 and ready == 8
            for call in calls:
                call.cancel()


@pytest.mark.asyncio
async def test_the_amqp_ingress_down_leaves_grpc_serving(small_models: Path) -> None:
    """No broker at the URL: the server starts, gRPC serves, readiness names the missing ingress."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # closed again: nothing listens there
    async with running_server(models_dir=str(small_models), amqp_url=f"amqp://guest:guest@127.0.0.1:{dead_port}/") as server:
        assert server.readiness() == {"": False, SERVICE_NAME: True, AMQP_NAME: False}
        async with AsyncClient(server.address) as client:
            assert (await client.generate_images("vae", 2, seed=0)).shape == (2, 28, 28)
        async with HealthChecker(server.address) as check:
            assert await check(AMQP_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await check("") == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await check(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.asyncio
async def test_a_lost_broker_connection_reconnects_while_grpc_serves(small_models: Path, queue: str) -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not on PATH: the test closes the server's connection from the broker's side")
    async with running_server(models_dir=str(small_models), amqp_url=URL, amqp_queue=queue) as server:
        ingress = server.amqp
        assert ingress is not None
        await wait_until(lambda: ingress.up, "the AMQP ingress to consume")
        listing = await rabbitmqctl("list_connections", "pid", "client_properties", "-q")
        (pid,) = [line.split("\t")[0] for line in listing.splitlines() if f"genserve {queue}" in line]
        await rabbitmqctl("close_connection", pid, "test: the broker closes the server's connection")
        async with AsyncClient(server.address, retry=None) as client:  # gRPC is not held up by the broker
            assert (await client.generate_images("vae", 1, seed=0)).shape == (1, 28, 28)
        await wait_until(lambda: ingress.reconnects >= 1 and ingress.up, "the ingress to reconnect and consume again")
        assert server.readiness()[AMQP_NAME]
        async with AsyncAmqpClient(URL, queue=queue, timeout=20) as amqp:  # the restored consumer serves
            assert (await amqp.generate_images("vae", 2, seed=1)).shape == (2, 28, 28)


async def rabbitmqctl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec("rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


class HealthChecker:
    """``async with HealthChecker(address) as check: await check(service)``: a health status."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)

    async def __aenter__(self) -> Callable[[str], Awaitable[int]]:
        stub = health_pb2_grpc.HealthStub(self.channel)

        async def check(service: str) -> int:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            return int(response.status)

        return check

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()


class AmqpServer(ServerProcess):
    """``python -m server`` consuming ``queue`` from the test broker; JSON logs read on a thread."""

    def __init__(self, models: Path, queue: str, *extra: str) -> None:
        super().__init__("--models-dir", str(models), "--amqp-queue", queue, *extra, env={"GENSERVE_AMQP_URL": URL})

    def event(self, name: str) -> dict[str, Any] | None:
        found = self.find(name)
        return found[0] if found else None


@pytest.fixture
def two_servers(small_models: Path, queue: str) -> Iterator[tuple[AmqpServer, AmqpServer]]:
    servers = (AmqpServer(small_models, queue), AmqpServer(small_models, queue))
    try:
        for s in servers:
            s.wait_for("amqp_consuming", 150)
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.mark.asyncio
async def test_a_server_killed_mid_load_loses_no_request(two_servers: tuple[AmqpServer, AmqpServer], queue: str) -> None:
    """Two servers on one queue; SIGKILL one while both hold requests: the broker redelivers its
    unacknowledged requests to the other, and every request gets an OK reply."""
    victim, _ = two_servers
    async with AsyncAmqpClient(URL, queue=queue, timeout=45) as client:
        calls: list[asyncio.Task[Any]] = []
        for i in range(40):
            if i % 2:
                calls.append(asyncio.create_task(client.generate_text("transformer", "ROMEO:", max_new_tokens=150, seed=i)))
            else:
                calls.append(asyncio.create_task(client.generate_images("vae", 64, seed=i)))
        await wait_until(lambda: any(c.done() for c in calls), "a first reply", 60)
        assert not all(c.done() for c in calls), "the load ended before the kill: make it longer"
        victim.proc.send_signal(signal.SIGKILL)
        results = await asyncio.gather(*calls)
    assert len(results) == 40  # gather raised had any request failed
    assert victim.proc.wait(5) == -signal.SIGKILL


@pytest.mark.asyncio
async def test_a_server_stopped_mid_load_hands_back_what_it_cannot_finish(small_models: Path, queue: str) -> None:
    """SIGTERM with a short grace: the server stops consuming, finishes what it can, and puts the
    rest back on the queue (UNAVAILABLE is "retry elsewhere"), where the other server serves it:
    every request gets one OK reply, none twice, and the stopped server exits 0."""
    stopping, other = AmqpServer(small_models, queue, "--grace-s", "0.3"), AmqpServer(small_models, queue)
    try:
        for s in (stopping, other):
            s.wait_for("amqp_consuming", 150)
        async with AsyncAmqpClient(URL, queue=queue, timeout=60) as client:
            # lengths staggered, so the first reply comes while each server still decodes the longer ones
            lengths = [16 + 40 * i for i in range(24)]
            calls = [asyncio.create_task(client.generate_text("transformer", "ROMEO:", max_new_tokens=n, seed=n)) for n in lengths]
            await wait_until(lambda: any(c.done() for c in calls), "a first reply", 60)
            assert not all(c.done() for c in calls), "the load ended before the stop: make it longer"
            stopping.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(stopping.wait_exit, 30) == 0
            results = await asyncio.gather(*calls)  # raised had any request failed
            assert len(results) == 24 and all(results)
            assert (client.duplicates, client.late) == (0, 0)
        stopped = stopping.event("stopped")
        assert stopped is not None and stopped["exit_code"] == 0
        # the grace was too short for the stopped server's share: some of it went back to the queue
        assert stopped["failed"] > 0, stopped
    finally:
        for s in (stopping, other):
            s.stop()


@pytest.mark.asyncio
async def test_each_worker_of_a_group_consumes_the_queue(small_models: Path, queue: str) -> None:
    """``--workers 2 --amqp-queue Q``: each worker is a consumer of its own (the broker sees two),
    and requests through the queue are served."""
    group = AmqpServer(small_models, queue, "--workers", "2")
    try:
        await asyncio.to_thread(group.wait_for, "amqp_consuming", 150, 2)  # one a worker
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            assert declared.declaration_result.consumer_count == 2
        async with AsyncAmqpClient(URL, queue=queue, timeout=60) as client:
            digits = await asyncio.gather(*(client.generate_images("vae", 2, seed=i) for i in range(40)))
        assert [d.shape for d in digits] == [(2, 28, 28)] * 40 and client.duplicates == 0
        group.proc.send_signal(signal.SIGTERM)  # the parent drains both workers
        assert await asyncio.to_thread(group.wait_exit, 30) == 0
        assert len(group.find("stopped")) == 2
    finally:
        group.stop()
