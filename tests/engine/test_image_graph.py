"""The CPU graph of the image models (engine/image_graph.py): the eager results bit for bit, latents
drawn inside it, a handful of torch calls a batch, a graph that goes with its model, eager when
tracing fails."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import structlog
import torch
from torch.overrides import TorchFunctionMode

from engine.images import ImageGenerator, ImageRequest
from engine.limits import ImageLimits
from engine.modelfile import LoadedModel, export_model, load_model
from engine.models.vae import VAE, VAEConfig
from engine.registry import ModelRegistry
from tests.engine.image_models import BUILDERS, CONDITIONAL, expected_floats, gen


@pytest.mark.parametrize("name", list(BUILDERS))
def test_the_cpu_graph_gives_the_eager_results_bit_for_bit(models: dict[str, LoadedModel], name: str) -> None:
    """The graph (engine/image_graph.py) serves on the CPU, and every batch it runs equals the
    eager tiles and numpy rounding bit for bit: floats and pixels, whatever the batch's size."""
    graphed = ImageGenerator(models[name], ImageLimits(max_n=16, max_batch=64, tile=4))
    eager = ImageGenerator(models[name], ImageLimits(max_n=16, max_batch=64, tile=4))
    assert graphed.graph() is not None
    eager._graph = None
    for sizes in ([1], [3], [4], [2, 3], [8, 1], [9], [16, 16, 5]):
        requests = [ImageRequest(n=n, seed=100 + i * 7 + n, want_float=i % 2 == 0) for i, n in enumerate(sizes)]
        for a, b in zip(graphed.generate(requests), eager.generate(requests), strict=True):
            np.testing.assert_array_equal(a.pixels, b.pixels)
            assert (a.floats is None) == (b.floats is None)
            if a.floats is not None:
                np.testing.assert_array_equal(a.floats, b.floats)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_latents_drawn_in_the_batch_equal_those_drawn_up_front(models: dict[str, LoadedModel], name: str) -> None:
    """``prepare(draw=False)`` leaves the drawing to ``run``: inside the CPU graph, or eagerly
    without it. Whole requests and pieces of split ones, side by side in one batch, give what
    requests drawn up front give: pixels, floats and drawn labels, bit for bit."""
    g = ImageGenerator(models[name], ImageLimits(max_n=16, max_batch=64, tile=4))
    requests = [ImageRequest(n=1, seed=3), ImageRequest(n=11, seed=2**63 - 1, want_float=True), ImageRequest(n=5, seed=0)]
    expected = g.generate(requests)
    for use_graph in (True, False):
        h = ImageGenerator(models[name], ImageLimits(max_n=16, max_batch=64, tile=4))
        if not use_graph:
            h._graph = None
        chunks = [h.prepare(r, draw=False) for r in requests]
        assert all(c.z is None and c.labels is None for c in chunks)
        pieces = [chunks[0], *chunks[1].split(4), chunks[2]]  # the 11: rows 0-3, 4-7, 8-10
        got = h.run(pieces)
        by_request = [got[:1], got[1:4], got[4:]]
        for want, parts in zip(expected, by_request, strict=True):
            np.testing.assert_array_equal(np.concatenate([p.pixels for p in parts]), want.pixels)
            if want.floats is not None:
                np.testing.assert_array_equal(np.concatenate([p.floats for p in parts if p.floats is not None]), want.floats)
            if name in CONDITIONAL:
                assert want.labels is not None
                np.testing.assert_array_equal(np.concatenate([p.labels for p in parts if p.labels is not None]), want.labels)
            else:
                assert all(p.labels is None for p in parts)


def test_given_labels_are_never_deferred(models: dict[str, LoadedModel]) -> None:
    g = gen(models, "cvae")
    chunk = g.prepare(ImageRequest(n=3, seed=4, labels=[7]), draw=False)
    assert chunk.z is not None and chunk.labels is not None and chunk.labels.tolist() == [7, 7, 7]
    torch.testing.assert_close(g.run([chunk])[0].pixels, g.generate([ImageRequest(n=3, seed=4, labels=[7])])[0].pixels)


