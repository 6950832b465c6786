"""Model files: exact round trips, and every malformed file refused with its own message naming the file."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.errors import ModelFileError
from engine.kinds import kind_of
from engine.modelfile import (
    MAX_HEADER_BYTES,
    export_model,
    load_model,
    read_header,
)
from engine.models.classifier import ClassifierConfig, DigitClassifier
from engine.models.gan import GANConfig, Generator
from engine.models.transformer import CharTransformer, TransformerConfig
from engine.models.vae import VAE, VAEConfig
from tests.engine.model_files import PickleCanary, expect, save_st, tiny_vae

VOCAB = "\n !abcde"

# -- helpers ----------------------------------------------------------------------------------


def tiny_transformer() -> CharTransformer:
    return CharTransformer(TransformerConfig(vocab_size=len(VOCAB), block_size=8, n_layer=1, n_head=2, d_model=8, d_ff=16))


def meta(kind: str, config: Any, **extra: str) -> dict[str, str]:
    out = {"kind": kind, "format_version": "1", "config": json.dumps(config)}
    out.update(extra)
    return out


def vae_file(path: Path, tensors: dict[str, torch.Tensor] | None = None, **meta_overrides: str) -> Path:
    """A safetensors file shaped like a tiny VAE's, with metadata and tensors to spoil."""
    module = tiny_vae()
    if tensors is None:
        tensors = {k: v.contiguous() for k, v in module.state_dict().items()}
    metadata = meta("vae", json.loads(json.dumps(module.config.__dict__)))
    metadata.update(meta_overrides)
    return save_st(path, tensors, metadata)


def raw_file(path: Path, header: Any, data: bytes = b"") -> Path:
    """A file with a hand-written safetensors header (whatever JSON) and data section."""
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


# -- round trips ------------------------------------------------------------------------------


def _cases() -> list[tuple[str, Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor], str | None]]:
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    zg = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, len(VOCAB), (2, 8), generator=torch.Generator().manual_seed(0))
    images = torch.rand(3, 784, generator=torch.Generator().manual_seed(0))
    return [
        ("vae", tiny_vae, lambda m: m.decode(z), None),
        ("vae", lambda: tiny_vae(10), lambda m: m.decode(z, torch.arange(5)), None),
        ("wgan-gp", lambda: Generator(GANConfig(latent_dim=8, arch="mlp", mlp_hidden=16)), lambda m: m(zg), None),
        ("wgan-gp", lambda: Generator(GANConfig(latent_dim=8, arch="conv", width=4)), lambda m: m(zg), None),
        (
            "wgan-gp",
            lambda: Generator(GANConfig(latent_dim=8, arch="mlp", mlp_hidden=16, num_classes=10)),
            lambda m: m(zg, torch.arange(5)),
            None,
        ),
        ("char-transformer", tiny_transformer, lambda m: m(ids), VOCAB),
        (
            "char-transformer",
            lambda: CharTransformer(
                TransformerConfig(vocab_size=len(VOCAB), block_size=8, n_layer=2, n_head=2, d_model=8, d_ff=16, block="original")
            ),
            lambda m: m(ids),
            VOCAB,
        ),
        ("mnist-classifier", lambda: DigitClassifier(ClassifierConfig(channels=2, feature_dim=8)), lambda m: m(images), None),
    ]


