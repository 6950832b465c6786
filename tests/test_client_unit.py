"""The SDK's pieces without a network: status mapping, messages, retry config, targets, grid, argument parsing."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from clients import (
    AsyncClient,
    DeadlineExceeded,
    GenserveError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    RetryPolicy,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from clients._amqp import _with_timeout
from clients._channel import resolve_targets, service_config, split_host_port, with_default_port
from clients._exceptions import from_status
from clients._protocol import ImageAssembler, TextAssembler, TextOptions, image_request, parse_labels, text_request
from clients.cli import PAD, PAD_VALUE, Received, _error_line, build_parser, image_format, image_grid, main, make_client, write_grid
from genserve.v1 import generator_pb2 as pb

pytestmark = pytest.mark.timeout(60)  # the async tests carry their own asyncio mark


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest),
        (grpc.StatusCode.OUT_OF_RANGE, InvalidRequest),
        (grpc.StatusCode.ALREADY_EXISTS, InvalidRequest),
        (grpc.StatusCode.NOT_FOUND, ModelNotFound),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Overloaded),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, Unauthenticated),
        (grpc.StatusCode.INTERNAL, ServerError),
        (grpc.StatusCode.UNIMPLEMENTED, ServerError),
        (grpc.StatusCode.CANCELLED, ServerError),
    ],
)
def test_status_codes_map_to_the_exception_tree(code: grpc.StatusCode, cls: type[GenserveError]) -> None:
    for given in (code, code.value[0]):  # a StatusCode, or the number a Finish carries
        error = from_status(given, "why")
        assert type(error) is cls
        assert isinstance(error, GenserveError)
        assert error.code is code
        assert str(error) == "why"


def test_errors_name_their_request_and_status() -> None:
    assert isinstance(ModelNotFound("x"), InvalidRequest)
    assert str(from_status(grpc.StatusCode.NOT_FOUND, "no model 'x'", request_id="7")) == "request '7': no model 'x'"
    assert str(from_status(grpc.StatusCode.UNAVAILABLE)) == "UNAVAILABLE"
    assert from_status(99).code is grpc.StatusCode.UNKNOWN
    with pytest.raises(ValueError, match="OK is not an error"):
        from_status(0)


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


def test_an_amqp_deadline_beyond_what_timeout_ms_holds_is_sent_capped() -> None:
    assert _with_timeout(pb.GenerateRequest(), 1e8).timeout_ms == 2**32 - 1  # 3 years: more milliseconds than a uint32 holds
    assert _with_timeout(pb.GenerateRequest(), 2.5).timeout_ms == 2500


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


def test_retry_policy_becomes_grpc_service_config() -> None:
    config = json.loads(service_config(RetryPolicy(max_attempts=4, initial_backoff=0.05, max_backoff=1.5)))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "genserve.v1.Generator"}]
    assert method["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.050s",
        "maxBackoff": "1.500s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    assert "methodConfig" not in json.loads(service_config(None))
    assert "methodConfig" not in json.loads(service_config(RetryPolicy(max_attempts=1)))
    assert RetryPolicy().backoff(1) == 0.1 and RetryPolicy().backoff(10) == 2.0
    with pytest.raises(ValueError, match="max_attempts must be from 1 to 5"):
        RetryPolicy(max_attempts=6)
    with pytest.raises(ValueError, match="initial_backoff <= max_backoff"):
        RetryPolicy(initial_backoff=3.0)


def test_split_host_port() -> None:
    assert split_host_port("example.com:50052") == ("example.com", 50052)
    assert split_host_port("example.com") == ("example.com", 50051)
    assert split_host_port("[::1]:7") == ("::1", 7)
    assert split_host_port("::1") == ("::1", 50051)
    for bad in ("host:port", "dns:///host:1", ":1"):
        with pytest.raises(ValueError, match="not a host:port target"):
            split_host_port(bad)
    with pytest.raises(ValueError, match="not a host:port target: 'a:b'"):
        AsyncClient(["a:b", "c:1"])


def test_a_bare_host_gets_port_50051_not_443() -> None:
    assert with_default_port("localhost") == "localhost:50051"
    assert with_default_port("::1") == "[::1]:50051" and with_default_port("[::1]") == "[::1]:50051"
    for given in ("localhost:7", "[::1]:7", "dns:///example.com", "unix:/tmp/s", "ipv4:127.0.0.1:1,127.0.0.2:2"):
        assert with_default_port(given) == given
    assert AsyncClient("localhost").targets == ("localhost:50051",)
    assert AsyncClient(["a", "b:2"]).targets == ("a:50051", "b:2")


@pytest.mark.asyncio
async def test_several_targets_become_one_round_robin_address_list() -> None:
    assert await resolve_targets(["dns:///example.com:5"]) == "dns:///example.com:5"  # one target: gRPC resolves it
    assert await resolve_targets(["127.0.0.1:1", "127.0.0.2:2", "127.0.0.1:1"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert await resolve_targets(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    assert (await resolve_targets(["localhost:3", "127.0.0.1:4"])).startswith("ipv4:127.0.0.1:3,")
    with pytest.raises(ValueError, match="several targets must each be host:port"):
        await resolve_targets(["unix:/tmp/a", "127.0.0.1:1"])


@pytest.mark.asyncio
async def test_a_closed_client_cannot_be_used_or_reopened() -> None:
    client = AsyncClient("127.0.0.1:1")
    assert repr(client) == "AsyncClient(127.0.0.1:1, unopened)"
    async with client:
        with pytest.raises(RuntimeError, match=re.escape("Cannot open a client instance more than once.")):
            await client.__aenter__()
    await client.aclose()  # twice is fine
    with pytest.raises(RuntimeError, match=re.escape("Cannot reopen a client instance, once it has been closed.")):
        await client.__aenter__()
    with pytest.raises(RuntimeError, match=re.escape("Cannot send a request, as the client has been closed.")):
        await client.list_models()
    with pytest.raises(ValueError, match="timeout must be > 0 or None"):
        AsyncClient(timeout=0)


def test_image_grid_tiles_samples_row_by_row() -> None:
    images = np.stack([np.full((4, 4), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = image_grid(images)  # 5 samples: 3 columns, 2 rows
    assert grid.shape == (2 * (4 + PAD) + PAD, 3 * (4 + PAD) + PAD)
    assert grid[0, 0] == PAD_VALUE
    assert grid[PAD, PAD] == 10 and grid[PAD, PAD + 2 * (4 + PAD)] == 30 and grid[PAD + 4 + PAD, PAD + 4 + PAD] == 50
    assert grid[-3, -3] == PAD_VALUE  # the empty sixth tile
    assert image_grid(images, cols=5, scale=3).shape == (3 * (4 + 2 * PAD), 3 * (5 * (4 + PAD) + PAD))


def test_write_grid_writes_a_grayscale_png(tmp_path: Path) -> None:
    images = np.zeros((16, 28, 28), np.uint8)
    images[:, 10:18, 10:18] = 255
    path = tmp_path / "grid.png"
    write_grid(images, path)
    with Image.open(path) as png:
        assert (png.format, png.mode, png.size) == ("PNG", "L", (4 * 30 + 2, 4 * 30 + 2))
        assert np.asarray(png)[PAD + 12, PAD + 12] == 255


@pytest.mark.parametrize(("name", "format"), [("grid.jpg", "JPEG"), ("grid.JPEG", "JPEG"), ("grid.webp", "WEBP"), ("grid.png", "PNG")])
def test_write_grid_picks_the_format_by_extension(tmp_path: Path, name: str, format: str) -> None:
    path = tmp_path / name
    write_grid(np.zeros((4, 28, 28), np.uint8), path)
    with Image.open(path) as image:
        assert image.format == format


def test_an_unknown_image_extension_is_refused_before_any_request(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:  # the target is down: a request would fail otherwise
        main(["images", "vae", "--out", "grid.xyz", "--target", "127.0.0.1:1"])
    assert exit.value.code == 2
    assert "--out grid.xyz: cannot tell the image format from .xyz; end it in one of .png, .jpg" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a name without an extension"):
        image_format("grid")


@pytest.mark.parametrize(
    ("error", "received", "line"),
    [
        (
            Unavailable("failed to connect to all addresses; last error: Connection refused"),
            Received(),
            "cannot reach the server at h:1: failed to connect",
        ),
        (
            Unavailable("server is shutting down; send the request to another server"),
            Received(),
            "the server at h:1 is unavailable: server is shutting down",
        ),
        (Unavailable("Stream removed (Socket closed)"), Received(57, "characters"), "the connection to the server at h:1 closed after 57"),
        (Unavailable("Socket closed"), Received(), "the connection to the server at h:1 closed mid-call: Socket closed"),
        (DeadlineExceeded("Deadline Exceeded"), Received(8, "samples"), "DeadlineExceeded after 8 samples: Deadline Exceeded"),
    ],
)
def test_error_lines_say_what_happened(error: GenserveError, received: Received, line: str) -> None:
    assert _error_line(error, ["h:1"], received).startswith(line)


def test_connection_options_go_before_or_after_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GENSERVE_TARGET", raising=False)
    parser = build_parser()
    args = parser.parse_args(["--target", "a:1", "--timeout", "5", "images", "vae", "--target", "b:2", "-n", "4", "--target", "c:3"])
    assert make_client(args, parser).targets == ("a:1", "b:2", "c:3")
    assert (args.timeout, args.n, args.out, args.labels) == (5.0, 4, "grid.png", None)
    args = parser.parse_args(["text", "transformer", "--prompt", "ROMEO:", "--stop", "\n", "--token", "t", "--timeout", "2"])
    assert (args.timeout, args.token, args.stop, args.max_tokens) == (2.0, "t", ["\n"], None)
    assert make_client(args, parser).targets == ("127.0.0.1:50051",)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["images", "vae", "-n", "4", "--seed", "-1"], "seed must be an integer from 0 to 2**63-1, got -1"),
        (
            ["images", "vae", "-n", "4", "--seed", "18446744073709551616"],
            "seed must be an integer from 0 to 2**63-1, got 18446744073709551616",
        ),
        (["images", "gan", "-n", "2", "--version", "-1"], "version must be an integer from 0 to 2**32-1 (0: the latest), got -1"),
        (
            ["images", "gan", "-n", "4", "--labels", "0-9"],
            "labels has 10 entries, more than the 4 samples; give at most 4 labels (fewer are cycled)",
        ),
        (["images", "gan", "--labels", "3000000000"], f"{LABELS} 3000000000"),
        (["images", "vae", "-n", "4294967296"], "n must be an integer from 1 to the model's max_n, got 4294967296"),
        (["text", "transformer", "-p", "ROMEO:", "--top-k", "-1"], "top_k must be an integer from 0 to 2**32-1 (0 turns it off), got -1"),
        (["text", "transformer", "-p", "ROMEO:", "--seed", "-1"], "seed must be an integer from 0 to 2**64-1, got -1"),
        (["text", "transformer", "-p", "ROMEO:", "--temperature", "nan"], f"{TEMPERATURE} nan"),
        (["text", "transformer", "-p", "ROMEO:", "--top-p", "inf"], "top_p must be in (0, 1] (1 turns it off), got inf"),
        (
            ["text", "transformer", "-p", "ROMEO:", "--max-tokens", "4294967296"],
            "max_new_tokens must be an integer from 1 to the server's max_new_tokens, got 4294967296",
        ),
    ],
)
def test_a_value_no_request_can_carry_is_a_usage_error_before_any_call(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:  # the target is down: a request would fail otherwise, with status 1
        main([*argv, "--target", "127.0.0.1:1", "--timeout", "2"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith(f"\npython -m clients: error: {message}\n") and "Traceback" not in err


def test_text_help_gives_no_number_for_the_servers_default_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["text", "--help"])
    usage = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "tokens to generate (default: the server's default for a request that sets none)" in usage and "256" not in usage
    assert TextOptions.__doc__ is not None and "256" not in TextOptions.__doc__  # no number that can drift from the server's


@pytest.mark.parametrize("argv", [[], ["images"], ["images", "vae", "-n", "0"], ["text", "t"], ["models", "--timeout", "-1"]])
def test_usage_errors_exit_with_status_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(argv)
    assert exit.value.code == 2
    assert "usage: python -m clients" in capsys.readouterr().err
