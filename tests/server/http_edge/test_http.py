"""The HTTP edge over raw HTTP: every refusal with its status and field, a fuzz of bodies that never
gets a 500, tokens, the body limit, 429 with Retry-After, and a client that goes away mid-stream."""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.runtime.front import free_port
from tests.serving import ServerThread

pytestmark = pytest.mark.timeout(120)


Reply = tuple[int, Any, dict[str, str]]  # status, JSON body, headers


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        response = connection.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None, dict(response.getheaders())
    finally:
        connection.close()


def post(port: int, path: str, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return call(port, "POST", path, body, headers)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[ServerThread, int]]:
    port = free_port()
    with ServerThread(http_port=port) as thread:
        yield thread, port


@pytest.mark.parametrize(
    ("path", "payload", "status", "param"),
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", [1, 2], 400, None),
        ("/v1/completions", {"prompt": "x"}, 400, "model"),
        ("/v1/completions", {"model": "transformer"}, 400, "prompt"),
        ("/v1/completions", {"model": "transformer", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/completions", {"model": "transformer", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": "transformer", "prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"model": "transformer", "prompt": "x", "seed": -1}, 400, "seed"),
        ("/v1/completions", {"model": "transformer", "prompt": "x", "stop": [""]}, 400, "stop"),
        ("/v1/completions", {"model": "transformer", "prompt": "x", "n": 2}, 400, "n"),
        ("/v1/completions", {"model": "transformer", "prompt": "x", "stream": "yes"}, 400, "stream"),
        ("/v1/completions", {"model": "transformer", "prompt": "\u00e9"}, 400, "prompt"),  # not in the vocabulary
        ("/v1/completions", {"model": "vae", "prompt": "x"}, 400, "model"),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/v1/chat/completions", {"model": "transformer", "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": "transformer", "messages": [{"content": "x"}]}, 400, "messages[0]"),
        ("/v1/images/generations", {"model": "gan", "n": 0}, 400, "n"),
        ("/v1/images/generations", {"model": "gan", "size": "64x64"}, 400, "size"),
        ("/v1/images/generations", {"model": "gan", "labels": "0-9", "n": 4}, 400, "labels"),
        ("/v1/images/generations", {"model": "gan", "labels": [12]}, 400, "labels"),
        ("/v1/images/generations", {"model": "vae", "steps": 8}, 400, "steps"),
        ("/v1/images/generations", {"model": "nope"}, 404, "model"),
    ],
)
def test_each_bad_request_gets_its_status_and_names_the_field(server: tuple[ServerThread, int], path: str, payload: Any, status: int,
                                                             param: str | None) -> None:  # fmt: skip
    _, port = server
    got, body, _ = post(port, path, payload)
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    assert body["error"]["param"] == param


def test_junk_bodies_never_get_a_500_and_the_server_keeps_serving(server: tuple[ServerThread, int]) -> None:
    _, port = server
    junk: list[Any] = [
        b"", b"null", b"\xff\xfe", b"[" * 100_000, json.dumps({"a": [[[[[]]]]]}).encode(),
        {"model": "transformer", "prompt": "x" * 200_000}, {"model": "transformer", "prompt": "x", "temperature": float("nan")},
        {"model": "transformer", "prompt": "x", "max_tokens": 2**70}, {"model": ["vae"], "n": {}}, {"model": "gan", "n": 2**40},
        {"model": "gan", "labels": [True]}, {"model": "transformer", "messages": [{"role": 1, "content": None}]},
    ]  # fmt: skip
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/images/generations"):
        for payload in junk:
            status, body, _ = post(port, path, payload if isinstance(payload, bytes) else json.dumps(payload).encode())
            assert status < 500, (path, payload if isinstance(payload, dict) else payload[:20], status, body)  # answered, no 500
    status, body, _ = post(port, "/v1/completions", {"model": "transformer", "prompt": "ROMEO:", "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_a_body_over_the_limit_is_refused_413(server: tuple[ServerThread, int]) -> None:
    _, port = server
    status, body, _ = post(port, "/v1/completions", b'{"prompt": "' + b"x" * (2 << 20) + b'"}')
    assert status == 413 and "over 1048576 bytes" in body["error"]["message"]


def test_health_and_readiness(server: tuple[ServerThread, int]) -> None:
    _, port = server
    assert call(port, "GET", "/health")[0] == 200
    assert call(port, "GET", "/ready")[:2] == (200, {"status": "ready"})


def test_a_client_that_goes_away_mid_stream_stops_its_decoding(server: tuple[ServerThread, int]) -> None:
    thread, port = server
    assert thread.server is not None
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"model": "transformer", "prompt": "ROMEO:", "max_tokens": 1000, "stream": True, "seed": 1}).encode()
    connection.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type", "").startswith("text/event-stream")
    first = response.readline()
    assert first.startswith(b"data: {")
    connection.sock.close()  # the client goes away with ~1000 tokens to come
    connection.close()
    pipeline = thread.server.pipeline
    deadline = time.monotonic() + 10
    while pipeline.inflight:  # its job ended (cancelled), long before 1000 tokens
        assert time.monotonic() < deadline, "the job of a disconnected stream is still in flight"
        time.sleep(0.05)
    batch = thread.server.engine.decode_thread(thread.server.registry.get("transformer")).loop
    time.sleep(0.3)
    assert not batch.has_work  # nothing decoded for nobody


def test_a_saturated_server_answers_429_with_retry_after() -> None:
    port = free_port()
    with ServerThread(http_port=port, max_inflight=1) as thread:
        assert thread.server is not None
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = json.dumps({"model": "transformer", "prompt": "ROMEO:", "max_tokens": 1000, "stream": True}).encode()
        connection.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
        held = connection.getresponse()
        assert held.readline().startswith(b"data: ")  # one request in flight: the limit
        status, refused, headers = post(port, "/v1/completions", {"model": "transformer", "prompt": "x", "max_tokens": 2})
        connection.close()
        assert status == 429 and refused["error"]["type"] == "rate_limit_error"
        assert int(headers["retry-after"]) >= 1
        metrics = thread.server.metrics.rejections.labels("Http", "RESOURCE_EXHAUSTED")._value.get()
        assert metrics >= 1


def test_with_tokens_a_call_without_one_gets_401(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    port = free_port()
    with ServerThread(http_port=port, token_file=str(tokens)):
        status, body, _ = post(port, "/v1/completions", {"model": "transformer", "prompt": "x", "max_tokens": 1})
        assert status == 401 and body["error"]["type"] == "authentication_error"
        status, body, _ = post(
            port, "/v1/completions", {"model": "transformer", "prompt": "x", "max_tokens": 1}, {"Authorization": "Bearer s3cret"}
        )
        assert status == 200
        assert call(port, "GET", "/health")[0] == 200  # health stays public (--public-health)


def test_the_playground_is_one_page_over_the_public_endpoints(server: tuple[ServerThread, int]) -> None:
    _, port = server
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/")
    response = connection.getresponse()
    page = response.read().decode()
    connection.close()
    assert response.status == 200 and response.getheader("content-type", "").startswith("text/html")
    assert "<title>genserve playground</title>" in page
    fetched = set(re.findall(r'fetch\("([^"]+)"', page))
    assert fetched == {"/v1/models", "/v1/images/generations", "/v1/completions"}  # nothing from elsewhere
    assert 'src="http' not in page and "innerHTML" not in page  # no outside scripts; messages shown as text


def test_without_public_health_the_health_endpoints_need_a_token_too(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    port = free_port()
    with ServerThread(http_port=port, token_file=str(tokens), public_health=False):
        assert call(port, "GET", "/health")[0] == 401
        assert call(port, "GET", "/ready", headers={"Authorization": "Bearer s3cret"})[0] == 200


def test_a_deadline_ends_a_stream_with_an_error_event(server: tuple[ServerThread, int]) -> None:
    _, port = server
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"model": "transformer", "prompt": "ROMEO:", "max_tokens": 1000, "stream": True}).encode()
    connection.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json", "timeout": "0.3"})
    events = [line for line in connection.getresponse().read().decode().split("\n\n") if line]
    connection.close()
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "timeout" and "deadline" in error["message"]


def test_a_bad_timeout_header_is_refused_by_name(server: tuple[ServerThread, int]) -> None:
    _, port = server
    status, body, _ = post(port, "/v1/completions", {"model": "transformer", "prompt": "x"}, {"timeout": "soon"})
    assert status == 400 and body["error"]["param"] == "timeout"
