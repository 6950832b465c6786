"""Bad input over a real server (issue 6), by name: messages at and past the size limit, malformed
bytes, the stream's cancel and credit corners, and each bug the storms (test_fuzz.py) found, with
its own test. One server serves the bundled models for the module; the oracle is tests/bad_input/oracle.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError

from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from tests.bad_input.oracle import (
    CALL_TIMEOUT_S,
    CLIENT_OPTIONS,
    CODES,
    CREDITS,
    LIMIT,
    MAX_NEW,
    SC,
    Batch,
    CallResult,
    Harness,
    StreamRun,
    assert_still_serving,
    bad_outcomes,
    call_generate,
    inflight,
    raw_methods,
    wait_until,
)
from tests.serving import ServerThread

pytestmark = [pytest.mark.timeout(300)]


def test_message_size_limit_is_exact(harness: Harness) -> None:
    """A request of exactly max_message_mb is read; one byte more is refused by gRPC, cleanly."""
    h = harness
    bad = bad_outcomes(h)
    for size, code in [(LIMIT, SC.OK), (LIMIT + 1, SC.RESOURCE_EXHAUSTED), (4 * LIMIT, SC.RESOURCE_EXHAUSTED)]:
        request = pb.GenerateRequest(model="transformer", text=pb.TextParams(prompt="", max_new_tokens=1, seed=0))
        request.text.prompt = "a" * (size - request.ByteSize() - 40)
        request.id = "i" * (size - request.ByteSize() - 2)  # tag and one-byte length: the rest of the size, exactly
        assert request.ByteSize() == size
        result = call_generate(h.stub, request)
        assert result.code == code, (size, result.code, result.details)
        if code == SC.OK:
            assert result.messages[-1].finish.n_generated == 1
        else:
            assert "larger than max" in result.details
    assert_still_serving(h, bad)


def test_stream_cancels_and_credit_edges(harness: Harness) -> None:
    """Deterministic corners: cancel an unknown id, cancel twice, reuse an id after its Finish,
    a message of only cancels, and exactly the credit then one more."""
    h = harness
    bad = bad_outcomes(h)
    text = pb.TextParams(prompt="ROMEO:", max_new_tokens=MAX_NEW, seed=1)
    plan = [
        Batch([pb.GenerateRequest(id="t", model="transformer", text=text)], 1, [], False),
        Batch([], 0, [0, 0], False),  # cancel "t" twice
        Batch([pb.GenerateRequest(id="t", model="vae", image=pb.ImageParams(n=1))], 1, [], True),  # after its Finish: a new request
    ]
    run = StreamRun(plan).run(h.stub)
    run.check(h.catalog)
    first_t = next(r.finish for r in run.results if r.id == "t" and r.HasField("finish"))
    assert CODES[first_t.code] in (SC.CANCELLED, SC.OK)

    flood = [pb.GenerateRequest(id=f"f{k}", model="transformer", text=text) for k in range(CREDITS + 1)]
    run = StreamRun([Batch(flood, len(flood), [], False), Batch([], 0, list(range(CREDITS)), False)]).run(h.stub)
    run.check(h.catalog)
    codes = {r.id: CODES[r.finish.code] for r in run.results if r.HasField("finish")}
    assert codes[f"f{CREDITS}"] == SC.RESOURCE_EXHAUSTED and run.no_credit == 1
    assert all(codes[f"f{k}"] in (SC.CANCELLED, SC.OK) for k in range(CREDITS))
    assert_still_serving(h, bad)


def test_an_oversized_stream_message_ends_only_that_stream(harness: Harness) -> None:
    """A StreamRequest over the limit ends its stream with RESOURCE_EXHAUSTED; the requests it had
    in flight are dropped (nothing stays in flight) and other callers never notice."""
    h = harness
    bad = bad_outcomes(h)
    text = pb.TextParams(prompt="ROMEO:", max_new_tokens=MAX_NEW)
    in_flight = pb.StreamRequest(requests=[pb.GenerateRequest(id=f"t{k}", model="transformer", text=text) for k in range(8)])
    huge = pb.StreamRequest(requests=[pb.GenerateRequest(id="big", model="transformer", text=pb.TextParams(prompt="a" * (LIMIT + 1)))])
    huge_cancel = pb.StreamRequest(cancel=["x" * 1000] * (LIMIT // 1000 + 10))
    for oversized in (huge, huge_cancel):
        assert oversized.ByteSize() > LIMIT
        bystander = h.pool.submit(call_generate, h.stub, pb.GenerateRequest(model="transformer", text=text))
        with pytest.raises(grpc.RpcError) as info:
            list(h.stub.GenerateStream(iter([in_flight, oversized]), timeout=CALL_TIMEOUT_S))
        assert info.value.code() == SC.RESOURCE_EXHAUSTED, info.value.details()
        assert bystander.result().code == SC.OK
        assert wait_until(lambda: inflight(h) == 0)
    assert_still_serving(h, bad)


MALFORMED = {
    "bad wire type": b"\xff",
    "truncated varint": b"\x08",
    "length past the end": b"\x0a\x05ab",
    "wire type 6": b"\x0e",
    "truncated fixed64": b"\x09\x01\x02",
    "end-group without a group": b"\x0c",
    "huge length": b"\x0a\xff\xff\xff\xff\x0f",
}
BAD_UTF8 = {  # a string field holding bytes that are not UTF-8 (a parse error in proto3)
    "Generate": b"\x0a\x02\xff\xfe",  # model
    "GenerateStream": b"\x0a\x04\x0a\x02\xff\xfe",  # requests[0].model
}


def malformed_payloads(method: str) -> dict[str, bytes]:
    payloads = dict(MALFORMED)
    if method in BAD_UTF8:
        payloads["bad UTF-8"] = BAD_UTF8[method]
    for raw in payloads.values():
        message = {"ListModels": pb.ListModelsRequest, "Generate": pb.GenerateRequest, "GenerateStream": pb.StreamRequest}[method]()
        with pytest.raises(DecodeError):
            message.ParseFromString(raw)
    return payloads


@pytest.mark.parametrize("method", ["ListModels", "Generate", "GenerateStream"])
def test_malformed_bytes_leave_the_server_serving(harness: Harness, method: str) -> None:
    h = harness
    bad = bad_outcomes(h)
    call = raw_methods(h.channel)[method]
    for raw in malformed_payloads(method).values():
        with pytest.raises(grpc.RpcError) as info:
            call(raw)
        assert info.value.code() != SC.OK
    # a stream that turns malformed after a good message: its requests do not stay in flight
    stream = h.channel.stream_stream("/genserve.v1.Generator/GenerateStream", request_serializer=None, response_deserializer=None)
    good = pb.StreamRequest(
        requests=[pb.GenerateRequest(id="t", model="transformer", text=pb.TextParams(prompt="A", max_new_tokens=MAX_NEW))]
    ).SerializeToString()
    with pytest.raises(grpc.RpcError):
        list(stream(iter([good, b"\xff"]), timeout=CALL_TIMEOUT_S))
    assert wait_until(lambda: inflight(h) == 0)
    assert_still_serving(h, bad)


@pytest.mark.parametrize("method", ["ListModels", "Generate", "GenerateStream"])
def test_malformed_bytes_are_invalid_argument(harness: Harness, method: str) -> None:
    call = raw_methods(harness.channel)[method]
    got = {}
    for name, raw in malformed_payloads(method).items():
        with pytest.raises(grpc.RpcError) as info:
            call(raw)
        got[name] = info.value.code()
    assert got == dict.fromkeys(got, SC.INVALID_ARGUMENT), {k: v.name for k, v in got.items()}


def text_of(result: CallResult) -> str:
    return "".join(m.text.text for m in result.messages if m.HasField("text"))


def test_a_tiny_temperature_decodes_greedily_and_spares_its_neighbour(harness: Harness) -> None:
    """README: temperatures below 1e-6 decode greedily (logits / 1e-40 once overflowed and crashed the loop)."""
    h = harness
    bad = bad_outcomes(h)

    def tiny(temperature: float) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            model="transformer", text=pb.TextParams(prompt="ROMEO:", max_new_tokens=8, temperature=temperature, seed=1)
        )

    greedy = call_generate(h.stub, tiny(0.0))
    assert greedy.code == SC.OK and len(text_of(greedy)) == 8
    for temperature in (1e-45, 1e-40, 1e-38, 9e-7):  # float32 on the wire: 1e-45 is its smallest subnormal
        alone = call_generate(h.stub, tiny(temperature))  # alone, as the greedy one ran: the same batch of one
        assert (alone.code, text_of(alone)) == (SC.OK, text_of(greedy)), temperature
        bystander_request = pb.GenerateRequest(model="transformer", text=pb.TextParams(prompt="ROMEO:", max_new_tokens=MAX_NEW, seed=3))
        bystander = h.stub.Generate(bystander_request, timeout=CALL_TIMEOUT_S)
        assert next(bystander).HasField("text")  # decoding when the tiny one joins
        assert call_generate(h.stub, tiny(temperature)).code == SC.OK
        assert list(bystander)[-1].finish.code == 0  # the request next to it is not harmed
    assert bad_outcomes(h) == bad


def test_stream_messages_fit_the_server_message_limit(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "vae.safetensors").write_bytes(Path("models/vae.safetensors").read_bytes())
    with (
        ServerThread(models_dir=str(models), max_message_mb=1, batch_size=128) as server,
        grpc.insecure_channel(server.address, options=CLIENT_OPTIONS) as channel,
    ):
        stub = pb_grpc.GeneratorStub(channel)
        requests = [pb.GenerateRequest(id=str(k), model="vae", image=pb.ImageParams(n=1024, want_float=True, seed=k)) for k in range(8)]
        finished, sizes = [], []
        try:
            call = stub.GenerateStream(iter([pb.StreamRequest(requests=requests)]), timeout=60)
            time.sleep(1.0)  # a client busy elsewhere for a moment: results pile up, to be coalesced
            for message in call:
                sizes.append(message.ByteSize())
                finished += [r.finish.code for r in message.results if r.HasField("finish")]
            status = "OK"
        except grpc.RpcError as e:
            status = f"{e.code().name}: {e.details()}"
        assert (status, finished) == ("OK", [0] * 8), (status, max(sizes, default=0))


def test_a_stream_that_never_reads_cannot_make_the_server_buffer_without_bound(harness: Harness) -> None:
    h = harness
    bad = bad_outcomes(h)
    assert h.server.server is not None
    metrics = h.server.server.metrics.registry

    def refused() -> float:
        return metrics.get_sample_value("genserve_rejections_total", {"rpc": "GenerateStream", "code": "NOT_FOUND"}) or 0.0

    before = refused()
    unknown = pb.GenerateRequest(id="x", model="no-such-model", image=pb.ImageParams(n=1))
    message = pb.StreamRequest(requests=[unknown] * 100_000)  # 1.2 MB
    offered = [0]

    def outgoing() -> Iterator[pb.StreamRequest]:
        for _ in range(40):
            offered[0] += 1
            yield message

    call = h.stub.GenerateStream(outgoing(), timeout=60)  # never read
    bound = 200_000  # answered but unsent refusals the server may hold for one stream (two messages' worth)
    try:
        last, still = offered[0], time.monotonic()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and refused() - before <= bound:
            time.sleep(0.25)
            if offered[0] != last:
                last, still = offered[0], time.monotonic()
            elif time.monotonic() - still > 3:  # the server stopped reading: back-pressure reached the client
                break
        answered = refused() - before
    finally:
        call.cancel()
    assert wait_until(lambda: inflight(h) == 0)
    assert answered <= bound, f"the server answered {answered:.0f} refusals nobody read ({offered[0]} messages taken)"
    assert_still_serving(h, bad)
