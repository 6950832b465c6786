"""Bad input over a real server (issue 6), drawn: property-based storms on every RPC, each request
checked against the oracle (tests/bad_input/oracle.py).

One server serves the bundled models for the whole module. Hypothesis draws requests across the
field space: served and unknown models, names that look like paths, versions, ids (empty, overlong,
duplicated), image params (n from 0 to 2**32-1, seeds past 2**63, labels out of range or too many)
and text params (empty, huge and out-of-vocabulary prompts, NaN, infinite or negative temperatures,
top_p outside (0, 1], max_new_tokens 0 or huge, bad stop strings), and params missing.

Each storm asserts that it sent at least 1,000 drawn requests; the last test prints the counts and
the statuses they got (``pytest -s``). The hypothesis example database is off (``database=None``):
runs do not depend on earlier ones (hypothesis still keeps a self-ignored ``.hypothesis/`` cache)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genserve.v1 import generator_pb2 as pb
from server.pipeline.requests import MAX_ID_LENGTH
from tests.bad_input.oracle import (
    CODES,
    CREDITS,
    IMAGE_SEED_LIMIT,
    LIMIT,
    MAX_NEW,
    Batch,
    Harness,
    StreamRun,
    assert_still_serving,
    bad_outcomes,
    call_generate,
    check_call,
    raw_methods,
)

pytestmark = [pytest.mark.timeout(300)]

MIN_REQUESTS = 1000  # drawn requests per RPC (the floor)

STORM = settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
SENT: Counter[str] = Counter()  # drawn requests per RPC, for the report at the end
OUTCOMES: Counter[tuple[str, str]] = Counter()  # (rpc, code) of the storms' requests, for the report

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


def test_the_server_still_serves_after_the_storms(harness: Harness) -> None:
    assert_still_serving(harness)
    # nothing may ever end UNKNOWN or INTERNAL, and no stage may have restarted
    assert not [key for key in bad_outcomes(harness) if key[0] == "restart" or key[2] in ("UNKNOWN", "INTERNAL")]
    print(f"\ndrawn requests per RPC: {dict(SENT)}\noutcomes: {sorted(OUTCOMES.items())}")
