"""Bad input over a real server (issue 6): property-based storms on every RPC, oversized messages,
malformed bytes, and the limits on every size a client controls.

One server serves the bundled models for the whole module. Hypothesis draws requests across the
field space: served and unknown models, names that look like paths, versions, ids (empty, overlong,
duplicated), image params (n from 0 to 2**32-1, seeds past 2**63, labels out of range or too many)
and text params (empty, huge and out-of-vocabulary prompts, NaN, infinite or negative temperatures,
top_p outside (0, 1], max_new_tokens 0 or huge, bad stop strings), and params missing.

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
UNKNOWN and INTERNAL are never allowed. After each storm the server still serves, with nothing in
flight, no stage restarted, and no request counted with UNKNOWN, INTERNAL or UNAVAILABLE.

Each storm asserts that it sent at least 1,000 drawn requests; the last test prints the counts and
the statuses they got (``pytest -s``). The hypothesis example database is off (``database=None``):
runs do not depend on earlier ones (hypothesis still keeps a self-ignored ``.hypothesis/`` cache).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.sampling import MAX_STOP_LENGTH, MAX_STOP_STRINGS
from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.pipeline.requests import MAX_ID_LENGTH
from tests.serving import ServerThread

pytestmark = [pytest.mark.timeout(300)]

SC = grpc.StatusCode
CODES = {code.value[0]: code for code in grpc.StatusCode}

MESSAGE_MB = 5  # the largest message either side accepts here
LIMIT = MESSAGE_MB << 20
CREDITS = 64
MAX_NEW = 64  # the server's cap on max_new_tokens: keeps valid text requests short
REQUEST_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 40.0  # longer than any request may take: a call that reaches it is a hang
MIN_REQUESTS = 1000  # drawn requests per RPC (the floor)
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
STORM = settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
SENT: Counter[str] = Counter()  # drawn requests per RPC, for the report at the end
OUTCOMES: Counter[tuple[str, str]] = Counter()  # (rpc, code) of the storms' requests, for the report

# -- the server, the client, the catalog --------------------------------------------------------


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


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    with ServerThread(**SERVER) as server, grpc.insecure_channel(server.address, options=CLIENT_OPTIONS) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
        entries = {(m.name, m.version): m for m in listed.models}
        latest = {m.name: m for m in listed.models if m.latest}
        assert set(latest) == {"vae", "gan", "transformer"}
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="bad-input-client") as pool:
            yield Harness(server, channel, stub, Catalog(entries, latest), pool, listed)


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


# -- the oracle -----------------------------------------------------------------------------------


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


# -- strategies ----------------------------------------------------------------------------------
# Built once at import: hypothesis validates a strategy the first time it is drawn from, and a
# strategy built inside a composite would be validated again at every draw.

SERVED = ("vae", "gan", "transformer")
ODD_NAMES = (
    "",
    "VAE",
    "vae ",
    " vae",
    "vae\x00",
    "vae\n",
    "../models/vae",
    "models/vae",
    "./vae",
    "vae/../gan",
    "..",
    ".",
    "/",
    "/etc/passwd",
    "..\\models\\vae",
    "%2e%2e%2fvae",
    "vae.safetensors",
    "vae@1",
    "eval/mnist_classifier",
    "mnist_classifier",
    "ｖａｅ",  # fullwidth
    "vae\u200b",  # zero-width space
    "v" * 64,
    "v" * 10_000,
)
PROMPT_CHARS = "ROMEO: \nabcdefghijklmnopqrstuvwxyz,.;!?'-&$3"
OUTSIDE_CHARS = "é\t\x00#@~😀ſ\u202e"
# characters: past the context window; a million costs the server a 1M-character encode; past the message limit
HUGE = (129, 10_000, 1_000_000, LIMIT + 1)
STREAM_HUGE = (129, 10_000)  # a StreamRequest carries many requests: it must stay under the message limit
UINT32 = 2**32 - 1
UINT64 = 2**64 - 1


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


def repeated(chars: str, lengths: Sequence[int] | st.SearchStrategy[int]) -> st.SearchStrategy[str]:
    """Long strings, cheaply: one character repeated (drawing each character would cost a draw each)."""
    counts = lengths if isinstance(lengths, st.SearchStrategy) else st.sampled_from(lengths)
    return st.builds(lambda ch, k: ch * k, st.sampled_from(chars), counts)


NAMES = st.one_of(st.sampled_from(SERVED), st.sampled_from(ODD_NAMES), st.text(max_size=12))
FITTING_NAMES = {
    which: st.one_of(st.sampled_from(fitting), st.sampled_from(fitting), NAMES)
    for which, fitting in {"image": ("vae", "gan"), "text": ("transformer",), None: SERVED}.items()
}
PARAMS = st.sampled_from(["image", "image", "text", "text", None])
VERSIONS = st.one_of(st.just(0), st.just(0), st.sampled_from([1, 2, UINT32]), st.integers(0, UINT32))
TIMEOUTS = st.one_of(st.just(0), st.just(0), st.just(0), st.sampled_from([1, 2, 50, UINT32]), st.integers(0, UINT32))
IDS = st.one_of(
    st.just(""), st.text(max_size=10), repeated("i€", st.integers(MAX_ID_LENGTH - 2, MAX_ID_LENGTH + 2)), repeated("i€", [100_000])
)
BOOLS = st.booleans()

N_VALUES = st.one_of(st.integers(1, 4), st.integers(1, 4), st.sampled_from([0, 1024, 1025, 2**31, UINT32]), st.integers(0, UINT32))
IMAGE_SEEDS = optional(st.one_of(st.sampled_from([0, IMAGE_SEED_LIMIT - 1, IMAGE_SEED_LIMIT, UINT64]), st.integers(0, UINT64)))
LABELS = st.one_of(
    st.just([]),
    st.just([]),
    st.lists(st.integers(-2, 11), max_size=5),
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=3),
    st.builds(lambda v, k: [v] * k, st.integers(0, 9), st.sampled_from([1024, 1025, 100_000])),
)


def prompts(huge: Sequence[int]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(""),
        st.text(PROMPT_CHARS, min_size=1, max_size=40),
        st.text(PROMPT_CHARS, min_size=1, max_size=40),
        st.text(PROMPT_CHARS + OUTSIDE_CHARS, min_size=1, max_size=20),
        st.text(max_size=20),
        repeated(PROMPT_CHARS + OUTSIDE_CHARS, huge),
    )


PROMPTS = {HUGE: prompts(HUGE), STREAM_HUGE: prompts(STREAM_HUGE)}
MAX_NEWS = optional(st.one_of(st.integers(1, 8), st.integers(1, 8), st.sampled_from([0, MAX_NEW, MAX_NEW + 1, 4097, UINT32])))
TEMPERATURES = optional(
    st.one_of(
        st.sampled_from([0.0, -0.0, 0.7, 1.0, 2.0, math.nan, math.inf, -math.inf, -1.0, 3.4e38, -1e-45]),
        st.floats(width=32),
    )
)
TOP_KS = optional(st.one_of(st.sampled_from([0, 1, 2, 64, 65, 66, UINT32]), st.integers(0, UINT32)))
TOP_PS = optional(
    st.one_of(st.sampled_from([0.0, -0.0, 1e-45, 0.5, 0.9, 1.0, 1.0000001, 2.0, math.nan, math.inf, -1.0]), st.floats(width=32))
)
TEXT_SEEDS = optional(st.integers(0, UINT64))
_STOP = st.one_of(st.just(""), st.text(PROMPT_CHARS, min_size=1, max_size=3), st.text(max_size=3), repeated("ab", st.integers(60, 70)))
STOPS: st.SearchStrategy[list[str]] = st.one_of(
    st.just([]), st.just([]), st.lists(_STOP, max_size=4), st.lists(_STOP, min_size=15, max_size=18)
)


@st.composite
def image_params(draw: st.DrawFn) -> pb.ImageParams:
    p = pb.ImageParams(n=draw(N_VALUES), want_float=draw(BOOLS), labels=draw(LABELS))
    if (seed := draw(IMAGE_SEEDS)) is not None:
        p.seed = seed
    return p


@st.composite
def text_params(draw: st.DrawFn, huge: tuple[int, ...]) -> pb.TextParams:
    t = pb.TextParams(prompt=draw(PROMPTS[huge]), stop=draw(STOPS))
    for name, strategy in (
        ("max_new_tokens", MAX_NEWS),
        ("temperature", TEMPERATURES),
        ("top_k", TOP_KS),
        ("top_p", TOP_PS),
        ("seed", TEXT_SEEDS),
    ):
        if (value := draw(strategy)) is not None:
            setattr(t, name, value)
    return t


IMAGE_PARAMS = image_params()
TEXT_PARAMS = {huge: text_params(huge) for huge in PROMPTS}


@st.composite
def generate_requests(draw: st.DrawFn, huge: tuple[int, ...] = HUGE) -> pb.GenerateRequest:
    which = draw(PARAMS)
    r = pb.GenerateRequest(model=draw(FITTING_NAMES[which]), version=draw(VERSIONS), timeout_ms=draw(TIMEOUTS), id=draw(IDS))
    if which == "image":
        r.image.CopyFrom(draw(IMAGE_PARAMS))
    elif which == "text":
        r.text.CopyFrom(draw(TEXT_PARAMS[huge]))
    return r


GENERATE_REQUESTS = generate_requests()
STREAM_REQUESTS = generate_requests(STREAM_HUGE)


# -- Generate ------------------------------------------------------------------------------------


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


def test_generate_storm(harness: Harness) -> None:
    h = harness
    bad = bad_outcomes(h)
    drawn: list[int] = []

    @STORM
    @given(st.lists(GENERATE_REQUESTS, min_size=10, max_size=16))
    def storm(requests: list[pb.GenerateRequest]) -> None:
        results = list(h.pool.map(lambda r: call_generate(h.stub, r), requests))
        for r, result in zip(requests, results, strict=True):
            check_call(r, h.catalog, result)
            OUTCOMES["Generate", result.code.name] += 1
        drawn.append(len(requests))

    storm()
    SENT["Generate"] += sum(drawn)
    assert sum(drawn) >= MIN_REQUESTS
    assert_still_serving(h, bad)


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


# -- GenerateStream --------------------------------------------------------------------------------


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


ID_KINDS = st.sampled_from(["fresh", "fresh", "fresh", "fresh", "empty", "dup", "text", "long", "128"])
PICKS = st.integers(0, 10_000)
SHORT_IDS = st.text(max_size=6)
LONG_IDS = st.one_of(st.text(min_size=MAX_ID_LENGTH + 1, max_size=MAX_ID_LENGTH + 3), repeated("l€", st.integers(MAX_ID_LENGTH + 1, 1000)))
FLOOD_SIZES = st.sampled_from([0, 0, 0, CREDITS // 2, CREDITS + 16])
BATCH_REQUESTS = st.lists(STREAM_REQUESTS, max_size=12)
CANCEL_PICKS = st.lists(PICKS, max_size=3)
BATCHES = st.integers(1, 3)


@st.composite
def stream_plans(draw: st.DrawFn) -> list[Batch]:
    ids: list[str] = []
    plan = []
    for b in range(draw(BATCHES)):
        drawn = draw(BATCH_REQUESTS)
        for r in drawn:
            kind = draw(ID_KINDS)
            if kind == "dup" and ids:
                r.id = ids[draw(PICKS) % len(ids)]
            elif kind == "empty":
                r.id = ""
            elif kind == "text":
                r.id = draw(SHORT_IDS)
            elif kind == "long":
                r.id = draw(LONG_IDS)
            elif kind == "128":
                r.id = f"{len(ids)}-".ljust(MAX_ID_LENGTH, "x")
            else:
                r.id = f"r{len(ids)}"
            ids.append(r.id)
        flood = [pb.GenerateRequest(id=f"flood-{b}-{k}", model="vae", image=pb.ImageParams(n=1, seed=k)) for k in range(draw(FLOOD_SIZES))]
        requests = flood + drawn if draw(BOOLS) else drawn + flood
        plan.append(Batch(requests, len(drawn), draw(CANCEL_PICKS), draw(BOOLS)))
    return plan


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


def test_generate_stream_storm(harness: Harness) -> None:
    h = harness
    bad = bad_outcomes(h)
    drawn: list[int] = []
    violations: list[int] = []

    @STORM
    @given(st.lists(stream_plans(), min_size=2, max_size=3))
    def storm(plans: list[list[Batch]]) -> None:
        runs = list(h.pool.map(lambda plan: StreamRun(plan).run(h.stub), plans))
        for run in runs:
            run.check(h.catalog)
            OUTCOMES.update(("GenerateStream", CODES[r.finish.code].name) for r in run.results if r.HasField("finish"))
            violations.append(run.no_credit)
        drawn.append(sum(b.drawn for plan in plans for b in plan))

    storm()
    SENT["GenerateStream"] += sum(drawn)
    assert sum(drawn) >= MIN_REQUESTS
    assert sum(violations) > 0, "no request was ever sent without credit"
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


# -- oversized and malformed messages -------------------------------------------------------------


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


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


FIELD_NUMBERS = st.one_of(st.integers(1, 20), st.integers(1, 2**29 - 1).filter(lambda n: not 19000 <= n <= 19999))
WIRE_VALUES = {
    0: st.integers(0, UINT64).map(varint),  # varint
    1: st.binary(min_size=8, max_size=8),  # fixed64
    2: st.binary(max_size=64).map(lambda data: varint(len(data)) + data),  # length-delimited
    5: st.binary(min_size=4, max_size=4),  # fixed32
}
WIRE_TYPES = st.sampled_from(sorted(WIRE_VALUES))
FIELD_COUNTS = st.integers(0, 6)


@st.composite
def unknown_fields(draw: st.DrawFn) -> bytes:
    """Well-formed protobuf wire data of fields ListModelsRequest does not have (it has none)."""
    out = b""
    for _ in range(draw(FIELD_COUNTS)):
        number, wire = draw(FIELD_NUMBERS), draw(WIRE_TYPES)
        out += varint(number << 3 | wire) + draw(WIRE_VALUES[wire])
    return out


def test_list_models_storm(harness: Harness) -> None:
    """ListModels takes an empty message: whatever unknown fields come with it, the answer is the same."""
    h = harness
    bad = bad_outcomes(h)
    list_models = raw_methods(h.channel)["ListModels"]
    drawn: list[int] = []

    @STORM
    @given(st.lists(unknown_fields(), min_size=10, max_size=12))
    def storm(payloads: list[bytes]) -> None:
        for raw in h.pool.map(list_models, payloads):
            assert pb.ListModelsResponse.FromString(raw) == h.baseline
        drawn.append(len(payloads))

    storm()
    SENT["ListModels"] += sum(drawn)
    assert sum(drawn) >= MIN_REQUESTS
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


# -- bugs found by the storms, with their own tests ------------------------------------------------


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


# -- after everything ---------------------------------------------------------------------------------


def test_the_server_still_serves_after_the_storms(harness: Harness) -> None:
    assert_still_serving(harness)
    # nothing may ever end UNKNOWN or INTERNAL, and no stage may have restarted
    assert not [key for key in bad_outcomes(harness) if key[0] == "restart" or key[2] in ("UNKNOWN", "INTERNAL")]
    print(f"\ndrawn requests per RPC: {dict(SENT)}\noutcomes: {sorted(OUTCOMES.items())}")
