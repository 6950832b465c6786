"""Step-level continuous batching for iterative models (engine/steps.py), on the test's ``drift`` kind."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.engine import Engine
from engine.errors import InvalidImageRequest, QueueFullError
from engine.images import ImageGenerator, ImageRequest
from engine.limits import EngineLimits, ImageLimits
from engine.modelfile import LoadedModel, load_model
from engine.registry import ModelRegistry
from engine.steps import IterativeImages, StepBatch, StepEvent
from tests.engine.drift_kind import drift_file


@pytest.fixture(scope="module")
def drift(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(drift_file(tmp_path_factory.mktemp("drift") / "drift.safetensors"))


def batch(model: LoadedModel, rows: int = 32, mode: str = "step", pending: int = 64) -> StepBatch:
    return StepBatch(IterativeImages(model, ImageLimits(step_rows=rows)), max_pending=pending, mode=mode)


def run_until_done(b: StepBatch, joins: dict[int, list[ImageRequest]] | None = None) -> tuple[dict[int, StepEvent], int]:
    """Step ``b`` to the end, adding ``joins[k]`` before step k; each request's final event by ``id(request)``
    (two requests may share a seed), and the steps run."""
    finals: dict[int, StepEvent] = {}
    k = 0
    joins = joins or {}
    while b.has_work or any(j >= k for j in joins):
        for r in joins.get(k, []):
            b.add(r)
        for e in b.step():
            if e.finished and e.result is not None:
                finals[id(e.handle.request)] = e
        k += 1
        if k > 10_000:
            raise AssertionError("the batch never emptied")
    return finals, k


def alone(model: LoadedModel, request: ImageRequest) -> StepEvent:
    finals, _ = run_until_done(batch(model), {0: [request]})
    return finals[id(request)]


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 6),
    seed=st.integers(0, 2**63 - 1),
    steps=st.sampled_from([1, 2, 4, 8, 16]),
    guidance=st.one_of(st.none(), st.floats(0.0, 5.0)),
    join_at=st.integers(0, 5),
    neighbours=st.lists(
        st.tuples(st.integers(0, 12), st.integers(1, 8), st.sampled_from([1, 3, 5, 20]), st.integers(10**6, 10**7)), max_size=6
    ),
    mode=st.sampled_from(["step", "request"]),
)
def test_a_request_is_bit_for_bit_the_same_beside_any_neighbours_that_join_and_leave(
    drift: LoadedModel,
    n: int,
    seed: int,
    steps: int,
    guidance: float | None,
    join_at: int,
    neighbours: list[tuple[int, int, int, int]],
    mode: str,
) -> None:
    target = ImageRequest(n=n, seed=seed, steps=steps, guidance=guidance, want_float=True, labels=[1] if seed % 2 else None)
    want = alone(drift, target)
    joins: dict[int, list[ImageRequest]] = {}
    for at, k, s, other_seed in neighbours:
        joins.setdefault(at, []).append(ImageRequest(n=k, seed=other_seed, steps=s))
    joins.setdefault(join_at, []).append(target)
    finals, _ = run_until_done(batch(drift, rows=24, mode=mode), joins)
    got = finals[id(target)]
    assert got.result is not None and want.result is not None
    assert got.result.floats is not None and want.result.floats is not None
    np.testing.assert_array_equal(got.result.floats, want.result.floats)
    np.testing.assert_array_equal(got.result.pixels, want.result.pixels)
    np.testing.assert_array_equal(got.result.labels, want.result.labels)
    assert got.result.step == steps


def test_a_short_request_leaves_at_once_in_step_mode_and_waits_in_request_mode(drift: LoadedModel) -> None:
    """The point of step-level batching: a 2-step request beside a 60-step one is done after its own 2 steps."""
    for mode, want in (("step", 2), ("request", 60 + 2)):
        b = batch(drift, mode=mode)
        b.add(ImageRequest(n=2, seed=1, steps=60))
        b.step()  # the long one is running
        b.add(ImageRequest(n=1, seed=2, steps=2))
        k = 0
        while True:
            k += 1
            if any(e.handle.seed == 2 and e.finished for e in b.step()):
                break
        assert k + 1 == want if mode == "request" else k == want, (mode, k)


def test_previews_come_every_preview_every_steps_then_the_final(drift: LoadedModel) -> None:
    b = batch(drift)
    b.add(ImageRequest(n=2, seed=3, steps=7, preview_every=3, labels=[0, 2]))
    events = [e for _ in range(7) for e in b.step()]
    assert [(e.result.preview, e.result.step, e.finished) for e in events if e.result] == [
        (True, 3, False),
        (True, 6, False),
        (False, 7, True),
    ]
    assert not b.has_work
    labels = events[-1].result.labels if events[-1].result else None
    assert labels is not None and labels.tolist() == [0, 2]


def test_cancel_leaves_at_the_next_step(drift: LoadedModel) -> None:
    b = batch(drift)
    h = b.add(ImageRequest(n=2, seed=4, steps=50))
    b.step()
    assert b.cancel(h)
    events = b.step()
    assert [(e.handle is h, e.result, e.finished) for e in events] == [(True, None, True)]
    assert not b.has_work and not b.cancel(h)


def test_a_waiting_request_is_admitted_only_when_rows_free_up_and_the_queue_is_bounded(drift: LoadedModel) -> None:
    b = batch(drift, rows=8, pending=2)
    requests = [ImageRequest(n=6, seed=5, steps=3), ImageRequest(n=4, seed=6, steps=1), ImageRequest(n=1, seed=7, steps=1)]
    b.add(requests[0])
    b.add(requests[1])  # 6 + 4 > 8 rows: waits
    b.step()
    assert (b.active_count, b.pending_count) == (1, 1)
    b.add(requests[2])
    with pytest.raises(QueueFullError):
        b.add(ImageRequest(n=1, seed=8, steps=1))
    finals, _ = run_until_done(b)
    assert sorted(finals) == sorted(id(r) for r in requests)


@pytest.mark.parametrize(
    ("request_", "field", "message"),
    [
        (ImageRequest(n=1, steps=0), "steps", "steps must be an integer from 1 to 64 (default 8), got 0"),
        (ImageRequest(n=1, steps=65), "steps", "from 1 to 64"),
        (ImageRequest(n=1, guidance=-1.0), "guidance", "guidance must be a number from 0 to 20, got -1.0"),
        (ImageRequest(n=1, guidance=float("nan")), "guidance", "guidance must be a number from 0 to 20"),
        (ImageRequest(n=1, preview_every=-1), "preview_every", "preview_every must be an integer >= 0"),
        (ImageRequest(n=33), "n", "n must be an integer from 1 to 32"),
        (ImageRequest(n=1, labels=[3]), "labels", "outside 0..2"),
    ],
)
def test_bad_iterative_requests_are_refused_naming_the_field(drift: LoadedModel, request_: ImageRequest, field: str, message: str) -> None:
    with pytest.raises(InvalidImageRequest, match=re.escape(message)) as e:
        batch(drift).add(request_)
    assert e.value.field == field


def test_one_shot_models_refuse_steps_naming_the_field(models: dict[str, LoadedModel]) -> None:
    gen = ImageGenerator(models["gan-conv"])
    for request, field in ((ImageRequest(n=1, steps=4), "steps"), (ImageRequest(n=1, guidance=2.0), "guidance")):
        with pytest.raises(InvalidImageRequest, match=f"^{field} is not accepted: model .* is a one-shot wgan-gp model"):
            gen.check(request)


def test_the_engine_streams_an_iterative_model_through_its_decode_thread(drift: LoadedModel, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    drift_file(folder / "drift.safetensors")
    registry = ModelRegistry.from_folder(folder, image_limits=ImageLimits(step_rows=16))
    served = registry.get("drift")
    info = served.info.image
    assert info is not None and info.max_n == 16 and info.steps is not None and (info.steps.low, info.steps.high) == (1, 64)
    engine = Engine(EngineLimits(step_pending=4))

    async def collect() -> list[tuple[bool, int]]:
        return [(r.preview, r.step) async for r in engine.stream_images(served, ImageRequest(n=2, seed=9, steps=4, preview_every=1))]

    try:
        assert asyncio.run(collect()) == [(True, 1), (True, 2), (True, 3), (False, 4)]
        assert engine.room(served) == 4
    finally:
        engine.close()
