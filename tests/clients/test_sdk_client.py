"""The SDK's AsyncClient against a scriptable in-process server (tests/clients/fake_server.py): every
call, tokens, TLS, retries, balancing and deadlines, where a real server cannot be steered precisely."""

from __future__ import annotations

import asyncio
import math
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest

from clients import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
)
from tests.clients.fake_server import fake_server, sample_value, self_signed

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)


async def test_every_call_of_the_async_client() -> None:
    async with fake_server(chunk=3) as (address, fake), AsyncClient(address, token="s3cret") as client:
        models = await client.list_models()
        assert [m.name for m in models] == ["vae", "transformer"]
        assert models[0].image is not None and models[0].image.max_n == 1024 and models[0].text is None
        assert models[1].text is not None and models[1].text.vocab == "abc" and models[1].version == 2

        chunks: list[int] = []
        images = await client.generate_images("vae", 7, seed=3, progress=chunks.append)
        assert images.shape == (7, 28, 28) and images.dtype == np.uint8
        assert images[:, 5, 5].tolist() == [sample_value(i) for i in range(7)]  # the chunks came last first
        assert chunks == [1, 3, 3]

        pieces = [p async for p in client.stream_text("transformer", "ROMEO:", max_new_tokens=4)]
        assert pieces == ["R", "O", "M", "E"]
        assert await client.generate_text("transformer", "JULIET", max_new_tokens=100) == "JULIET"
        assert all(m.get("authorization") == "Bearer s3cret" for m in fake.metadata)


async def test_a_wrong_token_raises_unauthenticated() -> None:
    async with fake_server() as (address, fake):
        fake.token = "right"
        async with AsyncClient(address, token="wrong") as client:
            with pytest.raises(Unauthenticated, match="missing or wrong bearer token"):
                await client.list_models()
        async with AsyncClient(address) as client:
            with pytest.raises(Unauthenticated):
                await client.generate_images("vae", 1)
        async with AsyncClient(address, token="right") as client:
            assert len(await client.list_models()) == 2


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
async def test_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    async with fake_server(tls=grpc.ssl_server_credentials([(key, cert)])) as (address, fake):
        port = address.rsplit(":", 1)[1]
        async with AsyncClient(f"localhost:{port}", tls=True, root_certificates=cert, token="t") as client:
            assert len(await client.list_models()) == 2
            assert (await client.generate_images("vae", 2)).shape == (2, 28, 28)
        async with AsyncClient([f"localhost:{port}", address], root_certificates=cert) as client:  # the first name is checked
            for _ in range(4):
                assert len(await client.list_models()) == 2
        async with AsyncClient(address, retry=None) as client:  # plaintext to a TLS server
            with pytest.raises(Unavailable):
                await client.list_models()
        async with AsyncClient(f"localhost:{port}", tls=True, retry=None) as client:  # the system's roots do not trust it
            with pytest.raises(Unavailable):
                await client.list_models()
        assert fake.metadata[0]["authorization"] == "Bearer t"


