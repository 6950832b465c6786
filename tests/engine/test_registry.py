"""Model registry: folder loading, bad files refused alone, names never reach the file system, versions, hot swap."""

from __future__ import annotations

import builtins
import contextlib
import os
import pickle
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import torch
from torch import nn

from engine.errors import ModelFileError, ModelNotFound
from engine.images import ImageGenerator, ImageRequest
from engine.kinds import kind_of
from engine.limits import ImageLimits
from engine.modelfile import export_model, load_model
from engine.models.classifier import ClassifierConfig, DigitClassifier
from engine.models.gan import GANConfig, Generator
from engine.models.transformer import CharTransformer, TransformerConfig
from engine.models.vae import VAE, VAEConfig
from engine.registry import (
    DEFAULT_MODELS_DIR,
    LoadFailure,
    ModelRegistry,
    ServedModel,
    parse_file_name,
)

VOCAB = "\nabc"


def swap(registry: ModelRegistry, name: str, path: Path, *, retire_old: bool = True) -> ServedModel:
    """The file at ``path`` as the next version of ``name``: prepared (loaded, warmed up) while the old
    serves, published, and the older versions unloaded (as the server's model watcher does)."""
    version = max((i.version for i in registry.list_models() if i.name == name), default=0) + 1
    entry = registry.prepare(path, name=name, version=version)
    registry.publish(entry)
    if retire_old:
        for old in range(1, version):
            with contextlib.suppress(ModelNotFound):
                registry.unload(name, old)
    return entry


def tiny_vae(seed: int = 0, num_classes: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig(hidden_dim=8, latent_dim=3, num_classes=num_classes))


