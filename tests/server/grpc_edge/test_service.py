"""End to end over a real localhost gRPC channel: every RPC, credits, deadlines, refusals, health,
reflection, a crashed stage, the drain."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import socket
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.grpc_edge.outbox import CallQueue
from server.pipeline.jobs import Job, Rpc
from server.pipeline.statuses import Code, Refused
from server.runtime.app import GenServer
from tests.decode_spy import StepSpy
from tests.serving import make_config, running_server

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

MODELS = "models"  # the bundled vae, gan and transformer


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> AsyncIterator[GenServer]:
    async with running_server(models_dir=MODELS, batch_size=128, stream_credits=16, max_new_tokens=512) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def spy(server: GenServer) -> AsyncIterator[StepSpy]:
    """The module server's transformer decode loop, watched (and pausable) for one test."""
    assert server.engine is not None
    watch = StepSpy(server.engine.decode_thread(server.registry.get("transformer")).loop)
    yield watch
    watch.restore()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stub(server: GenServer) -> AsyncIterator[pb_grpc.GeneratorStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield pb_grpc.GeneratorStub(channel)


def image(model: str = "vae", n: int = 1, seed: int | None = 0, labels: list[int] | None = None, **kw: object) -> pb.GenerateRequest:
    params = pb.ImageParams(n=n, labels=labels or [])
    if seed is not None:
        params.seed = seed
    return pb.GenerateRequest(model=model, image=params, **kw)  # type: ignore[arg-type]


def text(prompt: str = "ROMEO:", max_new_tokens: int = 8, seed: int = 0, **params: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="transformer", text=pb.TextParams(prompt=prompt, max_new_tokens=max_new_tokens, seed=seed, **params))  # type: ignore[arg-type]


async def collect(stub: pb_grpc.GeneratorStub, request: pb.GenerateRequest, **kw: object) -> list[pb.GenerateResponse]:
    return [m async for m in stub.Generate(request, **kw)]


async def status_of(stub: pb_grpc.GeneratorStub, request: pb.GenerateRequest, **kw: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub, request, **kw)
    return info.value.code(), info.value.details() or ""


def pixels(messages: list[pb.GenerateResponse]) -> np.ndarray:
    chunks = sorted((m.images for m in messages if m.HasField("images")), key=lambda c: c.offset)
    return np.concatenate([np.frombuffer(c.pixels, np.uint8).reshape(c.count, c.height, c.width) for c in chunks])


async def read_rest(call: grpc.aio.UnaryStreamCall) -> list[pb.GenerateResponse]:
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


async def wait_until(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# -- ListModels ----------------------------------------------------------------------------------


async def test_list_models_describes_what_each_model_accepts(stub: pb_grpc.GeneratorStub) -> None:
    models = {m.name: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
    assert set(models) == {"vae", "gan", "transformer"}
    assert models["vae"].kind == "vae" and models["vae"].image.image_size == 28 and not models["vae"].image.conditional
    assert models["gan"].image.conditional and (models["gan"].image.label_min, models["gan"].image.label_max) == (0, 9)
    assert not models["vae"].image.HasField("label_min") and not models["vae"].image.HasField("label_max")  # no range to state
    assert "R" in models["transformer"].text.vocab and models["transformer"].text.context_window == 128
    assert models["transformer"].text.max_new_tokens == 512
    assert all(m.latest and m.version == 1 for m in models.values())


# -- Generate -------------------------------------------------------------------------------------


async def test_generate_images_is_seeded_and_split_into_batches(stub: pb_grpc.GeneratorStub) -> None:
    messages = await collect(stub, image(n=300, seed=7))
    chunks = [m.images for m in messages if m.HasField("images")]
    assert sorted((c.offset, c.count) for c in chunks) == [(0, 128), (128, 128), (256, 44)]  # batch_size 128
    finish = messages[-1].finish
    assert finish.code == 0 and finish.reason == pb.FINISH_REASON_COMPLETE
    assert (finish.seed, finish.model, finish.version, finish.n_generated) == (7, "vae", 1, 300)
    first = pixels(messages)
    assert first.shape == (300, 28, 28) and first.dtype == np.uint8 and first.std() > 10
    again = pixels(await collect(stub, image(n=300, seed=7)))
    np.testing.assert_array_equal(first, again)
    other = pixels(await collect(stub, image(n=300, seed=8)))
    assert not np.array_equal(first, other)


async def test_a_seed_gives_the_same_samples_whatever_shares_the_batch(stub: pb_grpc.GeneratorStub) -> None:
    alone = pixels(await collect(stub, image(n=3, seed=42)))
    crowd = await asyncio.gather(*[collect(stub, image(n=5, seed=s)) for s in range(20)], collect(stub, image(n=3, seed=42)))
    np.testing.assert_array_equal(alone, pixels(crowd[-1]))


async def test_conditional_gan_draws_the_labels_asked_for(stub: pb_grpc.GeneratorStub) -> None:
    messages = await collect(stub, image("gan", n=4, seed=1, labels=[3, 1, 4, 1]))
    assert [list(m.images.labels) for m in messages if m.HasField("images")] == [[3, 1, 4, 1]]
    one_for_all = await collect(stub, image("gan", n=3, seed=1, labels=[7]))
    assert list(one_for_all[0].images.labels) == [7, 7, 7]
    drawn = await collect(stub, image("gan", n=50, seed=1))
    assert set(drawn[0].images.labels) <= set(range(10)) and len(set(drawn[0].images.labels)) > 3


async def test_floats_on_request(stub: pb_grpc.GeneratorStub) -> None:
    request = image(n=2, seed=3)
    request.image.want_float = True
    chunk = (await collect(stub, request))[0].images
    floats = np.frombuffer(chunk.floats, "<f4").reshape(2, 28, 28)
    assert floats.min() >= 0 and floats.max() <= 1
    np.testing.assert_allclose(np.round(floats * 255), np.frombuffer(chunk.pixels, np.uint8).reshape(2, 28, 28), atol=1)


async def test_text_streams_as_it_is_generated(stub: pb_grpc.GeneratorStub) -> None:
    messages = await collect(stub, text("ROMEO:", max_new_tokens=20, seed=5))
    chunks = [m.text for m in messages if m.HasField("text")]
    # A chunk carries the tokens that were ready when the handler took it: one each on an idle
    # server, several when the handler is behind (tests/test_outbox.py), never fewer than one.
    assert all(len(c.token_ids) == len(c.text) >= 1 for c in chunks)  # a character model: one character a token
    assert sum(len(c.token_ids) for c in chunks) == 20
    counts = [c.n_generated for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 20
    assert counts == list(itertools.accumulate(len(c.token_ids) for c in chunks))
    finish = messages[-1].finish
    assert finish.reason == pb.FINISH_REASON_LENGTH and finish.n_generated == 20 and finish.seed == 5
    again = await collect(stub, text("ROMEO:", max_new_tokens=20, seed=5))
    assert "".join(c.text for c in chunks) == "".join(m.text.text for m in again if m.HasField("text"))


async def test_a_stream_interval_sends_fewer_bigger_text_messages_of_the_same_text(stub: pb_grpc.GeneratorStub) -> None:
    per_token = await collect(stub, text("ROMEO:", max_new_tokens=20, seed=5))
    async with running_server(models_dir=MODELS, stream_interval=4) as other, grpc.aio.insecure_channel(other.address) as channel:
        grouped = await collect(pb_grpc.GeneratorStub(channel), text("ROMEO:", max_new_tokens=20, seed=5))
    chunks = [m.text for m in grouped if m.HasField("text")]
    assert 2 <= len(chunks) <= 1 + -(-19 // 4)  # the first token alone, then at least 4 a message (the last: what is left)
    assert all(len(c.token_ids) >= 4 for c in chunks[1:-1])
    assert "".join(c.text for c in chunks) == "".join(m.text.text for m in per_token if m.HasField("text"))
    assert grouped[-1].finish.n_generated == 20 and chunks[-1].n_generated == 20


async def test_text_stops_at_a_stop_string(stub: pb_grpc.GeneratorStub) -> None:
    messages = await collect(stub, text("ROMEO:", max_new_tokens=400, seed=1, stop=["\n"]))
    body = "".join(m.text.text for m in messages if m.HasField("text"))
    assert messages[-1].finish.reason == pb.FINISH_REASON_STOP and "\n" not in body.lstrip("\n")


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (image(model="nope"), grpc.StatusCode.NOT_FOUND, "available: gan, transformer, vae"),
        (image(model="../models/vae"), grpc.StatusCode.NOT_FOUND, "not served"),
        (image(version=9), grpc.StatusCode.NOT_FOUND, "version"),
        (pb.GenerateRequest(model="vae"), grpc.StatusCode.INVALID_ARGUMENT, "no params"),
        (image(n=0), grpc.StatusCode.INVALID_ARGUMENT, "n must be an integer from 1 to 1024"),
        (image(n=5000), grpc.StatusCode.INVALID_ARGUMENT, "n must be an integer from 1 to 1024"),
        (image("gan", n=2, labels=[10]), grpc.StatusCode.INVALID_ARGUMENT, "label"),
        (image("gan", n=2, labels=[1, 2, 3]), grpc.StatusCode.INVALID_ARGUMENT, "labels"),
        (image("vae", n=2, labels=[1]), grpc.StatusCode.INVALID_ARGUMENT, "label"),
        (image(seed=2**63), grpc.StatusCode.INVALID_ARGUMENT, "seed"),
        (text(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        (text(prompt="ROMEO: \u00e9"), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
        (text(max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (text(max_new_tokens=513), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (text(temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (text(temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (text(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (text(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (pb.GenerateRequest(model="vae", text=pb.TextParams(prompt="a")), grpc.StatusCode.INVALID_ARGUMENT, "send image"),
        (pb.GenerateRequest(model="transformer", image=pb.ImageParams(n=1)), grpc.StatusCode.INVALID_ARGUMENT, "send text"),
    ],
)
async def test_bad_requests_get_a_precise_status(
    stub: pb_grpc.GeneratorStub, server: GenServer, request_: pb.GenerateRequest, code: grpc.StatusCode, words: str
) -> None:
    got, details = await status_of(stub, request_)
    assert got == code and words in details
    assert (await collect(stub, image(n=1)))[-1].finish.code == 0  # and the server keeps serving
    await wait_until(lambda: not server.pipeline.inflight)


async def test_the_batchers_see_a_generate_call_from_its_acceptance(stub: pb_grpc.GeneratorStub, server: GenServer) -> None:
    """Batches close early once every Generate call in progress is in them; calls accepted and not yet
    admitted count too (the accept path's count), or a closed loop's next call would miss the batch."""
    seen: list[int] = []
    admit = type(server.pipeline).admit

    def admit_and_note(job: Job, timeout: float | None) -> None:
        seen.append(server.pipeline.calls_in_progress())
        admit(server.pipeline, job, timeout)

    server.pipeline.admit = admit_and_note  # type: ignore[method-assign]
    try:
        assert (await collect(stub, image(n=1)))[-1].finish.code == 0
    finally:
        vars(server.pipeline).pop("admit", None)
    assert seen == [1]  # the call being admitted, already counted since it was accepted
    await wait_until(lambda: server.pipeline.calls_in_progress() == 0)


@pytest.mark.parametrize(
    ("params", "words"),
    [
        (pb.ImageParams(n=4, labels=[1, 2]), r"^labels has 2 entries, fewer than the 4 samples .*; send 4 "),  # passed admission once
        (pb.ImageParams(n=4, labels=range(10)), r"^labels has 10 entries, more than the 4 samples; send 4 \(one per sample\) or 1"),
        (pb.ImageParams(n=2, labels=[10]), r"^label 10 at index 0 is outside 0\.\.9$"),
        (pb.ImageParams(n=1, seed=2**63), r"^seed must be an integer from 0 to 2\*\*63-1"),
    ],
)
async def test_image_requests_are_checked_at_admission_by_the_engine_rules(server: GenServer, params: pb.ImageParams, words: str) -> None:
    builder = server.pipeline.jobs
    with pytest.raises(Refused, match=words) as refused:
        builder.build(pb.GenerateRequest(model="gan", image=params), Rpc.GENERATE, "r1", CallQueue())
    assert refused.value.code == Code.INVALID_ARGUMENT


async def assert_cancelled(spy: StepSpy, seed: int) -> None:
    """The sequence left the loop at a step, long before its 512 tokens (a no-op cancel ends in "length")."""
    last = await spy.wait_final(seed)
    assert last.finish_reason == "cancelled" and last.n_generated < 512
    await wait_until(lambda: spy.loop.active_count == 0)


async def test_deadline_passes_while_generating(stub: pb_grpc.GeneratorStub, server: GenServer, spy: StepSpy) -> None:
    call = stub.Generate(text(max_new_tokens=512, seed=101), timeout=0.5)
    await call.read()  # generating
    spy.pause()  # the sequence cannot finish before its deadline, however fast the machine
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await read_rest(call)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    spy.resume()
    await assert_cancelled(spy, 101)
    await wait_until(lambda: not server.pipeline.inflight)


async def test_request_timeout_field_is_a_deadline_too(stub: pb_grpc.GeneratorStub, spy: StepSpy) -> None:
    request = text(max_new_tokens=512, seed=102)
    request.timeout_ms = 300
    spy.pause()
    code, details = await status_of(stub, request)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in details
    spy.resume()
    await assert_cancelled(spy, 102)


async def test_a_client_that_goes_away_leaves_the_decode_loop(stub: pb_grpc.GeneratorStub, server: GenServer, spy: StepSpy) -> None:
    call = stub.Generate(text(max_new_tokens=512, seed=103))
    async for message in call:
        assert message.HasField("text")
        break
    call.cancel()
    await assert_cancelled(spy, 103)
    await wait_until(lambda: not server.pipeline.inflight)


# -- GenerateStream -------------------------------------------------------------------------------


class StreamClient:
    """A test driver of one GenerateStream: send when told, collect results by id, track credit."""

    def __init__(self, stub: pb_grpc.GeneratorStub) -> None:
        self.call = stub.GenerateStream()
        self.credit = 0
        self.grants: list[int] = []
        self.finishes: dict[str, pb.Finish] = {}
        self.chunks: dict[str, list[pb.GenerateResponse]] = {}
        self.messages = 0
        self.outcomes: list[tuple[str, int]] = []  # (id, code) in arrival order
        self.unique = True  # every id gets one outcome (a test of duplicate ids turns this off)

    async def read_until(self, done: object) -> None:
        while not done():  # type: ignore[operator]
            message = await asyncio.wait_for(self.call.read(), 10)
            assert message is not grpc.aio.EOF
            self.messages += 1
            self.credit += message.credits
            self.grants.append(message.credits)
            for r in message.results:
                if r.HasField("finish"):
                    assert not (self.unique and r.id in self.finishes), f"two outcomes for {r.id}"
                    self.finishes[r.id] = r.finish
                    self.outcomes.append((r.id, r.finish.code))
                else:
                    self.chunks.setdefault(r.id, []).append(r)

    async def send(self, *requests: pb.GenerateRequest, cancel: tuple[str, ...] = ()) -> None:
        self.credit -= len(requests)
        await self.call.write(pb.StreamRequest(requests=requests, cancel=cancel))


def tagged(request: pb.GenerateRequest, id_: str) -> pb.GenerateRequest:
    request.id = id_
    return request


async def test_stream_grants_credits_and_refuses_requests_beyond_them(stub: pb_grpc.GeneratorStub) -> None:
    s = StreamClient(stub)
    await s.read_until(lambda: s.messages >= 1)
    assert s.grants[0] == 16  # stream_credits
    await s.send(*[tagged(image(n=1, seed=i), f"r{i}") for i in range(20)])  # 4 beyond the credit
    await s.read_until(lambda: len(s.finishes) == 20)
    refused = sorted(k for k, f in s.finishes.items() if f.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    assert refused == ["r16", "r17", "r18", "r19"]
    assert all(s.finishes[f"r{i}"].code == 0 and len(s.chunks[f"r{i}"]) == 1 for i in range(16))
    assert s.credit + len(refused) == 16  # every admitted request gave its credit back; the refused never used one
    await s.send(*[tagged(image(n=1, seed=i), f"again{i}") for i in range(16)])  # the stream is still usable
    await s.read_until(lambda: len(s.finishes) == 36)
    assert all(s.finishes[f"again{i}"].code == 0 for i in range(16))
    await s.call.done_writing()
    assert await s.call.read() is grpc.aio.EOF
    assert await s.call.code() == grpc.StatusCode.OK


async def test_stream_multiplexes_images_and_text_and_coalesces_results(stub: pb_grpc.GeneratorStub) -> None:
    s = StreamClient(stub)
    await s.read_until(lambda: s.messages >= 1)
    requests = [tagged(image(n=1, seed=i), f"i{i}") for i in range(10)] + [
        tagged(text(max_new_tokens=5, seed=i), f"t{i}") for i in range(3)
    ]
    await s.send(*requests)
    await s.read_until(lambda: len(s.finishes) == 13)
    assert all(f.code == 0 for f in s.finishes.values())
    assert all(len(s.chunks[f"t{i}"]) == 5 for i in range(3))
    assert s.messages < 1 + 13 + 15  # several results per message
    alone = pixels(await collect(stub, image(n=1, seed=4)))
    np.testing.assert_array_equal(pixels(s.chunks["i4"]), alone)
    await s.call.done_writing()


_neighbours = st.lists(st.tuples(st.integers(1, 8), st.integers(0, 2**63 - 1)), min_size=1, max_size=15)  # 16 credits


@settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    model=st.sampled_from(["vae", "gan"]), n=st.integers(1, 6), seed=st.integers(0, 2**63 - 1), neighbours=_neighbours, at=st.integers(0, 9)
)
async def test_a_request_alone_and_inside_a_stream_message_with_neighbours_gets_the_same_pixels(
    stub: pb_grpc.GeneratorStub, model: str, n: int, seed: int, neighbours: list[tuple[int, int]], at: int
) -> None:
    """Issue #17: the GAN's n=3 seed=5 beside 20 requests of n=5 once came back one level off in one pixel."""
    alone = pixels(await collect(stub, image(model, n=n, seed=seed)))
    s = StreamClient(stub)
    await s.read_until(lambda: s.messages >= 1)
    crowd = [tagged(image(model, n=k, seed=v), f"o{i}") for i, (k, v) in enumerate(neighbours)]
    crowd.insert(min(at, len(crowd)), tagged(image(model, n=n, seed=seed), "target"))
    await s.send(*crowd)  # one message
    await s.read_until(lambda: len(s.finishes) == len(crowd))
    assert all(f.code == 0 for f in s.finishes.values())
    np.testing.assert_array_equal(pixels(s.chunks["target"]), alone)
    await s.call.done_writing()
    assert await s.call.read() is grpc.aio.EOF


async def test_stream_refuses_bad_ids_and_bad_requests_per_id(stub: pb_grpc.GeneratorStub, spy: StepSpy) -> None:
    s = StreamClient(stub)
    s.unique = False
    await s.read_until(lambda: s.messages >= 1)
    long_text = tagged(text(max_new_tokens=512, seed=104), "dup")
    await s.send(
        long_text, tagged(image(n=1), "dup"), tagged(image(n=1), ""), tagged(image(n=1), "x" * 500), tagged(image(model="nope"), "nf")
    )
    await s.read_until(lambda: len(s.finishes) >= 4)
    codes = {k: grpc.StatusCode.INVALID_ARGUMENT.value[0] for k in ("", "x" * 128)}
    codes["nf"] = grpc.StatusCode.NOT_FOUND.value[0]
    assert {k: s.finishes[k].code for k in codes} == codes
    assert ("dup", grpc.StatusCode.ALREADY_EXISTS.value[0]) in s.outcomes
    await s.send(cancel=("dup",))  # the long one: cancelled by the client, still one outcome
    await s.read_until(lambda: len(s.outcomes) == 5)
    assert s.outcomes[-1] == ("dup", grpc.StatusCode.CANCELLED.value[0])
    await assert_cancelled(spy, 104)
    assert s.credit == 16  # each of the five used a credit, and each gave it back
    await s.call.done_writing()


async def test_stream_request_deadline(stub: pb_grpc.GeneratorStub, spy: StepSpy) -> None:
    s = StreamClient(stub)
    await s.read_until(lambda: s.messages >= 1)
    request = tagged(text(max_new_tokens=512, seed=105), "slow")
    request.timeout_ms = 300
    spy.pause()
    await s.send(request, tagged(image(n=1), "fast"))
    await s.read_until(lambda: len(s.finishes) == 2)
    assert s.finishes["slow"].code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and s.finishes["fast"].code == 0
    spy.resume()
    await assert_cancelled(spy, 105)
    await s.call.done_writing()


async def test_a_stream_that_ends_cancels_its_work(stub: pb_grpc.GeneratorStub, server: GenServer, spy: StepSpy) -> None:
    s = StreamClient(stub)
    await s.read_until(lambda: s.messages >= 1)
    await s.send(*[tagged(text(max_new_tokens=512, seed=110 + i), f"t{i}") for i in range(4)])
    await s.read_until(lambda: len(s.chunks) == 4)
    s.call.cancel()
    for i in range(4):
        await assert_cancelled(spy, 110 + i)
    await wait_until(lambda: not server.pipeline.inflight)


# -- health, reflection, metrics ----------------------------------------------------------------


async def test_health_reports_readiness_and_liveness(server: GenServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "genserve.v1.Generator", "liveness"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(server: GenServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        replies = [r async for r in stub.ServerReflectionInfo(ask())]
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"genserve.v1.Generator", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names
        # grpc.reflection.v1, which grpcurl and grpcui ask for first: the same messages under another name
        v1 = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        replies = [r async for r in v1(ask())]
        assert {s.name for s in replies[0].list_services_response.service} == names


async def test_metrics_count_requests_batches_and_rejections(stub: pb_grpc.GeneratorStub, server: GenServer) -> None:
    await collect(stub, image(n=3))
    await status_of(stub, image(model="nope"))
    registry = server.metrics.registry
    assert (registry.get_sample_value("genserve_requests_total", {"model": "vae", "rpc": "Generate", "code": "OK"}) or 0) >= 1
    assert (registry.get_sample_value("genserve_rejections_total", {"rpc": "Generate", "code": "NOT_FOUND"}) or 0) >= 1
    assert (registry.get_sample_value("genserve_batch_size_count", {"model": "vae"}) or 0) >= 1
    assert registry.get_sample_value("genserve_queue_depth", {"stage": "producer"}) == 0
    assert registry.get_sample_value("genserve_inflight_requests") == 0


# -- supervision ------------------------------------------------------------------------------------


async def test_a_killed_stage_is_restarted_and_serving_goes_on() -> None:
    async with running_server(models_dir=MODELS, restart_intensity=10) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        stages = ("batcher-vae", "producer", "processor-0", "processor-1", "router", "text-transformer")
        for name in stages:
            srv.supervisor.kill(name)
            await asyncio.sleep(0)
            assert (await collect(stub, image(n=2, seed=1)))[-1].finish.code == 0
            assert (await collect(stub, text(max_new_tokens=3)))[-1].finish.code == 0
        assert all(srv.supervisor.restart_count[name] == 1 for name in stages)
        assert srv.metrics.registry.get_sample_value("genserve_stage_restarts_total", {"stage": "router"}) == 1
        assert not srv.supervisor.gave_up


async def test_work_held_by_a_killed_stage_is_failed_with_unavailable_not_lost() -> None:
    async with running_server(models_dir=MODELS, batch_timeout_ms=5000, batch_size=64) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.GeneratorStub(ch)
        # A text call held in flight: with every unfinished request in the batch a batch closes at
        # once (Batcher._alone), so without another request the image calls could leave the open batch
        spy = StepSpy(srv.engine.decode_thread(srv.registry.get("transformer")).loop)
        held = stub.Generate(text(max_new_tokens=512, seed=99))
        await held.read()  # admitted and generating
        spy.pause()
        try:
            calls = [asyncio.ensure_future(collect(stub, image(n=1, seed=i))) for i in range(3)]
            # all three in the open batch
            await wait_until(lambda: len(srv.pipeline.inflight) == 4 and not len(srv.pipeline.image_links["vae"]))
            srv.supervisor.kill("batcher-vae")
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAVAILABLE for r in results)
            assert "may be retried" in str(results[0])
            assert (await collect(stub, image(n=64)))[-1].finish.code == 0  # the restarted batcher serves (a full batch: no 5 s wait)
        finally:
            spy.restore()
            held.cancel()


async def test_a_failed_start_stops_its_stages_without_restarting_them(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise RuntimeError("injected: registering the service failed")

    monkeypatch.setattr("server.runtime.app.register", fail)  # fails after the supervisor has started every stage
    srv = GenServer(make_config(models_dir=MODELS))
    with pytest.raises(RuntimeError, match="injected"):
        await srv.start()
    assert srv._supervisor_task is not None and srv._supervisor_task.done()
    assert sum(srv.supervisor.restart_count.values()) == 0 and not srv.supervisor.gave_up
    assert srv.metrics.registry.get_sample_value("genserve_stage_restarts_total", {"stage": "router"}) is None


# -- servers of their own -----------------------------------------------------------------------------


async def test_full_server_refuses_at_once() -> None:
    async with running_server(models_dir=MODELS, max_inflight=2) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        spy = StepSpy(srv.engine.decode_thread(srv.registry.get("transformer")).loop)
        calls = [stub.Generate(text(max_new_tokens=512, seed=i)) for i in range(2)]
        for call in calls:
            await call.read()  # both admitted and generating
        spy.pause()  # neither can finish, however fast the machine
        # at once: a call parked instead of refused would meet its deadline, not RESOURCE_EXHAUSTED
        code, details = await status_of(stub, image(n=1), timeout=10)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 2" in details
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "genserve.v1.Generator", "liveness"):  # README: a full queue is not unhealthy
            assert (await health.Check(health_pb2.HealthCheckRequest(service=name))).status == health_pb2.HealthCheckResponse.SERVING
        spy.resume()
        for call in calls:
            call.cancel()
        await wait_until(lambda: not srv.pipeline.inflight)
        assert (await collect(stub, image(n=1)))[-1].finish.code == 0


def vae_only(tmp_path: Path) -> str:
    """A models folder of the bundled VAE alone: a server on it starts in a fraction of the time."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(Path(MODELS) / "vae.safetensors", folder)
    return str(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_metrics_are_served_over_http_on_their_own_port(tmp_path: Path) -> None:
    """README: Prometheus metrics on :9464/metrics by default; here on a free port (every other test turns them off)."""
    port = free_port()
    async with running_server(models_dir=vae_only(tmp_path), metrics_port=port) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        assert (await collect(pb_grpc.GeneratorStub(channel), image(n=2)))[-1].finish.code == 0

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                assert response.status == 200
                return str(response.read().decode())

        body = await asyncio.to_thread(scrape)
    assert 'genserve_requests_total{code="OK",model="vae",rpc="Generate"} 1.0' in body
    for family in ("genserve_queue_depth", "genserve_inflight_requests", "genserve_batch_size", "genserve_stage_restarts_total"):
        assert family in body
    busy = float(next(line.split()[1] for line in body.splitlines() if line.startswith("genserve_loop_busy_ratio ")))
    assert 0.0 <= busy <= 1.0  # the event loop's busy share (server/runtime/loop_busy.py), sampled while it serves
    with pytest.raises(OSError):  # and the port is closed with the server
        await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/metrics", timeout=5)


async def test_readiness_is_not_serving_until_the_server_is_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: readiness is NOT_SERVING while starting; seen by a health check the moment the port opens."""
    seen: dict[str, int] = {}
    real_server = grpc.aio.server

    def server(*args: object, **kwargs: object) -> grpc.aio.Server:
        srv = real_server(*args, **kwargs)
        ports: list[int] = []
        real_add, real_start = srv.add_insecure_port, srv.start

        def add(address: str) -> int:
            ports.append(real_add(address))
            return ports[-1]

        async def start() -> None:
            await real_start()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for name in ("", "genserve.v1.Generator", "liveness"):
                    seen[name] = (await health.Check(health_pb2.HealthCheckRequest(service=name))).status

        srv.add_insecure_port, srv.start = add, start
        return srv

    monkeypatch.setattr(grpc.aio, "server", server)
    async with running_server(models_dir=vae_only(tmp_path)) as srv:
        not_serving, serving = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
        assert seen == {"": not_serving, "genserve.v1.Generator": not_serving, "liveness": serving}
        async with grpc.aio.insecure_channel(srv.address) as channel:
            assert (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))).status == serving


async def test_drain_finishes_in_flight_work_and_refuses_new_work() -> None:
    async with running_server(models_dir=MODELS) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        call = stub.Generate(text(max_new_tokens=60, seed=3))
        await call.read()
        stopping = asyncio.create_task(srv.stop(grace=10))
        await wait_until(lambda: not srv.pipeline.accepting)
        assert (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == health_pb2.HealthCheckResponse.NOT_SERVING
        code, details = await status_of(stub, image(n=1))
        assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
        rest = await read_rest(call)
        assert rest[-1].finish.reason == pb.FINISH_REASON_LENGTH and rest[-1].finish.n_generated == 60
        await stopping


async def test_drain_fails_what_outlives_the_grace_period() -> None:
    async with running_server(models_dir=MODELS) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        spy = StepSpy(srv.engine.decode_thread(srv.registry.get("transformer")).loop)
        call = stub.Generate(text(max_new_tokens=512, seed=3))
        await call.read()
        spy.pause()  # it cannot finish within the grace period, however fast the machine
        stopping = asyncio.create_task(srv.stop(grace=0.2))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await read_rest(call)
        # failed by the drain with its reason (not merely cut off when the listener stops)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == "server shut down before the request finished; the request may be retried"
        spy.resume()
        await stopping


async def test_restart_intensity_exceeded_drains_and_exits_non_zero() -> None:
    async with running_server(models_dir=MODELS, restart_intensity=2, restart_period_s=30) as srv:
        for _ in range(3):
            srv.supervisor.kill("router")
            await asyncio.sleep(0.05)
        code = await asyncio.wait_for(srv.serve_forever(), 20)
        assert code == 1 and srv.supervisor.gave_up
