"""The SDK and the command line against a real server on localhost (tests/serving.py) and the bundled models.

The blocking ``Client`` and ``python -m clients`` run in a worker thread (``asyncio.to_thread``):
the server shares the test's event loop and must keep running while they wait.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

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
    Unavailable,
)
from clients.cli import main
from server.runtime.app import GenServer
from tests.clients.fake_server import until
from tests.decode_spy import StepSpy
from tests.serving import running_server

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

MODELS = "models"  # the bundled vae, gan (conditional) and transformer
CREDITS = 8
BATCH = 32


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> AsyncIterator[GenServer]:
    async with running_server(models_dir=MODELS, batch_size=BATCH, stream_credits=CREDITS, log_level="warning") as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def spy(server: GenServer) -> AsyncIterator[StepSpy]:
    """The server's transformer decode loop, watched (and pausable) for one test."""
    assert server.engine is not None
    watch = StepSpy(server.engine.decode_thread(server.registry.get("transformer")).loop)
    yield watch
    watch.restore()


async def assert_cancelled(spy: StepSpy, seed: int, tokens: int = 1000) -> None:
    """The sequence left the decode loop at a step, long before its ``tokens`` (a no-op cancel ends in "length")."""
    last = await spy.wait_final(seed)
    assert last.finish_reason == "cancelled" and last.n_generated < tokens


@pytest_asyncio.fixture(loop_scope="module")
async def client(server: GenServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.address, timeout=20) as c:
        yield c


def rejections(server: GenServer, rpc: str, code: str = "RESOURCE_EXHAUSTED") -> float:
    return server.metrics.registry.get_sample_value("genserve_rejections_total", {"rpc": rpc, "code": code}) or 0.0


def inflight(server: GenServer) -> int:
    return len(server.pipeline.inflight)