@pytest.mark.parametrize(
    ("kind", "build", "run", "vocab"),
    _cases(),
    ids=["vae", "vae-conditional", "gan-mlp", "gan-conv", "gan-conditional", "transformer-gpt2", "transformer-seed", "classifier"],
)
def test_export_then_load_is_exact(
    tmp_path: Path, kind: str, build: Callable[[], nn.Module], run: Callable[[nn.Module], torch.Tensor], vocab: str | None
) -> None:
    torch.manual_seed(0)
    module = build().eval()
    with torch.no_grad():  # non-trivial weights everywhere (biases start at 0 in some inits)
        for p in module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    training = {"best_epoch": 3, "best_val_loss": 1.25}
    path = export_model(tmp_path / "sub" / "model.safetensors", kind, module, vocab=vocab, training=training)
    assert path == tmp_path / "sub" / "model.safetensors"
    assert not (tmp_path / "sub" / "model.safetensors.tmp").exists()

    loaded = load_model(path)
    assert loaded.kind == kind
    assert loaded.config == module.config
    assert loaded.vocab == vocab
    assert loaded.training == training
    assert loaded.name == "model"
    assert not loaded.module.training
    assert isinstance(loaded.module, kind_of(kind).module_cls)
    original, reloaded = module.state_dict(), loaded.module.state_dict()
    assert original.keys() == reloaded.keys()
    for name in original:
        assert torch.equal(original[name], reloaded[name]), name
    with torch.no_grad():
        assert torch.equal(run(module), run(loaded.module))


def test_transformer_head_is_stored_once(tmp_path: Path) -> None:
    path = export_model(tmp_path / "t.safetensors", "char-transformer", tiny_transformer(), vocab=VOCAB)
    header, metadata = read_header(path)
    assert "tok_emb.weight" in header
    assert not [n for n in header if "head" in n]
    assert json.loads(metadata["vocab"]) == VOCAB
    assert metadata["format_version"] == "1"


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_exported_file_mode_follows_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    before = os.umask(umask)
    try:
        path = export_model(tmp_path / "m.safetensors", "vae", tiny_vae())
    finally:
        os.umask(before)
    assert path.stat().st_mode & 0o777 == mode  # safetensors alone writes 0600 whatever the umask


def test_export_refuses_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^unknown model kind 'diffusion' \(known: \[.*'vae'.*\]\)$"):
        export_model(tmp_path / "m.safetensors", "diffusion", tiny_vae())
    assert not list(tmp_path.iterdir())


# -- files that are not safetensors ---------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(ModelFileError, match=expect(path, r"cannot be read: No such file or directory$")):
        load_model(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=expect(tmp_path, r"cannot be read: ")):
        load_model(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(
        ModelFileError, match=expect(path, r"is not a safetensors file: 0 bytes is shorter than the 8-byte header length$")
    ) as info:
        load_model(path)
    assert info.value.path == str(path)
    assert info.value.tensor is None


def test_truncated_in_data(tmp_path: Path) -> None:
    good = export_model(tmp_path / "good.safetensors", "vae", tiny_vae())
    data = good.read_bytes()
    path = tmp_path / "half.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ModelFileError, match=expect(path, r"data offsets \[\d+, \d+\] fall outside the \d+ data bytes \(truncated\?\)$", any_tensor=True)
    ) as info:
        load_model(path)
    assert info.value.tensor is not None
    assert f"tensor {info.value.tensor!r}" in str(info.value)


def test_truncated_in_header(tmp_path: Path) -> None:
    good = export_model(tmp_path / "good.safetensors", "vae", tiny_vae())
    path = tmp_path / "stub.safetensors"
    path.write_bytes(good.read_bytes()[:40])
    with pytest.raises(
        ModelFileError, match=expect(path, r"is not a safetensors file \(or is truncated\): header claims \d+ bytes, file has 40$")
    ):
        load_model(path)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.safetensors"
    path.write_text("this is not a safetensors file, just some notes\n" * 3)
    with pytest.raises(
        ModelFileError, match=expect(path, r"is not a safetensors file \(or is truncated\): header claims \d+ bytes, file has 144$")
    ):
        load_model(path)


