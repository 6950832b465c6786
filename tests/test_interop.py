"""A client that is not ours: grpc-js (Node.js, tests/interop/grpc_js_client.mjs, proto/ loaded at
run time) gets what the Python SDK gets. The same seeds give the same pixels and the same greedy
text, bad requests get their gRPC status with the bad thing named, GenerateStream's credits work,
both straight to the server and through the HAProxy front, whose refusal grpc-js reads as
RESOURCE_EXHAUSTED with the retry hint.

Without node or the packages (scripts/node_setup.sh) it skips; with CI=true it fails instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from tests.serving import ServerProcess, haproxy_or_skip

pytestmark = pytest.mark.timeout(180)

CLIENT = Path(__file__).resolve().parent / "interop" / "grpc_js_client.mjs"


def node_or_skip() -> str:
    node = shutil.which("node")
    if node is None or not (CLIENT.parent / "node_modules" / "@grpc" / "grpc-js").is_dir():
        reason = "node or tests/interop's @grpc/grpc-js is missing: run scripts/node_setup.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true requires the interop test")
        pytest.skip(reason)
    return node


def grpc_js(address: str, scenario: str) -> dict[str, Any]:
    result = subprocess.run([node_or_skip(), str(CLIENT), address, scenario], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, str]]:
    """One server behind a front of one Generate slot and no queue: (the front's address, the server's own)."""
    node_or_skip()
    haproxy_or_skip()
    proc = ServerProcess("--front-limit", "1", "--front-queue", "0")
    try:
        front = proc.wait_for("front_ready", 30)
        ready = proc.wait_for("server_ready", 60)
        yield str(front["address"]), str(ready["address"])
    finally:
        proc.stop()


def python_sdk_view(address: str) -> tuple[str, str]:
    """The pixels' digest and the greedy text the Python stub gets for grpc_js_client.mjs's requests."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        pixels = hashlib.sha256()
        for m in stub.Generate(pb.GenerateRequest(model="vae", image=pb.ImageParams(n=3, seed=7)), timeout=20):
            if m.HasField("images"):
                pixels.update(m.images.pixels)
        greedy = pb.TextParams(prompt="ROMEO:", max_new_tokens=20, seed=1, temperature=0)
        text_request = pb.GenerateRequest(model="transformer", text=greedy)
        text = "".join(m.text.text for m in stub.Generate(text_request, timeout=20) if m.HasField("text"))
    return pixels.hexdigest(), text


@pytest.mark.parametrize("route", ["direct", "front"])
def test_grpc_js_gets_what_the_python_sdk_gets(server: tuple[str, str], route: str) -> None:
    front, direct = server
    seen = grpc_js(direct if route == "direct" else front, "calls")
    assert isinstance(seen["models"], list) and set(seen["models"]) >= {"vae", "gan", "transformer"}, seen["models"]
    pixels, text = python_sdk_view(direct)

    image = seen["image"]
    assert image["code"] == 0 and image["images"] == 3 and image["pixels"] == pixels
    assert image["finish"]["reason"] == "FINISH_REASON_COMPLETE" and image["finish"]["seed"] == 7

    greedy = seen["text"]
    assert greedy["code"] == 0 and greedy["text"] == text and len(text) == 20
    assert greedy["finish"]["reason"] == "FINISH_REASON_LENGTH" and greedy["finish"]["nGenerated"] == 20

    unknown = seen["unknown"]
    assert unknown["code"] == grpc.StatusCode.NOT_FOUND.value[0] and "no-such-model" in unknown["details"]
    invalid = seen["invalid"]
    assert invalid["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "n must be an integer from 1 to" in invalid["details"]

    stream = seen["stream"]
    assert stream["code"] == 0 and stream["credits"] >= 2
    complete = {"reason": "FINISH_REASON_COMPLETE", "code": 0}
    assert stream["finishes"] == {"a": complete, "b": complete}


def test_grpc_js_reads_the_fronts_refusal_with_its_hint(server: tuple[str, str]) -> None:
    front, _ = server
    refused = grpc_js(front, "refused")["refused"]
    assert refused["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "limit of 1 Generate calls in progress and 0 waiting" in refused["details"]
    assert refused["metadata"]["grpc-retry-pushback-ms"] == "100"
