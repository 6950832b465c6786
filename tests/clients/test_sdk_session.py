"""The SDK's session (clients/_session.py) against a scriptable in-process server: its credit
accounting, completion order, failures, retries, cancels and deadlines."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from clients import (
    AsyncClient,
    DeadlineExceeded,
    ImageResult,
    InvalidRequest,
    ModelNotFound,
    RetryPolicy,
    TextResult,
    Unavailable,
)
from tests.clients.fake_server import fake_server, until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)


async def test_session_never_sends_beyond_its_credit_and_batches_sends() -> None:
    async with fake_server(credits=3) as (address, fake), AsyncClient(address) as client:
        fake.gate.clear()
        async with client.session() as s:
            assert s.credit == 3
            futures = [s.submit_images("vae", 2, seed=i) for i in range(10)]
            await until(lambda: fake.in_flight == 3)
            assert s.in_flight == 3 and s.queued == 7 and s.credit == 0
            assert len(fake.messages) == 1 and len(fake.messages[0].requests) == 3  # one message for all it could send
            fake.gate.set()
            results = [r async for r in s.results()]
        assert fake.max_in_flight == 3 and fake.overdrawn == 0
        assert sorted(r.id for r in results) == sorted(f.result().id for f in futures)
        assert all(isinstance(r, ImageResult) and r.images.shape == (2, 28, 28) for r in results)
        assert len(fake.messages) < 10  # batched
        assert {f.result().seed for f in futures} == set(range(10))


async def test_session_results_come_in_completion_order() -> None:
    async with fake_server(credits=8) as (address, fake), AsyncClient(address) as client:
        fake.text_gate.clear()  # the text request cannot finish before the image one
        async with client.session() as s:
            slow = s.submit_text("transformer", "abcdef", max_new_tokens=6, id="slow")
            fast = s.submit_images("vae", 1, id="fast")
            results = s.results()
            order = [(await anext(results)).id]
            fake.text_gate.set()
            order += [r.id async for r in results]
        assert order == ["fast", "slow"]
        text = slow.result()
        assert isinstance(text, TextResult) and (text.text, text.finish_reason, text.n_generated) == ("abcdef", "length", 6)
        assert fast.result().id == "fast"


async def test_session_failures_raise_or_are_returned() -> None:
    async with fake_server() as (address, _), AsyncClient(address) as client, client.session() as s:
        bad = s.submit_images("nope", 1, id="bad")
        s.submit_images("vae", 1)
        outcomes = [r async for r in s.results(return_exceptions=True)]
        assert len(outcomes) == 2
        assert sum(isinstance(o, ModelNotFound) for o in outcomes) == 1
        with pytest.raises(ModelNotFound, match="request 'bad': no model named 'nope'"):
            bad.result()
        s.submit_images("nope", 1)
        with pytest.raises(ModelNotFound):
            async for _ in s.results():
                pass
        with pytest.raises(ValueError, match="request id 'x' is already in flight"):
            s.submit_images("vae", 1, id="x")
            s.submit_images("vae", 1, id="x")


async def test_session_retries_a_refused_request() -> None:
    async with fake_server() as (address, fake), AsyncClient(address, retry=FAST_RETRY) as client:
        fake.refuse_ids = {"a": grpc.StatusCode.RESOURCE_EXHAUSTED, "b": grpc.StatusCode.INVALID_ARGUMENT}
        async with client.session() as s:
            a = s.submit_images("vae", 3, id="a")
            b = s.submit_images("vae", 3, id="b")
            assert (await a).images.shape == (3, 28, 28)
            with pytest.raises(InvalidRequest, match="refused by the fake"):
                await b
        sent = [r.id for m in fake.messages for r in m.requests]
        assert sorted(sent) == ["a", "a", "b"]


async def test_session_cancels_queued_and_in_flight_requests() -> None:
    async with fake_server(credits=2) as (address, fake), AsyncClient(address) as client:
        fake.gate.clear()
        async with client.session() as s:
            running = [s.submit_images("vae", 1, id=f"r{i}") for i in range(2)]
            queued = s.submit_images("vae", 1, id="q")
            await until(lambda: fake.in_flight == 2)
            assert s.cancel("r0") and queued.cancel()
            await until(lambda: fake.cancelled == ["r0"])
            fake.gate.set()
            assert [r.id async for r in s.results()] == ["r1"]
        assert running[0].cancelled() and queued.cancelled() and running[1].result().id == "r1"
        assert "q" not in [r.id for m in fake.messages for r in m.requests]  # never sent


async def test_session_request_deadline() -> None:
    async with fake_server() as (address, fake), AsyncClient(address) as client:
        fake.gate.clear()
        async with client.session(timeout=0.1) as s:
            late = s.submit_images("vae", 1, id="late")
            with pytest.raises(DeadlineExceeded, match="request 'late'"):
                await late
            await until(lambda: fake.cancelled == ["late"])  # and the server was told
        sent = fake.messages[0].requests[0]
        assert 0 < sent.timeout_ms <= 100


async def test_session_ending_stream_fails_what_is_left() -> None:
    async with fake_server() as (address, fake), AsyncClient(address) as client:
        fake.gate.clear()
        async with client.session() as s:
            future = s.submit_images("vae", 1)
            await until(lambda: fake.in_flight == 1)
            fake.end_stream.set()
            with pytest.raises(Unavailable, match="ended the stream with 1 request"):
                await future
            with pytest.raises(Unavailable):
                s.submit_images("vae", 1)


async def test_session_to_a_down_server_raises_on_enter() -> None:
    async with fake_server() as (address, _):
        pass
    async with AsyncClient(address, retry=None) as client:
        with pytest.raises(Unavailable):
            async with client.session():
                pass


async def test_leaving_a_session_by_an_exception_cancels_what_is_left() -> None:
    async with fake_server() as (address, fake), AsyncClient(address) as client:
        fake.gate.clear()
        with pytest.raises(KeyError):
            async with client.session() as s:
                future = s.submit_images("vae", 1)
                await until(lambda: fake.in_flight == 1)
                raise KeyError
        assert future.cancelled()
        await until(lambda: fake.in_flight == 0)


async def test_a_session_deadline_beyond_what_timeout_ms_holds_is_sent_capped() -> None:
    async with fake_server() as (address, fake), AsyncClient(address) as client:
        async with client.session(timeout=1e8) as s:  # 3 years: more milliseconds than a uint32 holds
            assert (await asyncio.wait_for(s.submit_images("vae", 1), 5)).images.shape == (1, 28, 28)
        assert fake.messages[0].requests[0].timeout_ms == 2**32 - 1