def test_random_bytes_with_plausible_length(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(struct.pack("<Q", 16) + bytes(range(200, 216)))
    with pytest.raises(ModelFileError, match=expect(path, r"is not a safetensors file: header is not JSON \(")):
        load_model(path)


def test_header_not_an_object(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "list.safetensors", [1, 2, 3])
    with pytest.raises(ModelFileError, match=expect(path, r"is not a safetensors file: header is not a JSON object$")):
        load_model(path)


def test_header_claiming_gigabytes(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 5 * 2**30) + b"{}")
    with pytest.raises(
        ModelFileError, match=expect(path, r"is not a safetensors file \(or is truncated\): header claims 5368709120 bytes, file has 10$")
    ):
        load_model(path)
    assert MAX_HEADER_BYTES < 5 * 2**30


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_is_refused_unread(tmp_path: Path, protocol: int) -> None:
    # the payload is live: unpickling it would create a folder
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps({"w": PickleCanary(probe)}, protocol=protocol))
    assert probe.is_dir()

    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0], "boom": PickleCanary(marker)}, protocol=protocol))
    with pytest.raises(ModelFileError, match=expect(path, r"is a Python pickle; genserve loads only safetensors \(pickle can run code\)$")):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 1])
def test_old_pickle_protocols_are_refused_unread(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"boom": PickleCanary(marker)}, protocol=protocol))
    with pytest.raises(ModelFileError, match=expect(path, r"is not a safetensors file")):
        load_model(path)
    assert not marker.exists()


def test_torch_save_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(tiny_vae().state_dict(), path)
    with pytest.raises(
        ModelFileError, match=expect(path, r"is a zip archive \(a torch.save checkpoint\?\); genserve loads only safetensors$")
    ):
        load_model(path)