class TorchCallCounter(TorchFunctionMode):
    """Counts the torch calls made from Python: each one gives up the GIL and waits to win it back."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(
        self, func: Callable[..., object], types: object, args: tuple[object, ...] = (), kwargs: dict[str, object] | None = None
    ) -> object:
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_a_batch_makes_a_handful_of_torch_calls_from_python_whatever_its_size(models: dict[str, LoadedModel]) -> None:
    """The point of the CPU graph: beside a busy event loop every torch call from Python on the
    engine thread waits for the GIL (up to the 5 ms switch interval), so a batch of 64 one-sample
    requests makes one or two, not one per op and tile (the eager path: dozens)."""
    g = gen(models, "vae")
    assert g.graph() is not None  # built (once) before counting
    for draw, most in ((False, 1), (True, 2)):  # latents drawn in the batch / drawn up front (cat)
        chunks = [g.prepare(ImageRequest(n=1, seed=i), draw=draw) for i in range(64)]
        with TorchCallCounter() as counted:
            g.run(chunks)
        assert len(counted.calls) <= most, counted.calls
    g._graph = None
    with TorchCallCounter() as counted:
        g.run([g.prepare(ImageRequest(n=1, seed=i)) for i in range(64)])
    assert len(counted.calls) > 10  # the eager path, for contrast: the count above is the graph's doing


def test_a_models_graph_goes_with_the_model(tmp_path: Path) -> None:
    """Graphs are kept per model module (shared by its generators), weakly: a retired model
    version's weights and graph are freed with it, not kept by the cache."""
    model = load_model(export_model(tmp_path / "v.safetensors", "vae", VAE(VAEConfig(hidden_dim=8, latent_dim=3))))
    g = ImageGenerator(model, ImageLimits(max_n=4, max_batch=4))
    assert g.graph() is not None and ImageGenerator(model, ImageLimits(max_n=4, max_batch=4)).graph() is g.graph()
    module, weight = weakref.ref(model.module), weakref.ref(next(model.module.parameters()))
    del model, g
    gc.collect()
    assert module() is None and weight() is None


def test_the_graph_rounds_as_numpy_does_at_every_level(models: dict[str, LoadedModel]) -> None:
    """Levels at and around every rounding boundary k/255 +- 0.5/255, and out of range: the graph's
    torch rounding equals the eager numpy one (ImageGenerator._to_uint8) on each."""
    g = gen(models, "vae")
    graph = g.graph()
    assert graph is not None
    k = torch.arange(256, dtype=torch.float32)
    edges = torch.cat([(k + 0.5) / 255, k / 255, torch.tensor([-1.0, -1e-7, 1.0 + 1e-7, 3.0])])
    x = torch.cat([edges, torch.nextafter(edges, torch.tensor(2.0)), torch.nextafter(edges, torch.tensor(-2.0))])
    levels = graph._levels(x)
    np.testing.assert_array_equal(levels.numpy(), g._to_uint8(x.clone(), in_place=True))


def test_a_model_that_cannot_be_traced_runs_eagerly_with_a_warning(models: dict[str, LoadedModel], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("tracing refused")

    model = load_model(export_model(Path(str(models["vae"].path)).with_name("untraceable.safetensors"), "vae", models["vae"].module))
    monkeypatch.setattr(torch.jit, "trace", refuse)
    g = gen({"m": model}, "m")
    with pytest.warns(UserWarning, match=r"image model runs eagerly: no TorchScript graph \(RuntimeError: tracing refused\)"):
        assert g.graph() is None
    (res,) = g.generate([ImageRequest(n=3, seed=5, want_float=True)])
    assert res.floats is not None
    torch.testing.assert_close(torch.from_numpy(res.floats), expected_floats(model, 3, 5))
    # the registry says so in its log when it loads such a model
    other = export_model(Path(str(models["vae"].path)).with_name("untraceable2.safetensors"), "vae", models["vae"].module)
    with structlog.testing.capture_logs() as logs, pytest.warns(UserWarning, match="image model runs eagerly"):
        ModelRegistry().load(other)
    warned = [e for e in logs if e["event"] == "image_graph_unavailable"]
    assert len(warned) == 1 and warned[0]["model"] == "untraceable2" and warned[0]["log_level"] == "warning"