def free_port_address() -> str:
    """An address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_list_models(client: AsyncClient) -> None:
    models = {m.name: m for m in await client.list_models()}
    assert set(models) == {"vae", "gan", "flow", "transformer"}
    gan, text = models["gan"], models["transformer"]
    assert gan.image is not None and gan.image.conditional and (gan.image.label_min, gan.image.label_max) == (0, 9)
    assert gan.image.image_size == 28 and gan.text is None and gan.latest
    vae = models["vae"].image
    assert vae is not None and not vae.conditional and (vae.label_min, vae.label_max) == (None, None)
    assert text.text is not None and "R" in text.text.vocab and text.text.context_window > 0


async def test_generate_images(client: AsyncClient) -> None:
    a = await client.generate_images("vae", 16, seed=1)
    assert a.shape == (16, 28, 28) and a.dtype == np.uint8 and a.max() > 0
    assert np.array_equal(a, await client.generate_images("vae", 16, seed=1))
    assert not np.array_equal(a, await client.generate_images("vae", 16, seed=2))
    assert (await client.generate_images("gan", 4, seed=0, labels=7)).shape == (4, 28, 28)
    assert (await client.generate_images("gan", 3, labels=[1, 2, 3])).shape == (3, 28, 28)


async def test_a_big_request_arrives_in_chunks(client: AsyncClient) -> None:
    chunks: list[int] = []
    images = await client.generate_images("vae", 100, seed=3, progress=chunks.append)
    assert images.shape == (100, 28, 28) and sum(chunks) == 100 and len(chunks) >= 100 // BATCH


async def test_stream_and_generate_text(client: AsyncClient) -> None:
    pieces = [p async for p in client.stream_text("transformer", "ROMEO:", max_new_tokens=20, seed=5)]
    # pieces as they arrive: a token each, or the tokens that were ready together (server/grpc_edge/outbox.py)
    assert 1 <= len(pieces) <= 20 and all(isinstance(p, str) and p for p in pieces)
    assert len("".join(pieces)) == 20  # a character model: one character a token
    assert await client.generate_text("transformer", "ROMEO:", max_new_tokens=20, seed=5) == "".join(pieces)
    greedy = await client.generate_text("transformer", "ROMEO:", max_new_tokens=10, temperature=0)
    assert greedy == await client.generate_text("transformer", "ROMEO:", max_new_tokens=10, temperature=0, seed=9)
    full = await client.generate_text("transformer", "ROMEO:", max_new_tokens=60, seed=5)
    stopped = await client.generate_text("transformer", "ROMEO:", max_new_tokens=60, seed=5, stop=["e", "a"])
    assert full.startswith(stopped) and len(stopped) < len(full) and "e" not in stopped and "a" not in stopped
    assert await client.generate_text("transformer", "ROMEO:", max_new_tokens=10, top_k=5, top_p=0.9, temperature=0.8, seed=1)


async def test_cancelling_a_stream_cancels_the_request(client: AsyncClient, server: GenServer, spy: StepSpy) -> None:
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in client.stream_text("transformer", "ROMEO:", max_new_tokens=1000, seed=201):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    assert inflight(server) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_cancelled(spy, 201)
    await until(lambda: inflight(server) == 0)
    # leaving the loop early (and closing the generator) cancels it too
    stream = client.stream_text("transformer", "ROMEO:", max_new_tokens=1000, seed=202)
    async for _ in stream:
        break
    await stream.aclose()
    await assert_cancelled(spy, 202)
    await until(lambda: inflight(server) == 0)


async def test_a_deadline(client: AsyncClient, server: GenServer, spy: StepSpy) -> None:
    spy.pause()  # the text cannot finish before its deadline, however fast the machine
    with pytest.raises(DeadlineExceeded):
        await client.generate_text("transformer", "ROMEO:", max_new_tokens=1000, timeout=0.3, seed=203)
    spy.resume()
    await assert_cancelled(spy, 203)
    await until(lambda: inflight(server) == 0)


async def test_invalid_requests(client: AsyncClient) -> None:
    with pytest.raises(ModelNotFound, match="nope"):
        await client.generate_images("nope", 1)
    with pytest.raises(ModelNotFound):
        await client.generate_images("vae", 1, version=99)
    with pytest.raises(InvalidRequest, match="n must be an integer from 1 to"):
        await client.generate_images("vae", 0)
    with pytest.raises(InvalidRequest, match="label"):
        await client.generate_images("gan", 2, labels=[1, 2, 3])
    with pytest.raises(InvalidRequest, match="text"):
        await client.generate_images("transformer", 1)
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        await client.generate_text("transformer", "")
    with pytest.raises(InvalidRequest):
        await client.generate_text("transformer", "ROMEO:", temperature=-1)


async def test_unavailable() -> None:
    address = free_port_address()
    async with AsyncClient(address, retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.02), timeout=5) as client:
        with pytest.raises(Unavailable):
            await client.list_models()
        with pytest.raises(Unavailable):
            async with client.session():
                pass


async def test_overloaded_then_a_retry_that_succeeds_after_the_server_refused_once() -> None:
    """max_inflight=1 and a long text request in flight: the server refuses the next request.

    Without retries that is Overloaded. With them, gRPC's retry policy sends the refused call
    again after a jittered back-off; once the blocking request is cancelled, an attempt is
    admitted and the call succeeds.
    """
    async with running_server(models_dir=MODELS, max_inflight=1, log_level="warning") as srv, AsyncClient(srv.address, retry=None) as plain:
        blocker = plain.stream_text("transformer", "ROMEO:", max_new_tokens=1000)
        await anext(blocker)  # admitted: the server is at its limit now
        with pytest.raises(Overloaded, match="limit of 1 requests in flight"):
            await plain.generate_images("vae", 4, seed=0)
        assert rejections(srv, "Generate") == 1

        retry = RetryPolicy(max_attempts=5, initial_backoff=0.2, max_backoff=0.5)
        async with AsyncClient(srv.address, retry=retry) as retrying:
            call = asyncio.create_task(retrying.generate_images("vae", 4, seed=0))
            await until(lambda: rejections(srv, "Generate") == 2)  # its first attempt was refused
            await blocker.aclose()  # frees the slot before the next attempt
            images = await call
        assert images.shape == (4, 28, 28)
        assert np.array_equal(images, await plain.generate_images("vae", 4, seed=0))


async def test_session_many_requests_within_the_credit(client: AsyncClient, server: GenServer) -> None:
    before = rejections(server, "GenerateStream")
    async with client.session() as s:
        assert s.credit == CREDITS
        images = [s.submit_images("gan" if i % 2 else "vae", 4, seed=i, labels=i % 10 if i % 2 else None) for i in range(40)]
        texts = [s.submit_text("transformer", "ROMEO:", max_new_tokens=10, seed=i) for i in range(8)]
        peak = 0
        results: list[ImageResult | TextResult] = []
        async for r in s.results():
            peak = max(peak, s.in_flight)
            results.append(r)
        assert len(results) == 48 and peak <= CREDITS
        assert s.credit == CREDITS  # every credit came back
    assert rejections(server, "GenerateStream") == before  # nothing was ever sent beyond the credit
    assert {r.id for r in results} == {f.result().id for f in images + texts}
    first = images[0].result()
    assert first.model == "vae" and first.seed == 0 and first.images.shape == (4, 28, 28)
    assert np.array_equal(first.images, await client.generate_images("vae", 4, seed=0))  # same seed, same samples
    gan = images[1].result()
    assert gan.labels == (1, 1, 1, 1)
    text = texts[3].result()
    assert text.finish_reason == "length" and text.n_generated == 10
    # batched (8 texts) vs alone, exact strings: rests on text batch invariance (issue #17, the decode loop's owner)
    assert text.text == await client.generate_text("transformer", "ROMEO:", max_new_tokens=10, seed=3)


async def test_session_errors_cancellation_and_deadline(client: AsyncClient, server: GenServer, spy: StepSpy) -> None:
    spy.pause()  # neither text can finish by itself, however fast the machine
    async with client.session() as s:
        missing = s.submit_images("nope", 1, id="missing")
        bad = s.submit_images("vae", 0)
        long = s.submit_text("transformer", "ROMEO:", max_new_tokens=1000, id="long", seed=204)
        late = s.submit_text("transformer", "ROMEO:", max_new_tokens=1000, timeout=0.2, seed=205)
        floats = s.submit_images("vae", 2, want_float=True)
        with pytest.raises(ModelNotFound, match="request 'missing'"):
            await missing
        with pytest.raises(InvalidRequest):
            await bad
        await until(lambda: inflight(server) >= 1)
        assert s.cancel(long)
        with pytest.raises(DeadlineExceeded):
            await late
        spy.resume()
        await assert_cancelled(spy, 204)  # s.cancel reached the decode loop
        await assert_cancelled(spy, 205)  # and so did the deadline
        result = await floats
        assert result.floats is not None and np.allclose(result.floats * 255, result.images, atol=1)
        outcomes = [o async for o in s.results(return_exceptions=True)]  # all but the cancelled one, in completion order
        assert sorted(type(o).__name__ for o in outcomes) == ["DeadlineExceeded", "ImageResult", "InvalidRequest", "ModelNotFound"]
    await until(lambda: inflight(server) == 0)
    assert long.cancelled()


# -- the blocking client and the command line ----------------------------------------------------


async def test_sync_client(server: GenServer) -> None:
    def use() -> None:
        with Client(server.address) as client:
            assert {m.name for m in client.list_models()} == {"vae", "gan", "flow", "transformer"}
            assert client.generate_images("gan", 9, labels=3, seed=1).shape == (9, 28, 28)
            pieces = list(client.stream_text("transformer", "ROMEO:", max_new_tokens=5, seed=1))
            assert len("".join(pieces)) == 5 and all(pieces)
            assert client.generate_text("transformer", "ROMEO:", max_new_tokens=5, seed=1) == "".join(pieces)
            with client.session() as s:
                futures = [s.submit_images("vae", 2, seed=i) for i in range(12)]
                assert len(list(s.results())) == 12
            assert all(f.result().images.shape == (2, 28, 28) for f in futures)
            with pytest.raises(ModelNotFound):
                client.generate_text("nope", "x")

    await asyncio.to_thread(use)


async def test_cli_models_images_and_text(server: GenServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--target", server.address]
    assert await asyncio.to_thread(main, ["models", *target]) == 0
    out = capsys.readouterr().out
    assert "gan v1 (latest)  wgan-gp" in out and "labels 0-9" in out and "transformer" in out

    png, npy = tmp_path / "grid.png", tmp_path / "digits.npy"
    argv = ["images", "gan", "-n", "12", "--seed", "4", "--label", "5", "--out", str(png), "--npy", str(npy), "--scale", "1", *target]
    assert await asyncio.to_thread(main, argv) == 0
    assert f"wrote {png} (12 samples)" in capsys.readouterr().out
    samples = np.load(npy)
    assert samples.shape == (12, 28, 28) and samples.dtype == np.uint8
    with Image.open(png) as image:
        assert image.size == (4 * 30 + 2, 3 * 30 + 2)

    argv = ["text", "transformer", "--prompt", "ROMEO:", "--max-tokens", "30", "--seed", "2", *target]
    assert await asyncio.to_thread(main, argv) == 0
    async with AsyncClient(server.address) as client:
        expected = await client.generate_text("transformer", "ROMEO:", max_new_tokens=30, seed=2)
    assert capsys.readouterr().out == "ROMEO:" + expected + "\n"


async def test_cli_errors_are_one_line_with_exit_status_1(server: GenServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert await asyncio.to_thread(main, ["images", "nope", "--target", server.address]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m clients: error: ModelNotFound: ") and err.count("\n") == 1
    assert await asyncio.to_thread(main, ["text", "transformer", "--prompt", "", "--target", server.address]) == 1
    assert "InvalidRequest: prompt is empty" in capsys.readouterr().err
    down = free_port_address()
    assert await asyncio.to_thread(main, ["models", "--target", down, "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"python -m clients: error: cannot reach the server at {down}: ") and err.count("\n") == 1


async def test_cli_refusals_by_the_server_keep_status_1_and_values_no_request_carries_are_usage_errors(
    server: GenServer, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--target", server.address]
    assert (
        await asyncio.to_thread(main, ["images", "gan", "-n", "2", "--labels", "10", *target]) == 1
    )  # the model's range: the server's word
    assert capsys.readouterr().err == "python -m clients: error: InvalidRequest: label 10 at index 0 is outside 0..9\n"
    for argv, message in [
        (
            ["images", "gan", "-n", "4", "--labels", "0-9"],
            "labels has 10 entries, more than the 4 samples; give at most 4 labels (fewer are cycled)",
        ),
        (["images", "vae", "-n", "4", "--seed", "-1"], "seed must be an integer from 0 to 2**63-1, got -1"),
        (["text", "transformer", "-p", "ROMEO:", "--top-k", "-1"], "top_k must be an integer from 0 to 2**32-1 (0 turns it off), got -1"),
    ]:
        with pytest.raises(SystemExit) as exit:
            await asyncio.to_thread(main, [*argv, *target])
        assert exit.value.code == 2
        assert capsys.readouterr().err.endswith(f"\npython -m clients: error: {message}\n")
