"""engine.engine: model code on engine threads, results back on the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.decode import DecodeBatch, SequenceRequest
from engine.engine import Engine
from engine.errors import EngineError, InvalidPromptError, QueueFullError
from engine.images import ImageRequest
from engine.modelfile import export_model
from engine.models.transformer import CharTransformer, TransformerConfig
from engine.models.vae import VAE, VAEConfig
from engine.registry import ModelRegistry
from engine.sampling import MAX_NEW_TOKENS, SamplingParams
from server.config import ServerConfig
from tests.decode_spy import StepSpy

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

VOCAB = "\n !,.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    torch.manual_seed(0)
    text = CharTransformer(TransformerConfig(vocab_size=len(VOCAB), block_size=32, n_layer=1, n_head=2, d_model=16, d_ff=32, dropout=0.0))
    export_model(tmp_path / "text.safetensors", "char-transformer", text, vocab=VOCAB)
    export_model(tmp_path / "digits.safetensors", "vae", VAE(VAEConfig(hidden_dim=8, latent_dim=4)))
    return ModelRegistry.from_folder(tmp_path)


@pytest.fixture
def engine() -> Iterator[Engine]:
    e = Engine(ServerConfig(decode_batch=4, decode_pending=2, max_new_tokens=MAX_NEW_TOKENS).engine_limits())
    yield e
    e.close()


def sync_text(registry: ModelRegistry, prompt: str, params: SamplingParams) -> str:
    loop = DecodeBatch.from_loaded(registry.get("text").model, max_batch=1)
    loop.add(SequenceRequest(prompt, params))
    return "".join(ev.text for ev in loop.run_until_idle())


async def collect(engine: Engine, registry: ModelRegistry, prompt: str, params: SamplingParams) -> tuple[str, str | None]:
    events = [ev async for ev in engine.stream_text(registry.get("text"), SequenceRequest(prompt, params))]
    return "".join(ev.text for ev in events), events[-1].finish_reason


async def test_stream_text_equals_the_synchronous_loop(engine: Engine, registry: ModelRegistry) -> None:
    params = SamplingParams(temperature=0.9, seed=5, max_new_tokens=20)
    text, reason = await collect(engine, registry, "ROMEO:", params)
    assert reason == "length"
    assert text == sync_text(registry, "ROMEO:", params)


async def test_concurrent_streams_each_get_their_own_answer(engine: Engine, registry: ModelRegistry) -> None:
    settings = [SamplingParams(temperature=1.0, seed=s, max_new_tokens=10 + s) for s in range(6)]  # 6 > 4 slots: 2 wait
    results = await asyncio.gather(*(collect(engine, registry, "A", p) for p in settings))
    for params, (text, reason) in zip(settings, results, strict=True):
        assert reason == "length"
        assert text == sync_text(registry, "A", params)  # batched vs alone, exact: text batch invariance (issue #17)


async def test_closing_the_stream_early_cancels_the_sequence_and_frees_the_slot(engine: Engine, registry: ModelRegistry) -> None:
    served = registry.get("text")
    spy = StepSpy(engine.decode_thread(served).loop)
    stream = engine.stream_text(served, SequenceRequest("A", SamplingParams(max_new_tokens=MAX_NEW_TOKENS, seed=71)))
    first = await anext(stream)
    assert first.finish_reason is None
    await stream.aclose()  # the client went away
    last = await spy.wait_final(71)
    # it left at a step, long before it could have finished by itself (a no-op cancel ends in "length")
    assert last.finish_reason == "cancelled" and last.n_generated < MAX_NEW_TOKENS
    assert not spy.loop.has_work  # nothing left to step: it costs no more work


async def test_bad_prompt_is_refused_before_any_event(engine: Engine, registry: ModelRegistry) -> None:
    with pytest.raises(InvalidPromptError):
        await collect(engine, registry, "ROMEO: \u00e9", SamplingParams(max_new_tokens=5))


async def test_a_full_decode_loop_refuses_at_once(engine: Engine, registry: ModelRegistry) -> None:
    served = registry.get("text")
    worker = engine.decode_thread(served)
    spy = StepSpy(worker.loop)
    spy.pause()  # no sequence can finish and free its place, however fast the machine
    try:
        for i in range(6):  # 4 slots + 2 waiting
            worker.submit(SequenceRequest("A", SamplingParams(max_new_tokens=5, seed=i)), lambda item: None)
        with pytest.raises(QueueFullError, match="decode loop is full: 4 sequences decoding and 2 waiting"):
            worker.submit(SequenceRequest("A", SamplingParams(max_new_tokens=5)), lambda item: None)
    finally:
        spy.resume()
    await spy.wait_final(5)  # the queued ones then run to the end
    assert (await collect(engine, registry, "A", SamplingParams(max_new_tokens=3, seed=9)))[1] == "length"  # room again


async def test_images_run_on_the_pool_and_equal_a_direct_run(engine: Engine, registry: ModelRegistry) -> None:
    served = registry.get("digits")
    assert served.images is not None
    request = ImageRequest(n=5, seed=11)
    (result,) = await engine.generate_images(served, [served.images.prepare(request)])
    (direct,) = served.images.generate([request])
    assert result.pixels.shape == (5, 28, 28) and result.pixels.dtype == np.uint8
    assert np.array_equal(result.pixels, direct.pixels)


async def test_a_failing_model_fails_its_requests_and_the_worker_restarts(
    engine: Engine, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = registry.get("text")
    worker = engine.decode_thread(served)

    def boom() -> list[object]:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(worker.loop, "step", boom)
    with pytest.raises(EngineError, match="generation failed in text: RuntimeError"):
        await collect(engine, registry, "A", SamplingParams(max_new_tokens=5))
    assert worker.failed is not None
    _, reason = await collect(engine, registry, "A", SamplingParams(max_new_tokens=5, seed=2))  # a fresh worker
    assert reason == "length" and engine.decode_thread(served) is not worker


async def test_the_engine_serves_without_the_server(registry: ModelRegistry) -> None:
    """The engine's face alone, with its own defaults (docs/engine.md): no settings from server/."""
    import engine as face

    engine = face.Engine()
    try:
        vae = registry.get("digits")
        pieces = engine.prepare(vae, face.ImageRequest(n=300, seed=5))
        assert [p.n for p in pieces] == [256, 44] and all(p.seed == 5 for p in pieces)
        results = [r for p in pieces for r in await engine.generate_images(vae, [p])]
        assert sum(len(r.pixels) for r in results) == 300
        text = registry.get("text")
        request = face.SequenceRequest("ROMEO:", face.SamplingParams(seed=1, max_new_tokens=5))
        events = [e async for e in engine.stream_text(text, request)]
        assert events[-1].finish_reason == "length" and events[-1].n_generated == 5
        assert engine.room(text) == engine.limits.decode_pending
    finally:
        engine.close()