def test_legacy_torch_save_is_refused_as_pickle(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(tiny_vae().state_dict(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelFileError, match=expect(path, r"is a Python pickle")):
        load_model(path)


def _header_length(path: Path) -> int:
    return int(struct.unpack("<Q", path.read_bytes()[:8])[0])


@pytest.mark.parametrize("target", [0x0280, 0x0380, 0x0480, 0x0580, 0x0680, 0x0288])
def test_header_length_that_looks_like_pickle_magic(tmp_path: Path, target: int) -> None:
    """A valid model file whose header is 640/896/1152/1408 bytes starts with b'\\x80\\x02'..b'\\x80\\x05'."""
    module = Generator(GANConfig(latent_dim=2, arch="mlp", mlp_hidden=2))
    path = tmp_path / "m.safetensors"
    export_model(path, "wgan-gp", module, training={"note": ""})
    raw = path.read_bytes()[8 : 8 + _header_length(path)].rstrip(b" ")
    assert len(raw) <= target, "tiny generator header grew past the targets"
    export_model(path, "wgan-gp", module, training={"note": "x" * (target - len(raw))})
    assert _header_length(path) == target
    assert load_model(path).training == {"note": "x" * (target - len(raw))}


# -- safetensors files that are not (valid) genserve models ----------------------------------


def test_plain_safetensors_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_st(path, {"w": torch.zeros(2)})
    with pytest.raises(ModelFileError, match=expect(path, r"metadata has no 'kind': not a genserve model file$")):
        load_model(path)


@pytest.mark.parametrize("key", ["format_version", "config"])
def test_metadata_key_missing(tmp_path: Path, key: str) -> None:
    m = meta("vae", {})
    del m[key]
    path = tmp_path / "m.safetensors"
    save_st(path, {"w": torch.zeros(2)}, m)
    with pytest.raises(ModelFileError, match=expect(path, rf"metadata has no '{key}': not a genserve model file$")):
        load_model(path)


def test_metadata_values_must_be_strings(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "m.safetensors", {"__metadata__": {"kind": 5}})
    with pytest.raises(ModelFileError, match=expect(path, r"metadata must map strings to strings$")):
        load_model(path)


def test_unknown_kind(tmp_path: Path) -> None:
    path = vae_file(tmp_path / "m.safetensors", kind="diffusion")
    with pytest.raises(
        ModelFileError,
        # the known kinds: the built-in ones, and any a test registered (its kinds are this process's)
        match=expect(
            path, r"unknown model kind 'diffusion' \(known: \['char-transformer', .*'flow', 'mnist-classifier', 'vae', 'wgan-gp'\]\)$"
        ),
    ):
        load_model(path)


@pytest.mark.parametrize("version", ["2", "0", "1.0", "v1", ""])
def test_unsupported_format_version(tmp_path: Path, version: str) -> None:
    path = vae_file(tmp_path / "m.safetensors", format_version=version)
    with pytest.raises(
        ModelFileError, match=expect(path, re.escape(f"format version {version!r} is not supported (this genserve reads version 1)") + "$")
    ):
        load_model(path)


def test_missing_tensor(tmp_path: Path) -> None:
    tensors = dict(tiny_vae().state_dict())
    del tensors["decoder.out.bias"]
    path = vae_file(tmp_path / "m.safetensors", tensors)
    with pytest.raises(ModelFileError, match=expect(path, r"missing tensor$", tensor="decoder.out.bias")) as info:
        load_model(path)
    assert info.value.tensor == "decoder.out.bias"


def test_several_missing_tensors(tmp_path: Path) -> None:
    tensors = dict(tiny_vae().state_dict())
    del tensors["encoder.hidden.weight"], tensors["decoder.out.bias"], tensors["decoder.out.weight"]
    path = vae_file(tmp_path / "m.safetensors", tensors)
    with pytest.raises(ModelFileError, match=expect(path, r"missing tensor \(and 2 more\)$", tensor="encoder.hidden.weight")):
        load_model(path)


def test_unexpected_tensor(tmp_path: Path) -> None:
    tensors = dict(tiny_vae().state_dict(), **{"decoder.extra.weight": torch.zeros(3)})
    path = vae_file(tmp_path / "m.safetensors", tensors)
    with pytest.raises(ModelFileError, match=expect(path, r"unexpected tensor for a vae$", tensor="decoder.extra.weight")):
        load_model(path)


def test_wrong_shape(tmp_path: Path) -> None:
    tensors = dict(tiny_vae().state_dict())
    tensors["decoder.out.weight"] = tensors["decoder.out.weight"].t().contiguous()  # (784, 8) -> (8, 784)
    path = vae_file(tmp_path / "m.safetensors", tensors)
    with pytest.raises(
        ModelFileError,
        match=expect(path, r"shape \[8, 784\] does not match \[784, 8\] of the declared architecture$", tensor="decoder.out.weight"),
    ):
        load_model(path)


def test_wrong_dtype(tmp_path: Path) -> None:
    tensors = dict(tiny_vae().state_dict())
    tensors["encoder.out.bias"] = tensors["encoder.out.bias"].half()
    path = vae_file(tmp_path / "m.safetensors", tensors)
    with pytest.raises(ModelFileError, match=expect(path, r"dtype F16 is not supported \(expected F32\)$", tensor="encoder.out.bias")):
        load_model(path)


def test_tensor_bytes_disagree_with_shape(tmp_path: Path) -> None:
    """A header whose offsets fit the file but not the declared shape: safetensors refuses, we name the file."""
    module = VAE(VAEConfig(input_dim=1, hidden_dim=1, latent_dim=1))
    shapes = {k: list(v.shape) for k, v in module.state_dict().items()}
    header: dict[str, Any] = {"__metadata__": meta("vae", module.config.__dict__)}
    for name, shape in shapes.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}  # all claim the same 4 bytes
    header["encoder.out.weight"]["data_offsets"] = [0, 4]  # shape [2, 1] needs 8
    path = raw_file(tmp_path / "m.safetensors", header, b"\0" * 4)
    with pytest.raises(ModelFileError, match=expect(path, r"safetensors could not read the tensors: ")):
        load_model(path)


# -- configs ----------------------------------------------------------------------------------


def _vae_config(**changes: Any) -> dict[str, Any]:
    return dict(tiny_vae().config.__dict__, **changes)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (_vae_config(colour="red"), r"config has unknown field\(s\) \['colour'\] for VAEConfig$"),
        (_vae_config(hidden_dim="8"), r"config field 'hidden_dim' must be a non-negative integer, got '8'$"),
        (_vae_config(hidden_dim=8.0), r"config field 'hidden_dim' must be a non-negative integer, got 8.0$"),
        (_vae_config(hidden_dim=-8), r"config field 'hidden_dim' must be a non-negative integer, got -8$"),
        (_vae_config(latent_dim=True), r"config field 'latent_dim' must be a non-negative integer, got True$"),
        (_vae_config(output_std="wide"), r"config field 'output_std' must be a number, got 'wide'$"),
        (_vae_config(output_std=False), r"config field 'output_std' must be a number, got False$"),
        (_vae_config(activation="gelu"), r"config field 'activation' is 'gelu', expected one of \['tanh', 'relu'\]$"),
        (_vae_config(likelihood=None), r"config field 'likelihood' is None, expected one of \['bernoulli', 'gaussian'\]$"),
        ([8, 3], r"metadata 'config' must be a JSON object, got list$"),
    ],
    ids=[
        "unknown-field",
        "str-for-int",
        "float-for-int",
        "negative-int",
        "bool-for-int",
        "str-for-float",
        "bool-for-float",
        "literal",
        "null-literal",
        "not-object",
    ],
)
def test_bad_config(tmp_path: Path, config: Any, reason: str) -> None:
    path = vae_file(tmp_path / "m.safetensors", config=json.dumps(config))
    with pytest.raises(ModelFileError, match=expect(path, reason)):
        load_model(path)


