"""Image generation: per-request seeds whatever the batch (bit for bit), split requests equal whole ones, labels, every refusal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import structlog
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import InvalidImageRequest
from engine.images import SEED_LIMIT, ImageChunk, ImageGenerator, ImageRequest
from engine.kinds import kind_of
from engine.limits import ImageLimits
from engine.modelfile import LoadedModel, export_model, load_model
from engine.models.transformer import CharTransformer, TransformerConfig
from engine.models.vae import VAE, VAEConfig
from engine.registry import ModelRegistry
from tests.engine.image_models import BUILDERS, CONDITIONAL, expected_floats, gen

# -- outputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_outputs_follow_the_documented_recipe(models: dict[str, LoadedModel], name: str) -> None:
    (res,) = gen(models, name).generate([ImageRequest(n=5, seed=123, want_float=True)])
    assert res.pixels.shape == (5, 28, 28) and res.pixels.dtype == np.uint8
    assert res.floats is not None and res.floats.shape == (5, 28, 28) and res.floats.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(res.floats), expected_floats(models[name], 5, 123))
    # uint8 = round to nearest of x * 255, from the float values returned alongside
    np.testing.assert_array_equal(res.pixels, np.clip(np.floor(res.floats * 255 + 0.5), 0, 255).astype(np.uint8))
    assert (res.seed, res.offset, res.total, res.last) == (123, 0, 5, True)
    assert (res.labels is not None) == (name in CONDITIONAL)


def test_floats_only_when_asked(models: dict[str, LoadedModel]) -> None:
    a, b = gen(models, "vae").generate([ImageRequest(n=2, seed=1), ImageRequest(n=3, seed=1, want_float=True)])
    assert a.floats is None and b.floats is not None
    np.testing.assert_array_equal(a.pixels, b.pixels[:2])  # asking for floats does not change the pixels


def test_pixels_of_out_of_range_outputs_are_clamped(models: dict[str, LoadedModel]) -> None:
    g = gen(models, "vae")
    x = torch.tensor([[-0.5, 0.0, 0.001, 0.5, 0.999, 1.0, 7.0]])
    assert g._to_uint8(x.clone(), in_place=True).tolist() == [[0, 0, 0, 128, 255, 255, 255]]
    assert g._to_uint8(x, in_place=False).tolist() == [[0, 0, 0, 128, 255, 255, 255]]
    assert x[0, 3] == 0.5  # not in place: the floats are intact


# -- per-request randomness -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_seed_gives_the_same_samples_whatever_shares_its_batch(models: dict[str, LoadedModel], name: str) -> None:
    g = gen(models, name)
    target = ImageRequest(n=4, seed=42, want_float=True)
    (alone,) = g.generate([target])
    mixed = g.generate([ImageRequest(n=7, seed=1), target, ImageRequest(n=4, seed=42, want_float=True), ImageRequest(n=20, seed=9)])
    for inside in (mixed[1], mixed[2]):  # the same request twice in one batch, at two places
        np.testing.assert_array_equal(inside.pixels, alone.pixels)
        assert inside.floats is not None and alone.floats is not None
        np.testing.assert_array_equal(inside.floats, alone.floats)  # bit for bit: fixed-size tiles
    if name in CONDITIONAL:  # drawn labels come from the request's generator too
        assert inside.labels is not None and alone.labels is not None
        np.testing.assert_array_equal(inside.labels, alone.labels)
    assert not np.array_equal(mixed[0].pixels[:4], alone.pixels)  # a different seed differs


class ModelCallSpy:
    """Wraps a generator's eager model call and records the rows of every call (the CPU graph,
    which runs the same tiles as one call, is switched off: tests below hold it to the eager path)."""

    def __init__(self, g: ImageGenerator) -> None:
        g._graph = None
        self.rows: list[int] = []
        self._inner = g._forward
        g._forward = self

    def __call__(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        self.rows.append(int(z.shape[0]))
        assert labels is None or labels.shape[0] == z.shape[0]
        return self._inner(z, labels)


@pytest.mark.parametrize(("total", "calls"), [(1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_every_model_call_sees_exactly_one_tile(models: dict[str, LoadedModel], total: int, calls: int) -> None:
    """The construction behind batch invariance: whatever the batch, the model only ever sees ``tile`` rows."""
    g = ImageGenerator(models["cvae"], ImageLimits(max_n=16, max_batch=16, tile=4))
    spy = ModelCallSpy(g)
    (res,) = g.generate([ImageRequest(n=total, seed=total, want_float=True)])
    assert spy.rows == [4] * calls
    assert res.pixels.shape == (total, 28, 28) and res.floats is not None and res.floats.shape == (total, 28, 28)
    assert res.labels is not None and res.labels.shape == (total,)
    torch.testing.assert_close(torch.from_numpy(res.floats), expected_floats(models["cvae"], total, total))


def test_tiles_default_by_kind_and_are_checked(models: dict[str, LoadedModel]) -> None:
    assert gen(models, "vae").tile == kind_of("vae").tile and gen(models, "gan-conv").tile == kind_of("wgan-gp").tile
    assert ImageGenerator(models["vae"], ImageLimits(tile=3)).tile == 3
    with pytest.raises(ValueError, match=r"^tile must be >= 1, got 0$"):
        ImageLimits(tile=0)


# The bundled models at their served tile size: their kernels are the ones whose blocking changed
# with the batch size (a 103-sample batch moved floats by 1e-6, a pixel now and then by a level).
BUNDLED = {name: load_model(Path("models") / f"{name}.safetensors") for name in ("vae", "gan")}
_neighbours = st.lists(st.tuples(st.integers(1, 29), st.integers(0, 2**63 - 1)), max_size=4)  # 8 x 29 + 20 rows <= max_batch 256


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["vae", "gan"]),
    n=st.integers(1, 20),
    seed=st.integers(0, 2**63 - 1),
    before=_neighbours,
    after=_neighbours,
)
def test_bundled_models_are_batch_invariant_bit_for_bit(
    name: str, n: int, seed: int, before: list[tuple[int, int]], after: list[tuple[int, int]]
) -> None:
    """A request alone and among any neighbours, at any place in the batch: the same floats, bit for bit."""
    if name == "gan":  # ~2 ms a row on one core: keep each example to a few tiles
        before, after = before[:2], after[:1]
    g = ImageGenerator(BUNDLED[name], ImageLimits(max_n=64, max_batch=256))
    target = ImageRequest(n=n, seed=seed, want_float=True)
    (alone,) = g.generate([target])
    others = [ImageRequest(n=k, seed=s) for k, s in before + after]
    batch = g.generate([*others[: len(before)], target, *others[len(before) :]])
    inside = batch[len(before)]
    assert inside.floats is not None and alone.floats is not None
    np.testing.assert_array_equal(inside.floats, alone.floats)
    np.testing.assert_array_equal(inside.pixels, alone.pixels)
    np.testing.assert_array_equal(inside.labels, alone.labels)


def test_no_seed_draws_one_and_reports_it(models: dict[str, LoadedModel]) -> None:
    g = gen(models, "gan-conv")
    a, b = g.generate([ImageRequest(n=3), ImageRequest(n=3)])
    assert 0 <= a.seed < SEED_LIMIT and a.seed != b.seed
    (again,) = g.generate([ImageRequest(n=3, seed=a.seed)])
    np.testing.assert_array_equal(again.pixels, a.pixels)


# -- splitting -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cvae", "gan-conv"])
def test_split_request_equals_the_whole_one(models: dict[str, LoadedModel], name: str) -> None:
    request = ImageRequest(n=10, seed=5, want_float=True)
    (whole,) = gen(models, name, max_batch=10).generate([request])
    g = gen(models, name, max_batch=4)
    parts = [g.run([c])[0] for c in g.prepare(request).split(4)]  # the processor's split, the batcher's runs
    assert [(p.offset, len(p.pixels), p.total, p.last) for p in parts] == [(0, 4, 10, False), (4, 4, 10, False), (8, 2, 10, True)]
    np.testing.assert_array_equal(np.concatenate([p.pixels for p in parts]), whole.pixels)
    assert whole.floats is not None
    np.testing.assert_array_equal(np.concatenate([p.floats for p in parts if p.floats is not None]), whole.floats)
    if name in CONDITIONAL:
        assert whole.labels is not None
        np.testing.assert_array_equal(np.concatenate([p.labels for p in parts if p.labels is not None]), whole.labels)


def test_chunks_of_different_requests_share_a_batch(models: dict[str, LoadedModel]) -> None:
    """The batcher's way: split big requests, pack chunks of several into one forward pass."""
    g = gen(models, "cvae", max_batch=8)
    big, small = ImageRequest(n=11, seed=3), ImageRequest(n=2, seed=4, labels=[7])
    big_chunks = g.prepare(big).split(8)
    results = g.run([big_chunks[1], g.prepare(small)]) + g.run([big_chunks[0]])
    by_offset = sorted((r for r in results if r.request is big), key=lambda r: r.offset)
    (whole,) = gen(models, "cvae", max_batch=16).generate([big])
    np.testing.assert_array_equal(np.concatenate([r.pixels for r in by_offset]), whole.pixels)
    (small_alone,) = g.generate([small])
    np.testing.assert_array_equal(results[1].pixels, small_alone.pixels)


