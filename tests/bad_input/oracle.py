"""The server the bad-input tests run against, the client's side of their calls, and the oracle.

An oracle written from the protocol and the limits ListModels announces (not from the server's
code paths) says which statuses each request may end with:
- a fault found at admission (no params, unknown model or version, wrong kind, n, label count,
  sampling settings, empty prompt; on GenerateStream also an empty or overlong id): the call ends
  at once with that fault's code, nothing else;
- a fault found after admission (label values, a seed past 2**63, a character outside the
  vocabulary): INVALID_ARGUMENT, or DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED if time or room ran out
  first;
- a valid request: OK with a well-formed result, or DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED;
- a message over the server's limit: RESOURCE_EXHAUSTED (gRPC's own check).
UNKNOWN and INTERNAL are never allowed. After each test the server still serves, with nothing in
flight, no stage restarted, and no request counted with UNKNOWN, INTERNAL or UNAVAILABLE
(``assert_still_serving``)."""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.sampling import MAX_STOP_LENGTH, MAX_STOP_STRINGS
from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.pipeline.requests import MAX_ID_LENGTH
from tests.serving import ServerThread

SC = grpc.StatusCode
CODES = {code.value[0]: code for code in grpc.StatusCode}

MESSAGE_MB = 5  # the largest message either side accepts here
LIMIT = MESSAGE_MB << 20
CREDITS = 64
MAX_NEW = 64  # the server's cap on max_new_tokens: keeps valid text requests short
REQUEST_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 40.0  # longer than any request may take: a call that reaches it is a hang

CLIENT_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
SERVER = {
    "models_dir": "models",
    "max_new_tokens": MAX_NEW,
    "request_timeout_s": REQUEST_TIMEOUT_S,
    "stream_credits": CREDITS,
    "max_message_mb": MESSAGE_MB,
    "batch_size": 64,
}
LOAD = frozenset({SC.DEADLINE_EXCEEDED, SC.RESOURCE_EXHAUSTED})  # time or room ran out: any admitted request
IMAGE_SEED_LIMIT = 2**63  # ImageParams.seed is a uint64 on the wire; image seeds stop at 2**63 - 1


@dataclass(frozen=True)
class Catalog:
    """What ListModels says is served: the oracle's only knowledge of the server."""

    entries: dict[tuple[str, int], pb.ModelInfo]
    latest: dict[str, pb.ModelInfo]

    def lookup(self, name: str, version: int) -> pb.ModelInfo | None:
        return self.latest.get(name) if version == 0 else self.entries.get((name, version))


@dataclass
class Harness:
    server: ServerThread
    channel: grpc.Channel
    stub: pb_grpc.GeneratorStub
    catalog: Catalog
    pool: ThreadPoolExecutor
    baseline: pb.ListModelsResponse


def inflight(h: Harness) -> int:
    assert h.server.server is not None
    return len(h.server.server.pipeline.inflight)


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


BAD_CODES = ("UNKNOWN", "INTERNAL", "UNAVAILABLE")


def bad_outcomes(h: Harness) -> dict[tuple[str, str, str], float]:
    """Finished requests counted by the server with a code no bad input should cause, and stage restarts."""
    assert h.server.server is not None
    out = {}
    for family in h.server.server.metrics.registry.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total") or not sample.value:
                continue
            if family.name == "genserve_stage_restarts":
                out[("restart", sample.labels["stage"], "")] = sample.value
            elif family.name == "genserve_requests" and sample.labels["code"] in BAD_CODES:
                out[(sample.labels["model"], sample.labels["rpc"], sample.labels["code"])] = sample.value
    return out