def test_config_accepts_int_for_float(tmp_path: Path) -> None:
    path = vae_file(tmp_path / "m.safetensors", config=json.dumps(_vae_config(output_std=1)))
    loaded = load_model(path)
    assert loaded.config.output_std == 1.0
    assert isinstance(loaded.config.output_std, float)


def test_config_not_json(tmp_path: Path) -> None:
    path = vae_file(tmp_path / "m.safetensors", config="{hidden_dim: 8")
    with pytest.raises(ModelFileError, match=expect(path, r"metadata 'config' is not valid JSON \(")):
        load_model(path)


def test_training_metadata_not_json(tmp_path: Path) -> None:
    path = vae_file(tmp_path / "m.safetensors", training="not json")
    with pytest.raises(ModelFileError, match=expect(path, r"metadata 'training' is not valid JSON \(")):
        load_model(path)


def test_config_that_builds_no_valid_module(tmp_path: Path) -> None:
    cfg = dict(tiny_transformer().config.__dict__, n_head=3)  # d_model 8 is not divisible by 3
    path = tmp_path / "m.safetensors"
    save_st(path, {"w": torch.zeros(1)}, meta("char-transformer", cfg, vocab=json.dumps(VOCAB)))
    with pytest.raises(
        ModelFileError, match=expect(path, r"config does not describe a valid char-transformer: d_model 8 is not divisible by n_head 3$")
    ):
        load_model(path)


def test_absurd_config_costs_no_memory(tmp_path: Path) -> None:
    """A header may declare a gigantic architecture; the skeleton is built on 'meta' and the file is refused."""
    cfg = _vae_config(hidden_dim=10**9)
    path = vae_file(tmp_path / "m.safetensors", config=json.dumps(cfg))
    with pytest.raises(
        ModelFileError,
        match=expect(
            path, r"shape \[8, 784\] does not match \[1000000000, 784\] of the declared architecture$", tensor="encoder.hidden.weight"
        ),
    ):
        load_model(path)


# -- text models ------------------------------------------------------------------------------


