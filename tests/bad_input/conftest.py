"""One server for each bad-input module, serving the bundled models, with a client and what ListModels says."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from tests.bad_input.oracle import CLIENT_OPTIONS, SERVER, Catalog, Harness
from tests.serving import ServerThread


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    with ServerThread(**SERVER) as server, grpc.insecure_channel(server.address, options=CLIENT_OPTIONS) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
        entries = {(m.name, m.version): m for m in listed.models}
        latest = {m.name: m for m in listed.models if m.latest}
        assert set(latest) == {"vae", "gan", "flow", "transformer"}
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="bad-input-client") as pool:
            yield Harness(server, channel, stub, Catalog(entries, latest), pool, listed)