def tiny_gan(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(GANConfig(latent_dim=4, arch="mlp", mlp_hidden=8, num_classes=10))


def tiny_text() -> CharTransformer:
    torch.manual_seed(0)
    return CharTransformer(TransformerConfig(vocab_size=len(VOCAB), block_size=8, n_layer=1, n_head=2, d_model=8, d_ff=16))


def export(path: Path, module: nn.Module) -> Path:
    kinds = {VAE: "vae", Generator: "wgan-gp", CharTransformer: "char-transformer", DigitClassifier: "mnist-classifier"}
    vocab = VOCAB if isinstance(module, CharTransformer) else None
    return export_model(path, kinds[type(module)], module, vocab=vocab)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A models folder: a VAE, a conditional GAN, a Transformer, the classifier, and a VAE in a subfolder."""
    root = tmp_path / "models"
    export(root / "vae.safetensors", tiny_vae())
    export(root / "digits.safetensors", tiny_gan())
    export(root / "text.safetensors", tiny_text())
    export(root / "mnist_classifier.safetensors", DigitClassifier(ClassifierConfig(channels=2, feature_dim=4)))
    export(root / "eval" / "nested.safetensors", tiny_vae(1))  # not loaded: the folder is not walked
    return root


def pixels(entry: ServedModel, seed: int = 7) -> np.ndarray:
    assert entry.images is not None
    return entry.images.generate([ImageRequest(n=2, seed=seed)])[0].pixels


# -- loading a folder --------------------------------------------------------------------------------


def test_folder_loads_every_served_model_directly_inside(folder: Path) -> None:
    registry = ModelRegistry(image_limits=ImageLimits(max_n=50))
    report = registry.load_folder(folder)
    assert registry.names() == ["digits", "text", "vae"]
    assert sorted(e.name for e in report.loaded) == ["digits", "text", "vae"]
    assert report.failures == [] and registry.failures == []
    assert report.skipped == [folder / "mnist_classifier.safetensors"]
    infos = {i.name: i for i in registry.list_models()}
    assert set(infos) == {"digits", "text", "vae"}
    vae, gan, text = infos["vae"], infos["digits"], infos["text"]
    assert (vae.kind, vae.version, vae.latest, vae.device, vae.text) == ("vae", 1, True, "cpu", None)
    assert vae.image is not None and vae.image.max_n == 50 and vae.image.image_size == 28 and vae.image.latent_dim == 3
    assert (vae.image.conditional, vae.image.labels_accepted, vae.image.label_range) == (False, False, None)
    assert gan.image is not None and (gan.image.conditional, gan.image.labels_accepted, gan.image.label_range) == (True, True, (0, 9))
    assert text.image is None and text.text is not None and (text.text.vocab, text.text.context_window) == (VOCAB, 8)
    assert vae.parameters == sum(p.numel() for p in tiny_vae().parameters())


def test_served_models_generate_like_the_file(folder: Path) -> None:
    registry = ModelRegistry.from_folder(folder)
    entry = registry.get("vae")
    assert entry.kind == "vae" and entry.path == folder / "vae.safetensors" and entry.images is not None
    direct = ImageGenerator(load_model(folder / "vae.safetensors"))
    np.testing.assert_array_equal(pixels(entry), direct.generate([ImageRequest(n=2, seed=7)])[0].pixels)
    assert registry.get("text").images is None


def test_models_are_warmed_up_at_load_under_inference_mode(folder: Path) -> None:
    seen: list[tuple[str, tuple[int, ...], bool]] = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch._C._get_tracing_state() is not None:  # the CPU graph's trace (engine/image_graph.py) runs no request
            return
        if type(module) in (VAE, Generator, CharTransformer) or module.__class__.__name__ == "MLP2":
            seen.append((type(module).__name__, tuple(args[0].shape), torch.is_inference_mode_enabled()))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        ModelRegistry.from_folder(folder)
    finally:
        handle.remove()
    # an image model's warm-up (and its batch-invariance probe) runs whole tiles, the only shape its
    # forward pass ever sees (engine/images.py)
    gan, vae = kind_of("wgan-gp").tile, kind_of("vae").tile
    assert sorted(set(seen)) == [
        ("CharTransformer", (1, 1), True),
        ("Generator", (gan, 4), True),
        ("MLP2", (vae, 3), True),
        ("VAE", (vae, 3), True),
    ]


def test_a_bad_file_is_refused_with_its_reason_and_the_others_load(folder: Path) -> None:
    (folder / "garbage.safetensors").write_bytes(b"\x01\x02 this is not a model at all")
    (folder / "pickled.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
    good = (folder / "vae.safetensors").read_bytes()
    (folder / "cut.safetensors").write_bytes(good[: len(good) // 2])
    shutil.copy(folder / "vae.safetensors", folder / "Upper.safetensors")
    shutil.copy(folder / "vae.safetensors", folder / "vae@1.safetensors")  # the same name and version as vae.safetensors
    shutil.copy(folder / "vae.safetensors", folder / "old@0.safetensors")
    (folder / "dir.safetensors").mkdir()
    registry = ModelRegistry()
    report = registry.load_folder(folder)
    assert registry.names() == ["digits", "text", "vae"]
    reasons = {f.path.name: f.reason for f in report.failures}
    assert all(isinstance(f, LoadFailure) and f.path.parent == folder for f in report.failures)
    assert reasons.pop("pickled.safetensors") == "is a Python pickle; genserve loads only safetensors (pickle can run code)"
    assert reasons.pop("dir.safetensors") == "is not a regular file"
    assert reasons.pop("old@0.safetensors") == "version '0' is not a positive integer (NAME@V.safetensors, V >= 1)"
    assert reasons.pop("Upper.safetensors").startswith("model name 'Upper' does not match ^[a-z0-9]")
    assert reasons.pop("vae@1.safetensors") == "duplicates vae version 1 of vae.safetensors"
    assert re.match(r"^is not a safetensors file \(or is truncated\): header claims \d+ bytes", reasons.pop("garbage.safetensors"))
    assert re.match(r"^tensor '[^']+': data offsets .* fall outside", reasons.pop("cut.safetensors"))
    assert reasons == {}
    assert registry.failures == report.failures


def test_refusals_are_logged(folder: Path) -> None:
    (folder / "junk.safetensors").write_bytes(b"junk")
    with structlog.testing.capture_logs() as logs:
        ModelRegistry.from_folder(folder)
    refused = [e for e in logs if e["event"] == "model_refused"]
    assert refused == [
        {
            "event": "model_refused",
            "log_level": "error",
            "component": "engine.registry",
            "path": str(folder / "junk.safetensors"),
            "reason": "is not a safetensors file: 4 bytes is shorter than the 8-byte header length",
        }
    ]
    assert sorted(e["name"] for e in logs if e["event"] == "model_loaded") == ["digits", "text", "vae"]


def test_a_failing_warm_up_is_a_load_failure(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: ImageGenerator, requests: Any) -> Any:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(ImageGenerator, "generate", broken)
    registry = ModelRegistry()
    report = registry.load_folder(folder)
    assert registry.names() == ["text"]
    assert {f.path.name: f.reason for f in report.failures} == {
        "digits.safetensors": "RuntimeError: out of memory",
        "vae.safetensors": "RuntimeError: out of memory",
    }


def test_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match=r"models folder .*nowhere does not exist or is not a folder"):
        ModelRegistry().load_folder(tmp_path / "nowhere")
    registry = ModelRegistry()
    report = registry.load_folder(tmp_path)
    assert (report.loaded, report.failures, registry.list_models(), len(registry)) == ([], [], [], 0)


def test_the_classifier_is_not_served_even_when_loaded_by_hand(folder: Path) -> None:
    with pytest.raises(ModelFileError, match=r"mnist_classifier\.safetensors: kind 'mnist-classifier' is not served"):
        ModelRegistry().load(folder / "mnist_classifier.safetensors")


def test_bundled_models_load(repo_root: Path) -> None:
    folder = repo_root / "models"
    present = sorted(p.name for p in folder.glob("*.safetensors"))
    if not {"gan.safetensors", "transformer.safetensors"} <= set(present):
        pytest.skip(f"bundled models missing (training still running?): found {present}")
    assert folder == DEFAULT_MODELS_DIR
    registry = ModelRegistry.from_folder()  # the default folder
    assert registry.failures == []
    assert registry.names() == sorted(p[: -len(".safetensors")] for p in present)  # eval/ classifier is not among them
    gan = registry.get("gan")
    assert gan.kind == "wgan-gp" and gan.images is not None
    assert gan.images.generate([ImageRequest(n=2, seed=0, labels=[3])])[0].pixels.shape == (2, 28, 28)
    text = registry.get("transformer").info.text
    assert text is not None and text.context_window > 0 and "e" in text.vocab


# -- names and versions ----------------------------------------------------------------------------


@pytest.fixture
def registry_with_neighbours(folder: Path) -> ModelRegistry:
    """The folder's models, plus real model files just outside it that a path join would reach."""
    export(folder.parent / "x.safetensors", tiny_vae(2))
    export(folder / "eval" / "b.safetensors", tiny_vae(3))
    return ModelRegistry.from_folder(folder)


@pytest.mark.parametrize(
    "name", ["../x", "x", "../models/vae", "eval/b", "a/b", "/etc/passwd", "vae.safetensors", "./vae", "VAE", "vae@1", "", "vae\x00"]
)
def test_path_traversal_is_never_found_and_never_touches_files(
    registry_with_neighbours: ModelRegistry, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    registry = registry_with_neighbours

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"file system touched: {args!r}")

    with monkeypatch.context() as m:
        for target, attr in [(builtins, "open"), (os, "stat"), (os, "lstat"), (os, "open"), (os, "listdir"), (os, "scandir")]:
            m.setattr(target, attr, forbidden)
        m.setattr("engine.registry.load_model", forbidden)
        m.setattr("engine.registry.read_header", forbidden)
        with pytest.raises(ModelNotFound) as info:
            registry.get(name)
        with pytest.raises(ModelNotFound):
            registry.get(name, 1)
    assert str(info.value) == f"model {name!r} is not served; available: digits, text, vae"


@pytest.mark.parametrize("name", [None, 3, ["vae"], {"vae": 1}, b"vae"])
def test_names_of_other_types_are_not_found(folder: Path, name: object) -> None:
    with pytest.raises(ModelNotFound, match=r" is not served; available: digits, text, vae$"):
        ModelRegistry.from_folder(folder).get(name)


def test_not_found_messages_are_bounded(tmp_path: Path) -> None:
    registry = ModelRegistry()
    with pytest.raises(ModelNotFound) as info:
        registry.get("a" * 100_000)
    assert str(info.value) == "model '" + "a" * 36 + "... is not served; available: none"
    assert isinstance(info.value, LookupError) and info.value.available == []


def test_versions_by_file_name(tmp_path: Path) -> None:
    export(tmp_path / "vae.safetensors", tiny_vae(0))
    export(tmp_path / "vae@3.safetensors", tiny_vae(3))
    export(tmp_path / "gan@2.safetensors", tiny_gan())
    registry = ModelRegistry.from_folder(tmp_path)
    assert registry.get("vae").version == 3 and registry.get("vae", 1).version == 1 and registry.get("vae", 3).version == 3
    assert registry.get("gan").version == 2
    assert [(i.name, i.version, i.latest) for i in registry.list_models()] == [("gan", 2, True), ("vae", 1, False), ("vae", 3, True)]
    assert not np.array_equal(pixels(registry.get("vae", 1)), pixels(registry.get("vae")))
    for bad in (2, 0, -1, True, "1", 1.0, 10**40):
        with pytest.raises(ModelNotFound) as info:
            registry.get("vae", bad)
        assert str(info.value) == f"model 'vae' has no version {bad!r:.17}{'...' if len(repr(bad)) > 20 else ''}; available versions: 1, 3"
    assert len(registry) == 3 and "vae" in registry and "vae@3" not in registry


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [("vae.safetensors", ("vae", 1)), ("vae@12.safetensors", ("vae", 12)), ("a.b-c_d@1.safetensors", ("a.b-c_d", 1))],
)
def test_parse_file_name(file_name: str, expected: tuple[str, int]) -> None:
    assert parse_file_name(Path(file_name)) == expected


