"""The SDK against a scriptable in-process server (tests/conftest_client.py): retries, balancing,
tokens, and the session's credit accounting, where a real server cannot be steered precisely."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from clients import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    ImageResult,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    RetryPolicy,
    TextResult,
    Unauthenticated,
    Unavailable,
)
from tests.conftest_client import fake_server, sample_value, self_signed, until

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


# -- the session ---------------------------------------------------------------------------------


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


# -- the blocking client, on its own loop thread -----------------------------------------------


async def test_sync_client_and_session() -> None:
    async with fake_server(credits=2) as (address, fake):

        def use() -> None:
            with Client(address, token="t") as client:
                assert [m.name for m in client.list_models()] == ["vae", "transformer"]
                assert client.generate_images("vae", 4, labels=3).shape == (4, 28, 28)
                pieces = client.stream_text("transformer", "abcdef", max_new_tokens=6)
                assert next(pieces) == "a"
                pieces.close()  # leaving early cancels the call
                assert client.generate_text("transformer", "xyz") == "xyz"
                with client.session() as s:
                    futures = [s.submit_images("vae", 1, seed=i) for i in range(5)] + [s.submit_text("transformer", "ab")]
                    results = list(s.results())
                assert len(results) == 6 and all(f.done() for f in futures)
                assert isinstance(futures[-1].result(), TextResult)
                with pytest.raises(ModelNotFound):
                    client.generate_images("nope", 1)

        await asyncio.to_thread(use)
        assert fake.max_in_flight <= 2 and fake.overdrawn == 0
        assert fake.metadata[0]["authorization"] == "Bearer t"


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


async def test_a_session_deadline_beyond_what_timeout_ms_holds_is_sent_capped() -> None:
    async with fake_server() as (address, fake), AsyncClient(address) as client:
        async with client.session(timeout=1e8) as s:  # 3 years: more milliseconds than a uint32 holds
            assert (await asyncio.wait_for(s.submit_images("vae", 1), 5)).images.shape == (1, 28, 28)
        assert fake.messages[0].requests[0].timeout_ms == 2**32 - 1


async def run_cli(argv: list[str], stdout: int) -> tuple[int, str]:
    """``python -m clients ARGV`` in a child process writing to ``stdout`` (a file descriptor); its status and stderr."""
    root = Path(__file__).resolve().parent.parent
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients", *argv, stdout=stdout, stderr=asyncio.subprocess.PIPE, cwd=root
    )
    os.close(stdout)  # the child has its copy
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_the_cli_ends_quietly_when_the_reader_has_closed_the_pipe() -> None:
    """``python -m clients models --json | head -1``: a reader that stops reading has what it wanted; no error."""
    async with fake_server() as (address, fake):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first line: every write meets EPIPE
        assert await run_cli(["models", "--json", "--target", address], write) == (0, "")  # no "error: Broken pipe", no traceback
        assert fake.calls["ListModels"] == 1


async def test_the_cli_ends_quietly_when_the_reader_closes_the_pipe_mid_stream() -> None:
    """``python -m clients text ... | head -c 1``: the stream meets a pipe its reader closed after the first piece."""
    async with fake_server() as (address, fake):
        fake.text_delay = 0.05
        read, write = os.pipe()
        cli = asyncio.create_task(run_cli(["text", "transformer", "-p", "abcdefgh", "--no-echo", "--target", address], write))
        assert await asyncio.to_thread(os.read, read, 1) == b"a"
        os.close(read)
        assert await cli == (0, "")
        assert fake.calls["Generate"] == 1


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """A bounded poll for synchronous code on a thread (``until`` is its async twin)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


async def test_sync_session_future_cancel_reaches_the_server() -> None:
    async with fake_server() as (address, fake):
        fake.gate.clear()

        def use() -> None:
            with Client(address) as client, client.session() as s:
                future = s.submit_images("vae", 1, id="c")
                assert future.cancel()
                with pytest.raises(concurrent.futures.CancelledError):
                    future.result()
                # while the session is open: closing it would end the stream, and so the request, anyway
                wait_for(lambda: any("c" in m.cancel for m in fake.messages) and fake.in_flight == 0)

        await asyncio.to_thread(use)
        assert fake.cancelled == ["c"]


async def test_sync_cancel_wakes_waiters() -> None:
    """concurrent.futures.wait returns for a cancelled session future, however it was cancelled."""
    async with fake_server() as (address, fake):
        fake.gate.clear()

        def use() -> None:
            with Client(address) as client, client.session() as s:
                future = s.submit_images("vae", 1)
                other = s.submit_images("vae", 1)
                s.cancel(other)
                threading.Timer(0.05, future.cancel).start()
                done, _ = concurrent.futures.wait([future, other], timeout=5)
                assert len(done) == 2 and future.cancelled() and other.cancelled()

        await asyncio.to_thread(use)