def _transformer_file(path: Path, **meta_overrides: str | None) -> Path:
    module = tiny_transformer()
    merged: dict[str, str | None] = {**meta("char-transformer", module.config.__dict__, vocab=json.dumps(VOCAB)), **meta_overrides}
    m = {k: v for k, v in merged.items() if v is not None}  # None drops a key
    return save_st(path, {k: v.contiguous() for k, v in module.state_dict().items()}, m)


def test_transformer_file_helper_is_valid(tmp_path: Path) -> None:
    assert load_model(_transformer_file(tmp_path / "t.safetensors")).vocab == VOCAB


def test_vocab_length_mismatch(tmp_path: Path) -> None:
    path = _transformer_file(tmp_path / "t.safetensors", vocab=json.dumps(VOCAB[:-1]))
    with pytest.raises(
        ModelFileError, match=expect(path, rf"vocab has {len(VOCAB) - 1} characters but config.vocab_size is {len(VOCAB)}$")
    ):
        load_model(path)


def test_vocab_with_repeated_characters(tmp_path: Path) -> None:
    path = _transformer_file(tmp_path / "t.safetensors", vocab=json.dumps("aabcdefg"))
    with pytest.raises(ModelFileError, match=expect(path, r"metadata 'vocab' must be a string of distinct characters$")):
        load_model(path)


def test_vocab_not_a_string(tmp_path: Path) -> None:
    path = _transformer_file(tmp_path / "t.safetensors", vocab=json.dumps(list(VOCAB)))
    with pytest.raises(ModelFileError, match=expect(path, r"metadata 'vocab' must be a string of distinct characters$")):
        load_model(path)


def test_vocab_not_json(tmp_path: Path) -> None:
    path = _transformer_file(tmp_path / "t.safetensors", vocab="abc")
    with pytest.raises(ModelFileError, match=expect(path, r"metadata 'vocab' is not valid JSON \(")):
        load_model(path)


def test_text_model_without_vocab(tmp_path: Path) -> None:
    path = _transformer_file(tmp_path / "t.safetensors", vocab=None)
    with pytest.raises(ModelFileError, match=expect(path, r"text model without a 'vocab' in its metadata$")):
        load_model(path)


# -- hand-written headers that the checks should catch (known gaps: see the reasons) -------------


def _gap_header(case: str) -> tuple[dict[str, Any], bytes]:
    module = VAE(VAEConfig(input_dim=1, hidden_dim=1, latent_dim=1))
    header: dict[str, Any] = {"__metadata__": meta("vae", module.config.__dict__)}
    offset = 0
    for name, t in module.state_dict().items():
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + 4 * t.numel()]}
        offset += 4 * t.numel()
    entry = header["encoder.hidden.weight"]
    if case == "offsets-one-number":
        entry["data_offsets"] = [0]
    elif case == "offsets-not-a-list":
        entry["data_offsets"] = 4
    elif case == "shape-not-a-list":
        entry["shape"] = 1
    elif case == "dtype-not-a-string":
        entry["dtype"] = ["F32"]
    return header, b"\0" * offset


@pytest.mark.parametrize("case", ["offsets-one-number", "offsets-not-a-list", "shape-not-a-list", "dtype-not-a-string"])
def test_malformed_header_entry_types(tmp_path: Path, case: str) -> None:
    header, data = _gap_header(case)
    path = raw_file(tmp_path / "m.safetensors", header, data)
    with pytest.raises(ModelFileError, match=expect(path, r".*", tensor="encoder.hidden.weight")):
        load_model(path)


def test_gap_header_helper_is_valid(tmp_path: Path) -> None:
    header, data = _gap_header("valid")
    assert load_model(raw_file(tmp_path / "m.safetensors", header, data)).kind == "vae"


def test_zero_heads_is_refused(tmp_path: Path) -> None:
    path = _transformer_file(tmp_path / "t.safetensors", config=json.dumps(dict(tiny_transformer().config.__dict__, n_head=0)))
    with pytest.raises(ModelFileError, match=expect(path, r".*n_head")):  # wherever the fix lands, name the field
        load_model(path)