@pytest.mark.parametrize(
    ("file_name", "reason"),
    [
        ("vae@.safetensors", "version '' is not a positive integer"),
        ("vae@01.safetensors", "version '01' is not a positive integer"),
        ("vae@v2.safetensors", "version 'v2' is not a positive integer"),
        ("@2.safetensors", "model name '' does not match"),
        ("-x.safetensors", "model name '-x' does not match"),
        ("a" * 65 + ".safetensors", "model name 'a{65}' does not match"),
        ("vae.pt", "model files end in .safetensors"),
    ],
)
def test_bad_file_names(file_name: str, reason: str) -> None:
    with pytest.raises(ModelFileError, match="^" + re.escape(file_name) + ": " + reason):
        parse_file_name(Path(file_name))


# -- hot swap ----------------------------------------------------------------------------------------


def test_swap_keeps_in_flight_work_on_the_old_version(tmp_path: Path) -> None:
    """A forward pass blocked half-way on version 1 while version 2 is swapped in finishes on version 1."""
    old_file = export(tmp_path / "models" / "vae.safetensors", tiny_vae(0))
    new_file = export(tmp_path / "staging" / "vae-retrained.safetensors", tiny_vae(1))
    expected_old = ImageGenerator(load_model(old_file)).generate([ImageRequest(n=2, seed=7)])[0].pixels
    expected_new = ImageGenerator(load_model(new_file)).generate([ImageRequest(n=2, seed=7)])[0].pixels
    assert not np.array_equal(expected_old, expected_new)
    registry = ModelRegistry.from_folder(tmp_path / "models")

    held = registry.get("vae")  # what the engine thread took for its batch
    started, release = threading.Event(), threading.Event()

    def block(module: nn.Module, args: Any) -> None:  # pauses the old decoder mid-batch
        started.set()
        assert release.wait(10)

    assert held.images is not None
    held.images._graph = None  # the eager path, whose module hooks fire (the CPU graph runs none)
    decoder = held.model.module.get_submodule("decoder")
    hook = decoder.register_forward_pre_hook(block)
    out: list[np.ndarray] = []
    worker = threading.Thread(target=lambda: out.append(pixels(held)))
    worker.start()
    assert started.wait(10)

    new = swap(registry, "vae", new_file)  # loads and warms up while the old version is mid-forward
    assert new.version == 2 and registry.get("vae") is new
    assert [(i.name, i.version) for i in registry.list_models() if i.name == "vae"] == [("vae", 2)]  # v1 retired
    with pytest.raises(ModelNotFound, match="has no version 1; available versions: 2"):
        registry.get("vae", 1)
    np.testing.assert_array_equal(pixels(registry.get("vae")), expected_new)  # new lookups: the new version, at once
    assert worker.is_alive()  # ... while the old one is still in flight

    release.set()
    worker.join(10)
    hook.remove()
    np.testing.assert_array_equal(out[0], expected_old)  # finished on the version it started with
    np.testing.assert_array_equal(pixels(held), expected_old)  # and the held entry still works


