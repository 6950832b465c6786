"""The service (server/grpc_edge/service.py) end to end over a real localhost gRPC channel: ListModels,
Generate, refusals, deadlines, a client that goes away, health, reflection, the request counts."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.grpc_edge.outbox import CallQueue
from server.pipeline.jobs import Job, Rpc
from server.pipeline.statuses import Code, Refused
from server.runtime.app import GenServer
from tests.decode_spy import StepSpy
from tests.server.grpc_calls import MODELS, assert_cancelled, collect, image, pixels, read_rest, status_of, text, wait_until
from tests.serving import running_server

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]


async def test_list_models_describes_what_each_model_accepts(stub: pb_grpc.GeneratorStub) -> None:
    models = {m.name: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
    assert set(models) == {"vae", "gan", "flow", "transformer"}
    assert models["vae"].kind == "vae" and models["vae"].image.image_size == 28 and not models["vae"].image.conditional
    assert models["gan"].image.conditional and (models["gan"].image.label_min, models["gan"].image.label_max) == (0, 9)
    assert not models["vae"].image.HasField("label_min") and not models["vae"].image.HasField("label_max")  # no range to state
    assert "R" in models["transformer"].text.vocab and models["transformer"].text.context_window == 128
    assert models["transformer"].text.max_new_tokens == 512
    flow = models["flow"].image  # an iterative model says its steps; one-shot ones leave them 0
    assert (flow.steps_min, flow.steps_max, flow.steps_default) == (1, 200, 10) and flow.guidance_default == pytest.approx(1.5)
    assert (models["vae"].image.steps_max, models["gan"].image.guidance_default) == (0, 0.0)
    assert all(m.latest and m.version == 1 for m in models.values())


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
    # server, several when the handler is behind (tests/server/grpc_edge/test_outbox.py), never fewer than one.
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
        (image(model="nope"), grpc.StatusCode.NOT_FOUND, "available: flow, gan, transformer, vae"),
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