async def test_a_refused_call_is_retried_and_succeeds() -> None:
    async with fake_server() as (address, fake), AsyncClient(address, retry=FAST_RETRY) as client:
        fake.refuse.extend([grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE])
        assert (await client.generate_images("vae", 2)).shape == (2, 28, 28)
        assert fake.calls["Generate"] == 3
        fake.refuse.append(grpc.StatusCode.UNAVAILABLE)
        assert await client.generate_text("transformer", "abc") == "abc"
        fake.refuse.append(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert len(await client.list_models()) == 2
        assert fake.calls["ListModels"] == 2


async def test_retries_stop_at_max_attempts() -> None:
    async with fake_server() as (address, fake), AsyncClient(address, retry=FAST_RETRY) as client:
        fake.refuse.extend([grpc.StatusCode.RESOURCE_EXHAUSTED] * 5)
        with pytest.raises(Overloaded, match="refused by the fake"):
            await client.generate_images("vae", 2)
        assert fake.calls["Generate"] == 3
    async with fake_server() as (address, fake), AsyncClient(address, retry=None) as client:
        fake.refuse.append(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(Unavailable):
            await client.list_models()
        assert fake.calls["ListModels"] == 1


async def test_errors_that_are_not_retried() -> None:
    async with fake_server() as (address, fake), AsyncClient(address, retry=FAST_RETRY) as client:
        with pytest.raises(ModelNotFound, match="no model named 'nope'"):
            await client.generate_images("nope", 1)
        assert fake.calls["Generate"] == 1
        fake.after_first_chunk = grpc.StatusCode.UNAVAILABLE  # output began: a retry would duplicate it
        with pytest.raises(Unavailable, match="failed after a chunk"):
            await client.generate_images("vae", 9)
        assert fake.calls["Generate"] == 2


async def test_an_unreachable_server_raises_unavailable_after_retrying() -> None:
    async with fake_server() as (address, _):
        pass  # its port is free again now
    async with AsyncClient(address, retry=FAST_RETRY, timeout=5) as client:
        with pytest.raises(Unavailable, match=r"failed to connect|connections to all backends failing"):
            await client.list_models()


async def test_several_targets_are_served_round_robin() -> None:
    async with fake_server() as (a, fake_a), fake_server() as (b, fake_b):
        async with AsyncClient([a, b]) as client:
            for _ in range(20):
                await client.list_models()
            assert fake_a.calls["ListModels"] + fake_b.calls["ListModels"] == 20
            assert fake_a.calls["ListModels"] >= 5 and fake_b.calls["ListModels"] >= 5
        async with fake_server() as (c, _):
            dead = c
        async with AsyncClient([dead, a]) as client:  # a server that is down is skipped
            for _ in range(5):
                assert len(await client.list_models()) == 2


async def test_a_deadline_ends_a_slow_stream() -> None:
    async with fake_server() as (address, fake), AsyncClient(address, timeout=0.5) as client:
        fake.text_gate.clear()
        fake.text_gate_after = 2  # two tokens, then a stall only the deadline ends
        pieces: list[str] = []
        with pytest.raises(DeadlineExceeded):
            async for piece in client.stream_text("transformer", "abcdefgh"):
                pieces.append(piece)
        assert pieces == ["a", "b"]  # what came before the deadline was delivered
        fake.text_gate.set()
        assert await client.generate_text("transformer", "ab", timeout=5) == "ab"  # per-call timeout wins


async def test_every_call_has_a_30_s_deadline_by_default() -> None:
    async with fake_server() as (address, fake):
        async with AsyncClient(address) as client:
            await client.list_models()
            await client.generate_images("vae", 1)
            assert await client.generate_text("transformer", "ab") == "ab"
        async with AsyncClient(address, timeout=None) as client:
            await client.list_models()

        def use() -> None:
            with Client(address) as sync:
                sync.list_models()

        await asyncio.to_thread(use)
    limited, unlimited, synced = fake.deadlines[:3], fake.deadlines[3], fake.deadlines[4]
    # what the server sees: 30 s, less the moments the call took to arrive (grpc's wire encoding
    # of a timeout is coarse: 30.1 s was seen), far from 60 s or none
    assert all(d is not None and 20 < d <= 31 for d in [*limited, synced]), fake.deadlines
    assert unlimited is None or unlimited > 10**6  # no deadline at all


async def test_a_value_no_request_can_carry_is_refused_before_anything_is_sent() -> None:
    """Not protobuf's ``ValueError: Value out of range`` from inside the SDK: InvalidRequest, naming the field."""
    async with fake_server() as (address, fake), AsyncClient(address) as client:
        with pytest.raises(InvalidRequest, match=r"^seed must be an integer from 0 to 2\*\*63-1, got -1$"):
            await client.generate_images("vae", 4, seed=-1)
        with pytest.raises(InvalidRequest, match=r"^top_k must be an integer from 0 to 2\*\*32-1 \(0 turns it off\), got -1$"):
            async for _ in client.stream_text("transformer", "ab", top_k=-1):
                pass
        with pytest.raises(InvalidRequest, match=r"^temperature must be a finite number >= 0 \(0 means greedy\), got nan$"):
            await client.generate_text("transformer", "ab", temperature=math.nan)
        assert fake.calls["Generate"] == 0
        async with client.session() as s:
            with pytest.raises(InvalidRequest, match=r"^labels has 10 entries, more than the 4 samples; give at most 4 labels"):
                s.submit_images("vae", 4, labels=range(10), id="a")
            with pytest.raises(InvalidRequest, match=r"^seed must be an integer from 0 to 2\*\*64-1, got 18446744073709551616$"):
                s.submit_text("transformer", "ab", seed=2**64, id="a")
            assert (s.in_flight, s.queued) == (0, 0)
            assert (await s.submit_images("vae", 1, id="a")).id == "a"  # the id was never taken: the session goes on
        assert [r.id for m in fake.messages for r in m.requests] == ["a"]

        def use() -> None:
            with Client(address) as sync, sync.session() as s:
                with pytest.raises(InvalidRequest, match=r"^version must be an integer from 0 to 2\*\*32-1 \(0: the latest\), got -1$"):
                    s.submit_images("vae", 1, version=-1)
                assert s.submit_images("vae", 1).result(timeout=5).images.shape == (1, 28, 28)

        await asyncio.to_thread(use)