def test_swap_can_keep_old_versions(folder: Path) -> None:
    registry = ModelRegistry.from_folder(folder)
    export(folder.parent / "v2.safetensors", tiny_vae(5))
    swap(registry, "vae", folder.parent / "v2.safetensors", retire_old=False)
    assert [(i.version, i.latest) for i in registry.list_models() if i.name == "vae"] == [(1, False), (2, True)]
    assert swap(registry, "vae", folder / "vae.safetensors", retire_old=False).version == 3


def test_a_failed_swap_leaves_the_old_version_serving(folder: Path) -> None:
    registry = ModelRegistry.from_folder(folder)
    before = registry.get("vae")
    (folder / "broken.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFileError, match=r"broken\.safetensors: "):
        swap(registry, "vae", folder / "broken.safetensors")
    assert registry.get("vae") is before
    with pytest.raises(ValueError, match=r"^model name '\.\./vae' does not match"):
        swap(registry, "../vae", folder / "vae.safetensors")


def test_load_a_new_file_and_reload_a_version(folder: Path) -> None:
    registry = ModelRegistry.from_folder(folder)
    export(folder / "vae@2.safetensors", tiny_vae(9))
    v2 = registry.load(folder / "vae@2.safetensors")
    assert registry.get("vae") is v2 and registry.get("vae", 1).version == 1
    again = registry.load(folder / "vae@2.safetensors")
    assert registry.get("vae") is again and again is not v2 and len(registry) == 4
    named = registry.load(folder / "vae.safetensors", name="copy", version=5)
    assert registry.get("copy", 5) is named


def test_unload(folder: Path) -> None:
    registry = ModelRegistry.from_folder(folder)
    export(folder / "vae@2.safetensors", tiny_vae(9))
    registry.load(folder / "vae@2.safetensors")
    assert [e.version for e in registry.unload("vae", 2)] == [1 + 1]
    assert registry.get("vae").version == 1
    held = registry.get("digits")
    assert registry.unload("digits") == [held]
    assert "digits" not in registry and pixels(held).shape == (2, 28, 28)
    with pytest.raises(ModelNotFound):
        registry.unload("digits")


def test_concurrent_lookups_during_swaps_always_see_a_whole_model(folder: Path) -> None:
    registry = ModelRegistry.from_folder(folder)
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                entry = registry.get("vae")
                seen.append(entry.version)
                assert entry.images is not None and entry.info.version == entry.version
            except BaseException as e:  # reported below
                errors.append(e)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    for _ in range(3):
        swap(registry, "vae", folder / "vae.safetensors")
    stop.set()
    thread.join(10)
    assert errors == [] and seen and set(seen) <= {1, 2, 3, 4}
    assert seen == sorted(seen)  # a reader never goes back to a retired version