def test_a_batch_larger_than_max_batch_is_refused(models: dict[str, LoadedModel]) -> None:
    g = gen(models, "vae", max_batch=4)
    chunks = [g.prepare(ImageRequest(n=3, seed=1)), g.prepare(ImageRequest(n=2, seed=2))]
    with pytest.raises(ValueError, match=r"^a batch holds at most 4 samples, got 5: split the chunks first$"):
        g.run(chunks)
    assert g.run([]) == []


def test_split_sizes() -> None:
    chunk = ImageChunk(ImageRequest(n=5), seed=0, z=torch.zeros(5, 2), labels=None, offset=0, total=5)
    assert [(c.offset, c.n) for c in chunk.split(2)] == [(0, 2), (2, 2), (4, 1)]
    assert chunk.split(5) == [chunk]
    with pytest.raises(ValueError, match="chunk size must be >= 1"):
        chunk.split(0)


# -- labels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONDITIONAL)
def test_given_labels_are_used(models: dict[str, LoadedModel], name: str) -> None:
    labels = [0, 9, 3, 3]
    (res,) = gen(models, name).generate([ImageRequest(n=4, seed=8, labels=labels, want_float=True)])
    assert res.labels is not None and res.labels.tolist() == labels
    assert res.floats is not None
    torch.testing.assert_close(torch.from_numpy(res.floats), expected_floats(models[name], 4, 8, labels))
    (other,) = gen(models, name).generate([ImageRequest(n=4, seed=8, labels=[1, 1, 1, 1])])
    assert not np.array_equal(other.pixels, res.pixels)  # the label matters


