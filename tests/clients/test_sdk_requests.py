"""The SDK's requests (clients/_protocol.py), built without a network: labels, every value a request
can carry (and the ones it cannot, refused by name), text options, and the assembly of answers."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import pytest

from clients import (
    InvalidRequest,
    ServerError,
)
from clients._protocol import ImageAssembler, TextAssembler, image_request, parse_labels, text_request
from clients.cli import build_parser
from genserve.v1 import generator_pb2 as pb

pytestmark = pytest.mark.timeout(60)  # the async tests carry their own asyncio mark


def test_image_request_takes_one_label_or_one_per_sample() -> None:
    assert list(image_request("gan", 3, labels=7).image.labels) == [7]
    assert list(image_request("gan", 3, labels=[1, 2, 3]).image.labels) == [1, 2, 3]
    request = image_request("vae", 3)
    assert not request.image.labels and not request.image.HasField("seed") and request.version == 0
    assert request.image.HasField("seed") is False
    assert image_request("vae", 3, seed=0).image.HasField("seed")  # seed 0 is a seed, not "unset"


def test_fewer_labels_than_samples_are_cycled() -> None:
    assert list(image_request("gan", 40, labels=range(10)).image.labels) == list(range(10)) * 4  # 0-9 four times
    assert list(image_request("gan", 5, labels=[1, 2]).image.labels) == [1, 2, 1, 2, 1]
    assert list(image_request("gan", 40, labels="0-9").image.labels) == list(range(10)) * 4
    assert list(image_request("gan", 3, labels=np.arange(3)).image.labels) == [0, 1, 2]  # type: ignore[arg-type]  # numpy labels too
    assert list(image_request("gan", 3, labels=np.int64(7)).image.labels) == [7]  # type: ignore[arg-type]


def test_more_labels_than_samples_are_refused_before_sending() -> None:
    message = "labels has 10 entries, more than the 4 samples; give at most 4 labels (fewer are cycled)"
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        image_request("gan", 4, labels="0-9")
    with pytest.raises(InvalidRequest, match=r"^labels has 3 entries, more than the 2 samples"):
        image_request("gan", 2, labels=[1, 2, 3])


LABELS = "labels must be integers in the model's range (see its label_min and label_max), got"
TEMPERATURE = "temperature must be a finite number >= 0 (0 means greedy), got"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: image_request("vae", 4, seed=-1), "seed must be an integer from 0 to 2**63-1, got -1"),  # the server's range
        (lambda: image_request("vae", 4, seed=2**63), "seed must be an integer from 0 to 2**63-1, got 9223372036854775808"),
        (lambda: image_request("vae", 4, seed=1.5), "seed must be an integer from 0 to 2**63-1, got 1.5"),  # type: ignore[arg-type]
        (lambda: image_request("vae", -1), "n must be an integer from 1 to the model's max_n, got -1"),
        (lambda: image_request("vae", 2**32), "n must be an integer from 1 to the model's max_n, got 4294967296"),
        (lambda: image_request("vae", True), "n must be an integer from 1 to the model's max_n, got True"),
        (lambda: image_request("gan", 2, version=-1), "version must be an integer from 0 to 2**32-1 (0: the latest), got -1"),
        (lambda: image_request("gan", 2, labels=2**31), f"{LABELS} 2147483648"),
        (lambda: image_request("gan", 2, labels=[1, -(2**31) - 1]), f"{LABELS} -2147483649 at index 1"),
        (lambda: image_request("gan", 2, labels=[1, True]), f"{LABELS} True at index 1"),
        (lambda: image_request("gan", 2, labels="x"), "labels 'x': 'x' is not a label or a range like 0-9"),
        (lambda: text_request("t", "a", seed=-1), "seed must be an integer from 0 to 2**64-1, got -1"),
        (lambda: text_request("t", "a", seed=2**64), "seed must be an integer from 0 to 2**64-1, got 18446744073709551616"),
        (lambda: text_request("t", "a", top_k=-1), "top_k must be an integer from 0 to 2**32-1 (0 turns it off), got -1"),
        (lambda: text_request("t", "a", top_k=2**32), "top_k must be an integer from 0 to 2**32-1 (0 turns it off), got 4294967296"),
        (
            lambda: text_request("t", "a", max_new_tokens=-1),
            "max_new_tokens must be an integer from 1 to the server's max_new_tokens, got -1",
        ),
        (lambda: text_request("t", "a", version=2**32), "version must be an integer from 0 to 2**32-1 (0: the latest), got 4294967296"),
        (lambda: text_request("t", "a", temperature=math.nan), f"{TEMPERATURE} nan"),  # the server's words
        (lambda: text_request("t", "a", temperature=math.inf), f"{TEMPERATURE} inf"),
        (lambda: text_request("t", "a", temperature=-0.5), f"{TEMPERATURE} -0.5"),
        (lambda: text_request("t", "a", temperature=1e39), f"{TEMPERATURE} 1e+39 (infinite as the float32 a request carries)"),
        (lambda: text_request("t", "a", temperature="1"), f"{TEMPERATURE} '1'"),  # type: ignore[arg-type]
        (lambda: text_request("t", "a", top_p=math.nan), "top_p must be in (0, 1] (1 turns it off), got nan"),
        (lambda: text_request("t", "a", top_p=-math.inf), "top_p must be in (0, 1] (1 turns it off), got -inf"),
        (lambda: text_request("t", "a", top_p=0), "top_p must be in (0, 1] (1 turns it off), got 0"),
    ],
)
def test_a_value_no_request_can_carry_is_refused_naming_its_field_and_range(build: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=f"^{re.escape(message)}$"):  # not protobuf's "ValueError: Value out of range"
        build()


def test_values_at_the_ends_of_their_ranges_are_sent() -> None:
    r = image_request("gan", 2, seed=2**63 - 1, labels=[-(2**31), 2**31 - 1], version=2**32 - 1)
    assert (r.image.seed, list(r.image.labels), r.version) == (2**63 - 1, [-(2**31), 2**31 - 1], 2**32 - 1)  # the server judges labels
    assert image_request("vae", np.int64(3), seed=np.uint64(0)).image.n == 3  # type: ignore[arg-type]
    assert image_request("vae", 0, labels=[1, 2]).image.n == 0  # the server's to refuse, with its max_n
    t = text_request("t", "a", seed=2**64 - 1, top_k=2**32 - 1, max_new_tokens=0, temperature=0, top_p=1).text
    assert (t.seed, t.top_k, t.max_new_tokens, t.temperature, t.top_p) == (2**64 - 1, 2**32 - 1, 0, 0.0, 1.0)
    assert t.HasField("max_new_tokens") and t.HasField("temperature")


def test_label_specs() -> None:
    assert parse_labels("0-9") == list(range(10))
    assert parse_labels("7") == [7] and parse_labels("1,3,5") == [1, 3, 5] and parse_labels("0-2, 9") == [0, 1, 2, 9]
    for bad, reason in [("a", "'a' is not a label or a range like 0-9"), ("9-0", "the range '9-0' runs backwards"), ("1,", "'' is not")]:
        with pytest.raises(ValueError, match=re.escape(reason)):
            parse_labels(bad)
    parser = build_parser()
    args = parser.parse_args(["images", "gan", "--labels", "0-4", "--label", "9", "--labels", "1,2"])
    assert args.labels == [0, 1, 2, 3, 4, 9, 1, 2]


def test_text_request_leaves_unset_options_to_the_server() -> None:
    t = text_request("transformer", "ROMEO:", stop="\n\n").text
    assert list(t.stop) == ["\n\n"]
    assert not any(t.HasField(f) for f in ("max_new_tokens", "temperature", "top_k", "top_p", "seed"))
    t = text_request("transformer", "ROMEO:", temperature=0.0, max_new_tokens=5, stop=["a", "b"]).text
    assert t.HasField("temperature") and t.temperature == 0.0 and t.max_new_tokens == 5 and list(t.stop) == ["a", "b"]


def test_every_text_option_reaches_the_request() -> None:
    r = text_request("transformer", "ROMEO:", max_new_tokens=5, temperature=0.5, top_k=3, top_p=0.9, seed=4, stop="x", version=2)
    t = r.text
    assert (t.max_new_tokens, t.temperature, t.top_k, t.seed, list(t.stop), r.version) == (5, 0.5, 3, 4, ["x"], 2)
    assert t.top_p == pytest.approx(0.9)  # a float32 field


def test_a_misspelt_option_is_refused_by_name() -> None:
    # the methods take their options as **options (one keyword set for the async and sync SDK), so
    # Python itself no longer refuses an unknown keyword: the request builder does
    with pytest.raises(TypeError, match=r"^unexpected option\(s\) for a text request: max_tokens; known: max_new_tokens, "):
        text_request("transformer", "ROMEO:", max_tokens=5)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"^unexpected option\(s\) for an image request: label; "):
        image_request("gan", 2, label=3)  # type: ignore[call-arg]


def _chunk(offset: int, count: int, value: int, *, floats: bool = False) -> pb.Images:
    pixels = np.full((count, 2, 3), value, np.uint8)
    f = (pixels.astype("<f4") / 255).tobytes() if floats else b""
    return pb.Images(offset=offset, count=count, height=2, width=3, pixels=pixels.tobytes(), floats=f, labels=[value] * count)


def test_image_assembler_places_chunks_by_offset() -> None:
    a = ImageAssembler(5)
    assert a.add(_chunk(3, 2, 30, floats=True)) == 2
    assert a.add(_chunk(0, 3, 10, floats=True)) == 3
    result = a.result(pb.Finish(seed=4, model="m", version=2), "r")
    assert result.images.shape == (5, 2, 3) and result.images.dtype == np.uint8
    assert result.images[:, 0, 0].tolist() == [10, 10, 10, 30, 30]
    assert result.labels == (10, 10, 10, 30, 30)
    assert (result.seed, result.model, result.version, result.id) == (4, "m", 2, "r")
    assert result.floats is not None and result.floats[4, 1, 2] == pytest.approx(30 / 255)


def test_image_assembler_refuses_malformed_or_missing_chunks() -> None:
    a = ImageAssembler(2)
    with pytest.raises(ServerError, match="malformed image chunk"):
        a.add(_chunk(1, 2, 0))
    a.add(_chunk(0, 1, 0))
    with pytest.raises(ServerError, match="after 1 of 2 samples"):
        a.result(pb.Finish())


def test_text_assembler_joins_pieces() -> None:
    a = TextAssembler()
    for piece in ("RO", "ME", "O"):
        a.add(pb.Text(text=piece))
    result = a.result(pb.Finish(reason=pb.FINISH_REASON_STOP, n_generated=3))
    assert (result.text, result.finish_reason, result.n_generated) == ("ROMEO", "stop", 3)