def assert_still_serving(h: Harness, bad_before: dict[tuple[str, str, str], float] | None = None) -> None:
    """A plain request of each kind succeeds, nothing is left in flight, the server is healthy, and
    (since ``bad_before``) no request ended UNKNOWN, INTERNAL or UNAVAILABLE and no stage restarted."""
    image = list(h.stub.Generate(pb.GenerateRequest(model="vae", image=pb.ImageParams(n=2, seed=1)), timeout=30))
    assert image[-1].finish.code == 0 and image[-1].finish.n_generated == 2
    text = list(h.stub.Generate(pb.GenerateRequest(model="transformer", text=pb.TextParams(prompt="ROMEO:", max_new_tokens=4)), timeout=30))
    assert text[-1].finish.code == 0 and text[-1].finish.n_generated == 4
    assert wait_until(lambda: inflight(h) == 0), f"{inflight(h)} requests still in flight"
    health = health_pb2_grpc.HealthStub(h.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    if bad_before is not None:
        assert bad_outcomes(h) == bad_before


@dataclass(frozen=True)
class Expect:
    refusals: frozenset[grpc.StatusCode]  # faults found at admission: the call ends at once with one of these
    later: frozenset[grpc.StatusCode]  # faults found after admission

    def codes(self, *, admitted_extra: frozenset[grpc.StatusCode] = frozenset()) -> frozenset[grpc.StatusCode]:
        if self.refusals:
            return self.refusals
        return (self.later or frozenset({SC.OK})) | LOAD | admitted_extra


def expect(r: pb.GenerateRequest, catalog: Catalog) -> Expect:
    refusals: set[grpc.StatusCode] = set()
    later: set[grpc.StatusCode] = set()
    which = r.WhichOneof("params")
    if which is None:
        refusals.add(SC.INVALID_ARGUMENT)
    info = catalog.lookup(r.model, r.version)
    if info is None:
        refusals.add(SC.NOT_FOUND)
    elif which == "image":
        if not info.HasField("image"):
            refusals.add(SC.INVALID_ARGUMENT)
        else:
            _image_faults(r.image, info.image, refusals, later)
    elif which == "text":
        if not info.HasField("text"):
            refusals.add(SC.INVALID_ARGUMENT)
        else:
            _text_faults(r.text, info.text, refusals, later)
    return Expect(frozenset(refusals), frozenset(later))


def _image_faults(p: pb.ImageParams, accepts: pb.ImageAccepts, refusals: set[grpc.StatusCode], later: set[grpc.StatusCode]) -> None:
    bad = SC.INVALID_ARGUMENT
    if not 1 <= p.n <= accepts.max_n or len(p.labels) > p.n:
        refusals.add(bad)
    labels = list(p.labels)
    if labels and (
        not accepts.conditional
        or len(labels) not in (1, p.n)
        or not all(accepts.label_min <= label <= accepts.label_max for label in labels)
    ):
        later.add(bad)
    if p.HasField("seed") and p.seed >= IMAGE_SEED_LIMIT:
        later.add(bad)


def max_new_tokens(t: pb.TextParams, cap: int) -> int:
    return t.max_new_tokens if t.HasField("max_new_tokens") else min(256, cap)


def _text_faults(t: pb.TextParams, accepts: pb.TextAccepts, refusals: set[grpc.StatusCode], later: set[grpc.StatusCode]) -> None:
    bad = SC.INVALID_ARGUMENT
    temperature, top_p = t.temperature, t.top_p  # read back: the float32 the server gets
    if (
        not 1 <= max_new_tokens(t, accepts.max_new_tokens) <= accepts.max_new_tokens
        or (t.HasField("temperature") and not (math.isfinite(temperature) and temperature >= 0))
        or (t.HasField("top_p") and not 0 < top_p <= 1)  # NaN fails both
        or len(t.stop) > MAX_STOP_STRINGS
        or not all(0 < len(s) <= MAX_STOP_LENGTH for s in t.stop)
        or not t.prompt
    ):
        refusals.add(bad)
    elif not set(t.prompt) <= set(accepts.vocab):
        later.add(bad)


@dataclass
class CallResult:
    code: grpc.StatusCode
    details: str
    messages: list[pb.GenerateResponse]
    seconds: float


def call_generate(stub: pb_grpc.GeneratorStub, request: pb.GenerateRequest) -> CallResult:
    messages: list[pb.GenerateResponse] = []
    started = time.monotonic()
    try:
        for message in stub.Generate(request, timeout=CALL_TIMEOUT_S):
            messages.append(message)
    except grpc.RpcError as e:
        return CallResult(e.code(), e.details() or "", messages, time.monotonic() - started)
    return CallResult(SC.OK, "", messages, time.monotonic() - started)


def check_result(r: pb.GenerateRequest, catalog: Catalog, finish: pb.Finish, chunks: Sequence[pb.GenerateResponse]) -> None:
    """A successful request's chunks and Finish are what it asked for."""
    info = catalog.lookup(r.model, r.version)
    assert info is not None
    assert (finish.code, finish.model, finish.version) == (0, r.model, info.version)
    if r.HasField("image"):
        p, size = r.image, info.image.image_size
        assert finish.reason == pb.FINISH_REASON_COMPLETE and finish.n_generated == p.n
        if p.HasField("seed"):
            assert finish.seed == p.seed
        images = sorted((m.images for m in chunks), key=lambda c: c.offset)
        assert all(m.HasField("images") for m in chunks)
        assert [c.offset for c in images] == [sum(c.count for c in images[:i]) for i in range(len(images))]
        assert sum(c.count for c in images) == p.n
        for c in images:
            assert (c.height, c.width, len(c.pixels)) == (size, size, c.count * size * size)
            assert len(c.floats) == (4 * c.count * size * size if p.want_float else 0)
            if p.labels:
                want = list(p.labels) * p.n if len(p.labels) == 1 else list(p.labels)
                assert list(c.labels) == want[c.offset : c.offset + c.count]
    else:
        t = r.text
        limit = max_new_tokens(t, info.text.max_new_tokens)
        assert all(m.HasField("text") for m in chunks)
        text = "".join(m.text.text for m in chunks)
        assert set(text) <= set(info.text.vocab)
        if t.HasField("seed"):
            assert finish.seed == t.seed
        assert not any(s in text for s in t.stop), (text, list(t.stop))
        if finish.reason == pb.FINISH_REASON_LENGTH:
            assert finish.n_generated == limit and len(text) == limit
        else:
            assert finish.reason == pb.FINISH_REASON_STOP and t.stop and finish.n_generated <= limit


def check_call(r: pb.GenerateRequest, catalog: Catalog, result: CallResult) -> None:
    where = f"{summary(r)} -> {result.code.name} {result.details[:200]!r}"
    assert result.seconds < CALL_TIMEOUT_S - 1, f"the server did not answer: {where}"
    allowed = frozenset({SC.RESOURCE_EXHAUSTED}) if r.ByteSize() > LIMIT else expect(r, catalog).codes()
    assert result.code in allowed, f"{where}; allowed: {sorted(c.name for c in allowed)}"
    if result.code != SC.OK:
        assert result.details, f"a refusal must say why: {where}"
        assert not any(m.HasField("finish") for m in result.messages), where
        return
    assert result.messages and result.messages[-1].HasField("finish"), where
    check_result(r, catalog, result.messages[-1].finish, result.messages[:-1])


def summary(r: pb.GenerateRequest) -> str:
    """A request, with its long fields cut short."""
    brief = pb.GenerateRequest()
    brief.CopyFrom(r)
    if len(brief.id) > 20:
        brief.id = f"<{len(r.id)} chars>"
    if len(brief.model) > 40:
        brief.model = f"<{len(r.model)} chars>"
    if brief.HasField("text") and len(brief.text.prompt) > 40:
        brief.text.prompt = f"<{len(r.text.prompt)} chars of {r.text.prompt[0]!r}>"
    if brief.HasField("image") and len(brief.image.labels) > 8:
        del brief.image.labels[8:]
    return str(brief).replace("\n", " ")[:400]


@dataclass
class Batch:
    """One StreamRequest of a plan."""

    requests: list[pb.GenerateRequest]
    drawn: int  # requests drawn by hypothesis; the rest are valid VAE requests that use up the credit
    cancel: list[int]  # picks among the requests sent before (modulo their number), to cancel
    settle: bool  # wait for every request sent before to finish, so the credit has come back


@dataclass
class Sent:
    request: pb.GenerateRequest
    within_credit: bool  # the client knew it had credit for this one
    duplicate: bool  # an earlier request on the stream had the same id
    cancelled_later: bool = False  # a later message cancels its id


class StreamRun:
    """One GenerateStream following a plan; the client side keeps a conservative count of its credit."""

    def __init__(self, plan: list[Batch]) -> None:
        self.plan = plan
        self.cond = threading.Condition()
        self.first: pb.StreamResponse | None = None
        self.granted = 0  # credits received, the first grant included
        self.sent: list[Sent] = []
        self.results: list[pb.GenerateResponse] = []
        self.finishes = 0
        self.no_credit = 0  # finishes that are refusals for want of credit (they return none)
        self.status = SC.OK
        self.details = ""
        self.sizes: list[int] = []

    @staticmethod
    def is_no_credit(f: pb.Finish) -> bool:
        """A refusal for want of credit (the only RESOURCE_EXHAUSTED that used none); told by its message."""
        return f.code == SC.RESOURCE_EXHAUSTED.value[0] and "credit" in f.message

    def outgoing(self) -> Iterator[pb.StreamRequest]:
        with self.cond:
            if not self.cond.wait_for(lambda: self.first is not None, timeout=10):
                return
        for batch in self.plan:
            with self.cond:
                if batch.settle:
                    self.cond.wait_for(lambda: self.finishes >= len(self.sent), timeout=10)
                # what the server holds is at least: granted - (sent - refused for want of credit)
                known = self.granted - (len(self.sent) - self.no_credit)
                cancel = [self.sent[i % len(self.sent)].request.id for i in batch.cancel] if self.sent else []
                for s in self.sent:
                    if s.request.id in cancel:
                        s.cancelled_later = True
                seen = {s.request.id for s in self.sent}
                for k, r in enumerate(batch.requests):
                    self.sent.append(Sent(r, within_credit=k < known, duplicate=r.id in seen))
                    seen.add(r.id)
            yield pb.StreamRequest(requests=batch.requests, cancel=cancel)

    def run(self, stub: pb_grpc.GeneratorStub) -> StreamRun:
        try:
            for message in stub.GenerateStream(self.outgoing(), timeout=CALL_TIMEOUT_S):
                with self.cond:
                    self.sizes.append(message.ByteSize())
                    if self.first is None:
                        self.first = message
                    self.granted += message.credits
                    for result in message.results:
                        self.results.append(result)
                        if result.HasField("finish"):
                            self.finishes += 1
                            self.no_credit += self.is_no_credit(result.finish)
                    self.cond.notify_all()
        except grpc.RpcError as e:
            self.status, self.details = e.code(), e.details() or ""
        return self

    def codes(self, s: Sent, catalog: Catalog) -> frozenset[grpc.StatusCode]:
        r = s.request
        e = expect(r, catalog)
        id_ok = 0 < len(r.id) <= MAX_ID_LENGTH
        refusals = e.refusals if id_ok else e.refusals | {SC.INVALID_ARGUMENT}
        codes = set(Expect(refusals, e.later).codes(admitted_extra=frozenset({SC.CANCELLED} if s.cancelled_later else ())))
        if s.duplicate and id_ok:
            codes.add(SC.ALREADY_EXISTS)
        if not s.within_credit:
            codes.add(SC.RESOURCE_EXHAUSTED)
        return frozenset(codes)

    def check(self, catalog: Catalog) -> None:
        assert self.status == SC.OK, f"the stream itself failed: {self.status.name} {self.details!r}"
        assert self.first is not None and self.first.credits == CREDITS and not self.first.results
        assert all(size <= LIMIT for size in self.sizes)
        groups: defaultdict[str, list[Sent]] = defaultdict(list)
        for s in self.sent:
            groups[s.request.id[:MAX_ID_LENGTH]].append(s)
        finishes: defaultdict[str, list[pb.Finish]] = defaultdict(list)
        chunks: defaultdict[str, list[pb.GenerateResponse]] = defaultdict(list)
        for result in self.results:
            assert result.id in groups, f"a result for an id never sent: {result.id!r}"
            if result.HasField("finish"):
                finishes[result.id].append(result.finish)
            else:
                assert not finishes[result.id] or len(groups[result.id]) > 1, f"a chunk after the Finish of {result.id!r}"
                chunks[result.id].append(result)
        for key, group in groups.items():
            got = finishes[key]
            assert len(got) == len(group), f"id {key[:40]!r}: {len(group)} requests sent, {len(got)} Finish messages"
            allowed = [self.codes(s, catalog) for s in group]
            codes = [CODES[f.code] for f in got]
            where = f"id {key[:40]!r}: got {[c.name for c in codes]} for {[summary(s.request) for s in group]}"
            assert matchable(codes, allowed), f"{where}; allowed: {[sorted(c.name for c in a) for a in allowed]}"
            for f in got:
                assert (f.code == 0) == (f.reason != pb.FINISH_REASON_ERROR), where
                assert f.code == 0 or f.message, f"a refusal must say why: {where}"
            if len(group) == 1:
                s, f = group[0], got[0]
                if self.is_no_credit(f):
                    assert not s.within_credit, f"refused for want of credit although the client had some: {where}"
                if f.code == 0:
                    check_result(s.request, catalog, f, chunks[key])
        # every Finish gives its credit back, but a refusal for want of credit (which used none); while the
        # server sheds (server/pipeline/admission.py) it gives back fewer, so never more than that
        assert self.granted - CREDITS <= self.finishes - self.no_credit


def matchable(codes: list[grpc.StatusCode], allowed: list[frozenset[grpc.StatusCode]]) -> bool:
    """Whether each code can be given to a different request that allows it (a bipartite matching)."""
    owner: dict[int, int] = {}  # request -> code

    def place(i: int, seen: set[int]) -> bool:
        for j, codes_j in enumerate(allowed):
            if codes[i] in codes_j and j not in seen:
                seen.add(j)
                if j not in owner or place(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return len(codes) == len(allowed) and all(place(i, set()) for i in range(len(codes)))


def raw_methods(channel: grpc.Channel) -> dict[str, Callable[[bytes], Any]]:
    """Each RPC called with raw bytes as its request (no client-side serialisation)."""
    list_models = channel.unary_unary("/genserve.v1.Generator/ListModels", request_serializer=None, response_deserializer=None)
    generate = channel.unary_stream("/genserve.v1.Generator/Generate", request_serializer=None, response_deserializer=None)
    stream = channel.stream_stream("/genserve.v1.Generator/GenerateStream", request_serializer=None, response_deserializer=None)
    return {
        "ListModels": lambda raw: list_models(raw, timeout=CALL_TIMEOUT_S),
        "Generate": lambda raw: list(generate(raw, timeout=CALL_TIMEOUT_S)),
        "GenerateStream": lambda raw: list(stream(iter([raw]), timeout=CALL_TIMEOUT_S)),
    }