def test_one_label_is_used_for_every_sample(models: dict[str, LoadedModel]) -> None:
    g = gen(models, "cvae")
    broadcast, spelled = g.generate([ImageRequest(n=3, seed=2, labels=[7]), ImageRequest(n=3, seed=2, labels=[7, 7, 7])])
    assert broadcast.labels is not None and broadcast.labels.tolist() == [7, 7, 7]
    np.testing.assert_array_equal(broadcast.pixels, spelled.pixels)


def test_labels_as_numpy_and_empty_means_none(models: dict[str, LoadedModel]) -> None:
    g = gen(models, "cvae")
    a, b = g.generate([ImageRequest(n=2, seed=3, labels=np.array([4, 5], dtype=np.uint8)), ImageRequest(n=2, seed=3, labels=[4, 5])])
    np.testing.assert_array_equal(a.pixels, b.pixels)
    empty, absent = g.generate([ImageRequest(n=2, seed=3, labels=[]), ImageRequest(n=2, seed=3)])
    np.testing.assert_array_equal(empty.pixels, absent.pixels)
    (unconditional,) = gen(models, "vae").generate([ImageRequest(n=1, seed=1, labels=())])  # empty: no labels given
    assert unconditional.labels is None


def test_drawn_labels_are_uniform_over_the_classes(models: dict[str, LoadedModel]) -> None:
    (res,) = gen(models, "cvae", max_n=1000, max_batch=1000).generate([ImageRequest(n=1000, seed=11)])
    assert res.labels is not None
    counts = np.bincount(res.labels, minlength=10)
    assert len(counts) == 10 and counts.min() > 60  # 100 expected per class; 60 is > 4 sigma away


# -- validation: every refusal, its field and its exact message ---------------------------------------

INVALID: list[tuple[str, ImageRequest, str, str]] = [
    ("vae", ImageRequest(n=0, seed=1), "n", "n must be an integer from 1 to 64, got 0"),
    ("vae", ImageRequest(n=65, seed=1), "n", "n must be an integer from 1 to 64, got 65"),
    ("vae", ImageRequest(n=-3, seed=1), "n", "n must be an integer from 1 to 64, got -3"),
    ("vae", ImageRequest(n=2.0, seed=1), "n", "n must be an integer from 1 to 64, got 2.0"),  # type: ignore[arg-type]
    ("vae", ImageRequest(n=True, seed=1), "n", "n must be an integer from 1 to 64, got True"),
    ("vae", ImageRequest(n=10**50, seed=1), "n", "n must be an integer from 1 to 64, got 1" + "0" * 36 + "..."),
    ("vae", ImageRequest(n=1, seed=-1), "seed", "seed must be an integer from 0 to 2**63-1, got -1"),
    ("vae", ImageRequest(n=1, seed=2**63), "seed", "seed must be an integer from 0 to 2**63-1, got 9223372036854775808"),
    ("vae", ImageRequest(n=1, seed="7"), "seed", "seed must be an integer from 0 to 2**63-1, got '7'"),  # type: ignore[arg-type]
    ("vae", ImageRequest(n=1, seed=1, labels=[3]), "labels", "model 'vae' is unconditional: labels are not accepted"),
    ("cvae", ImageRequest(n=2, seed=1, labels=[3, 10]), "labels", "label 10 at index 1 is outside 0..9"),
    ("cvae", ImageRequest(n=3, seed=1, labels=[0, -1, 99]), "labels", "label -1 at index 1 is outside 0..9"),
    (
        "cvae",
        ImageRequest(n=3, seed=1, labels=[1, 2]),
        "labels",
        "labels has 2 entries, fewer than the 3 samples (repeat them to cycle them); send 3 (one per sample) or 1 (used for every sample)",
    ),
    (
        "cvae",
        ImageRequest(n=4, seed=1, labels=list(range(10))),
        "labels",
        "labels has 10 entries, more than the 4 samples; send 4 (one per sample) or 1 (used for every sample)",
    ),
    ("cvae", ImageRequest(n=2, seed=1, labels=[1.0, 2.0]), "labels", "labels must be integers, got [1.0, 2.0]"),  # type: ignore[list-item]
    ("cvae", ImageRequest(n=2, seed=1, labels=[True, False]), "labels", "labels must be integers, got [True, False]"),
    ("cvae", ImageRequest(n=1, seed=1, labels=[2**70]), "labels", "labels must be integers, got [1180591620717411303424]"),
    ("cvae", ImageRequest(n=2, seed=1, labels="12"), "labels", "labels must be integers, got '12'"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("name", "request_", "field", "message"), INVALID, ids=[f"{c[2]}-{i}" for i, c in enumerate(INVALID)])
def test_invalid_requests_are_refused_with_exact_messages(
    models: dict[str, LoadedModel], name: str, request_: ImageRequest, field: str, message: str
) -> None:
    with pytest.raises(InvalidImageRequest) as info:
        gen(models, name).prepare(request_)
    assert str(info.value) == message
    assert info.value.field == field
    assert isinstance(info.value, ValueError)  # the server maps ValueErrors of requests to INVALID_ARGUMENT


def test_huge_inputs_are_not_echoed(models: dict[str, LoadedModel]) -> None:
    with pytest.raises(InvalidImageRequest) as info:
        gen(models, "vae").prepare(ImageRequest(n=10**5000, seed=1))  # too many digits even to print
    assert str(info.value) == "n must be an integer from 1 to 64, got <int too large to show>"


def test_edges_are_accepted(models: dict[str, LoadedModel]) -> None:
    g = gen(models, "cvae")
    for request in (ImageRequest(n=64, seed=0), ImageRequest(n=1, seed=2**63 - 1, labels=[9]), ImageRequest(n=1, seed=0, labels=[0])):
        assert g.prepare(request).n == request.n


def test_limits_and_kinds_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_n, max_batch and step_rows must be >= 1"):
        ImageLimits(max_n=0)
    text = CharTransformer(TransformerConfig(vocab_size=3, block_size=4, n_layer=1, n_head=1, d_model=4, d_ff=8))
    model = load_model(export_model(tmp_path / "t.safetensors", "char-transformer", text, vocab="abc"))
    with pytest.raises(ValueError, match=r"^t: a char-transformer is not a one-shot image model"):
        ImageGenerator(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_gpu_gives_the_cpu_pixels_to_rounding(models: dict[str, LoadedModel]) -> None:
    cpu = models["cvae"]
    gpu = load_model(cpu.path, "cuda")
    request = ImageRequest(n=16, seed=3, want_float=True)
    (a,) = ImageGenerator(cpu).generate([request])
    (b,) = ImageGenerator(gpu).generate([request])
    assert a.floats is not None and b.floats is not None
    np.testing.assert_allclose(a.floats, b.floats, atol=1e-5)
    assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).max() <= 1


# -- batch invariance, checked at load ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_the_tiny_models_are_batch_invariant_here(models: dict[str, LoadedModel], name: str) -> None:
    assert gen(models, name).batch_invariant()


def test_a_forward_that_depends_on_a_rows_place_is_caught(models: dict[str, LoadedModel]) -> None:
    g = gen(models, "vae")
    plain = g._forward

    def by_place(z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:  # row i gets i * 1e-3 added
        return plain(z, labels) + torch.arange(z.shape[0], dtype=torch.float32)[:, None] * 1e-3

    g._forward = by_place
    assert not g.batch_invariant()


def test_the_registry_warns_of_a_model_that_is_not_batch_invariant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = export_model(tmp_path / "narrow.safetensors", "vae", VAE(VAEConfig(hidden_dim=8, latent_dim=3)))
    monkeypatch.setattr(ImageGenerator, "batch_invariant", lambda self: False)
    with structlog.testing.capture_logs() as logs:
        ModelRegistry().load(path)
    warned = [e for e in logs if e["event"] == "batch_invariance_not_held"]
    assert len(warned) == 1 and warned[0]["model"] == "narrow" and warned[0]["log_level"] == "warning"
    assert "place in a batch" in warned[0]["detail"]
