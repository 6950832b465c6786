"""A corpus of malformed model files, built at test time next to valid tiny models (no binary files
are checked in). ``tests/bad_input/test_model_corpus.py`` loads it into a registry and a server.

    PYTHONPATH=. python tests/bad_input/model_corpus.py OUT    # writes the corpus into OUT/models, to try a server by hand

``build_corpus(folder)`` writes the good models (``GOOD``) and every case of ``CASES`` into
``folder``, plus traversal canaries outside it; each case names its file, what is wrong with it,
and a pattern its refusal's reason must match (``re.search``). Files that would run code if
unpickled create a marker folder when unpickled: the markers must never appear.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.modelfile import MAX_HEADER_BYTES, export_model
from engine.models.classifier import ClassifierConfig, DigitClassifier
from engine.models.gan import GANConfig, Generator
from engine.models.transformer import CharTransformer, TransformerConfig
from engine.models.vae import VAE, VAEConfig

VOCAB = "\nabc"
PICKLE_MAGIC = {b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"}


def tiny_vae() -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(hidden_dim=8, latent_dim=3))


def tiny_gan() -> Generator:
    torch.manual_seed(1)
    return Generator(GANConfig(latent_dim=4, arch="mlp", mlp_hidden=8, num_classes=10))


def tiny_text() -> CharTransformer:
    torch.manual_seed(2)
    return CharTransformer(TransformerConfig(vocab_size=len(VOCAB), block_size=8, n_layer=1, n_head=2, d_model=8, d_ff=16))


# served name -> (file, kind, version): what a registry or server on the corpus must serve, and nothing else
GOOD = {
    "good": ("good.safetensors", "vae", 1),
    "good-gan": ("good-gan.safetensors", "wgan-gp", 1),
    "good.text": ("good.text@2.safetensors", "char-transformer", 2),
}
SKIPPED = "mnist_classifier.safetensors"  # evaluation only: skipped, neither served nor refused


class PickleCanary:
    """Unpickling this creates ``marker`` (a folder): proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


# -- writing safetensors files by hand ------------------------------------------------------------


def vae_tensors() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tiny_vae().state_dict().items()}


def vae_config() -> dict[str, Any]:
    return json.loads(json.dumps(tiny_vae().config.__dict__))


def vae_meta(**overrides: str) -> dict[str, str]:
    meta = {"kind": "vae", "format_version": "1", "config": json.dumps(vae_config())}
    meta.update(overrides)
    return meta


def first_tensor() -> str:
    return next(iter(tiny_vae().state_dict()))


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    """save_file, padding the metadata if the header length happens to begin like pickle's magic
    (so that each case fails for its own reason only)."""
    metadata = dict(metadata) if metadata is not None else None
    save_file(tensors, str(path), metadata=metadata)
    if path.read_bytes()[:2] in PICKLE_MAGIC:
        save_file(tensors, str(path), metadata={**(metadata or {}), "pad": "--------"})
    assert path.read_bytes()[:2] not in PICKLE_MAGIC


def raw(path: Path, header: Any, data: bytes = b"") -> None:
    """A file with a hand-written header (whatever JSON) and data section."""
    h = json.dumps(header).encode()
    if struct.pack("<Q", len(h))[:2] in PICKLE_MAGIC:
        h += b" "
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def spoil_vae(path: Path, *, tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None, **meta: str) -> None:
    t = vae_tensors()
    save(path, tensors(t) if tensors else t, vae_meta(**meta))


def with_config(**changes: Any) -> str:
    return json.dumps({**vae_config(), **changes})


def without_config(key: str) -> str:
    return json.dumps({k: v for k, v in vae_config().items() if k != key})


def reshaped(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    name = first_tensor()
    return {**t, name: t[name].reshape(-1).contiguous()}


def retyped(dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    def change(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        name = first_tensor()
        return {**t, name: t[name].to(dtype)}

    return change


def missing(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in t.items() if k != first_tensor()}


def extra(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**t, "backdoor.weight": torch.zeros(2)}


def text_file(path: Path, vocab: str | None) -> None:
    module = tiny_text()
    meta = {"kind": "char-transformer", "format_version": "1", "config": json.dumps(module.config.__dict__)}
    if vocab is not None:
        meta["vocab"] = json.dumps(vocab)
    save(path, {k: v.contiguous() for k, v in module.state_dict().items()}, meta)


def sparse(path: Path, header_length: int, size: int) -> None:
    """A file of ``size`` bytes (sparse: no disk used) whose header length claims ``header_length``."""
    with path.open("wb") as f:
        f.write(struct.pack("<Q", header_length))
        f.truncate(size)


def copy_good(path: Path) -> None:
    export_model(path, "vae", tiny_vae())


# -- the cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    file: str  # its name inside the folder
    what: str  # what is wrong with it
    reason: str  # a pattern the refusal's reason must contain (re.search)
    build: Callable[[Path, Path], object]  # (path, markers folder) -> writes the file
    tensor: str | None = None  # the tensor the reason must name
    content: bool = True  # a regular file: load_model itself refuses it (False: only the folder scan does)


def _pickle(protocol: int) -> Callable[[Path, Path], None]:
    def build(path: Path, markers: Path) -> None:
        path.write_bytes(pickle.dumps({"weights": [1.0, 2.0], "boom": PickleCanary(markers / f"unpickled-{path.stem}")}, protocol=protocol))

    return build


def _torch_save(path: Path, markers: Path) -> None:
    torch.save({"w": torch.zeros(2), "boom": PickleCanary(markers / f"unpickled-{path.stem}")}, path)


def _truncated(path: Path, markers: Path) -> None:
    copy_good(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_header(path: Path, markers: Path) -> None:
    copy_good(path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[: 8 + n // 2])


def _dangling(path: Path, markers: Path) -> None:
    path.symlink_to(path.parent / "nowhere" / "model.safetensors")


def _duplicate(path: Path, markers: Path) -> None:
    copy_good(path)


CASES: list[Case] = [
    # not safetensors at all
    Case("empty.safetensors", "an empty file", r"shorter than the 8-byte header", lambda p, m: p.write_bytes(b"")),
    Case("random.safetensors", "random bytes", r"^is not a safetensors file", lambda p, m: p.write_bytes(random.Random(6).randbytes(4096))),
    Case("pickle.safetensors", "a Python pickle (protocol 4) that runs code", r"is a Python pickle", _pickle(4)),
    Case("pickle2.safetensors", "a Python pickle (protocol 2) that runs code", r"is a Python pickle", _pickle(2)),
    Case("torch-save.safetensors", "a torch.save zip (pickle inside) that runs code", r"is a zip archive", _torch_save),
    Case("truncated.safetensors", "a good file cut in half", r"data offsets .* fall outside the \d+ data bytes", _truncated, tensor="*"),
    Case("truncated-header.safetensors", "a good file cut inside its header", r"header claims \d+ bytes, file has \d+", _truncated_header),
    # headers that lie
    Case(
        "huge-header.safetensors",
        "a header length of 3 GiB in a tiny file",
        r"header claims 3221225472 bytes",
        lambda p, m: p.write_bytes(struct.pack("<Q", 3 << 30) + b"{}"),
    ),
    Case(
        "header-over-limit.safetensors",
        "a header longer than safetensors' 100 MB limit, in a (sparse) file big enough to hold it",
        rf"header claims {MAX_HEADER_BYTES + 1} bytes",
        lambda p, m: sparse(p, MAX_HEADER_BYTES + 1, MAX_HEADER_BYTES + 4096),
    ),
    Case(
        "terabyte-tensor.safetensors",
        "a tensor that claims 4 TiB of data",
        r"data offsets \[0, 4398046511104\] fall outside",
        lambda p, m: raw(p, {"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 4 * 2**40]}}, b"\0" * 16),
        tensor="w",
    ),
    Case(
        "not-json.safetensors",
        "a header that is not JSON",
        r"header is not JSON",
        lambda p, m: p.write_bytes(struct.pack("<Q", 6) + b"\xff{oops"),
    ),
    Case("json-array.safetensors", "a header that is a JSON array", r"header is not a JSON object", lambda p, m: raw(p, [1, 2, 3])),
    Case(
        "bad-entry.safetensors",
        "a tensor entry with a negative dimension",
        r"malformed header entry",
        lambda p, m: raw(p, {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
        tensor="w",
    ),
    Case(
        "metadata-not-strings.safetensors",
        "metadata values that are not strings",
        r"metadata must map strings to strings",
        lambda p, m: raw(p, {"__metadata__": {"kind": 1}}),
    ),
    # metadata
    Case("no-metadata.safetensors", "tensors without metadata", r"metadata has no 'kind'", lambda p, m: save(p, vae_tensors(), None)),
    Case("unknown-kind.safetensors", "an unknown kind", r"unknown model kind 'diffusion'", lambda p, m: spoil_vae(p, kind="diffusion")),
    Case(
        "future-version.safetensors",
        "a future format version",
        r"format version '2' is not supported",
        lambda p, m: spoil_vae(p, format_version="2"),
    ),
    Case(
        "version-not-a-number.safetensors",
        "a format version that is not a number",
        r"format version '1.0' is not supported",
        lambda p, m: spoil_vae(p, format_version="1.0"),
    ),
    Case("config-not-json.safetensors", "a config that is not JSON", r"'config' is not valid JSON", lambda p, m: spoil_vae(p, config="{")),
    Case(
        "config-unknown-field.safetensors",
        "a config with a field the architecture does not have",
        r"config has unknown field\(s\) \['colour'\]",
        lambda p, m: spoil_vae(p, config=with_config(colour="red")),
    ),
    Case(
        "config-missing-field.safetensors",
        "a config without a field",
        r"config lacks field\(s\) \['activation'\]",
        lambda p, m: spoil_vae(p, config=without_config("activation")),
    ),
    Case(
        "config-negative.safetensors",
        "a negative width",
        r"'hidden_dim' must be a non-negative integer, got -8",
        lambda p, m: spoil_vae(p, config=with_config(hidden_dim=-8)),
    ),
    Case(
        "config-claims-gigabytes.safetensors",
        "a config whose architecture would take gigabytes, with tiny tensors",
        r"shape \[\d+, \d+\] does not match \[\d{9,}, \d+\]",
        lambda p, m: spoil_vae(p, config=with_config(hidden_dim=10**9)),
        tensor="*",
    ),
    # tensors
    Case(
        "wrong-shape.safetensors",
        "a tensor of the wrong shape",
        r"shape \[\d+\] does not match \[\d+, \d+\]",
        lambda p, m: spoil_vae(p, tensors=reshaped),
        tensor="first",
    ),
    Case(
        "float16.safetensors",
        "a float16 tensor",
        r"dtype F16 is not supported",
        lambda p, m: spoil_vae(p, tensors=retyped(torch.float16)),
        tensor="first",
    ),
    Case(
        "int64.safetensors",
        "an int64 tensor",
        r"dtype I64 is not supported",
        lambda p, m: spoil_vae(p, tensors=retyped(torch.int64)),
        tensor="first",
    ),
    Case("missing-tensor.safetensors", "a tensor missing", r"missing tensor", lambda p, m: spoil_vae(p, tensors=missing), tensor="first"),
    Case(
        "extra-tensor.safetensors",
        "a tensor the architecture does not have",
        r"unexpected tensor for a vae",
        lambda p, m: spoil_vae(p, tensors=extra),
        tensor="backdoor.weight",
    ),
    Case(
        "text-no-vocab.safetensors", "a text model without a vocabulary", r"text model without a 'vocab'", lambda p, m: text_file(p, None)
    ),
    Case(
        "text-vocab-size.safetensors",
        "a vocabulary of the wrong size",
        r"vocab has 3 characters but config.vocab_size is 4",
        lambda p, m: text_file(p, "abc"),
    ),
    Case(
        "text-vocab-repeats.safetensors",
        "a vocabulary with a repeated character",
        r"'vocab' must be a string of distinct characters",
        lambda p, m: text_file(p, "abca"),
    ),
    # names, versions, and things that are not files
    Case(
        "Bad Name.safetensors",
        "a name with a space and capitals",
        r"model name 'Bad Name' does not match",
        lambda p, m: copy_good(p),
        content=False,
    ),
    Case(
        ".hidden.safetensors",
        "a name starting with a dot",
        r"model name '.hidden' does not match",
        lambda p, m: copy_good(p),
        content=False,
    ),
    Case("..safetensors", "the name '.'", r"model name '.' does not match", lambda p, m: copy_good(p), content=False),
    Case(
        "back\\slash.safetensors",
        "a name with a (Windows) path separator",
        r"model name 'back\\\\slash' does not match",
        lambda p, m: copy_good(p),
        content=False,
    ),
    Case(
        "x" * 65 + ".safetensors", "a name of 65 characters", r"model name 'x{65}' does not match", lambda p, m: copy_good(p), content=False
    ),
    Case("zero@0.safetensors", "version 0", r"version '0' is not a positive integer", lambda p, m: copy_good(p), content=False),
    Case(
        "vee@v2.safetensors",
        "a version that is not a number",
        r"version 'v2' is not a positive integer",
        lambda p, m: copy_good(p),
        content=False,
    ),
    Case("two@1@2.safetensors", "two versions", r"model name 'two@1' does not match", lambda p, m: copy_good(p), content=False),
    Case(
        "good@1.safetensors",
        "a second file for good version 1",
        r"duplicates good version 1 of good.safetensors",
        _duplicate,
        content=False,
    ),
    Case("folder.safetensors", "a directory", r"is not a regular file", lambda p, m: p.mkdir(), content=False),
    Case("dangling.safetensors", "a symlink to nothing", r"is not a regular file", _dangling, content=False),
    Case("fifo.safetensors", "a named pipe (opening it would block)", r"is not a regular file", lambda p, m: os.mkfifo(p), content=False),
]


@dataclass(frozen=True)
class Corpus:
    folder: Path  # the models folder: good models, bad files, the evaluation classifier
    markers: Path  # where an unpickled file would leave its marker
    outside: Path  # a valid model just outside the folder (a path join with '../outside' would find it)
    nested: Path  # a valid model in a subfolder (not loaded: the folder is not walked)

    def path(self, case: Case) -> Path:
        return self.folder / case.file

    def tensor(self, case: Case) -> str | None:
        return first_tensor() if case.tensor == "first" else case.tensor


def build_corpus(folder: Path) -> Corpus:
    folder.mkdir(parents=True)
    markers = folder.parent / "markers"
    markers.mkdir()
    export_model(folder / GOOD["good"][0], "vae", tiny_vae())
    export_model(folder / GOOD["good-gan"][0], "wgan-gp", tiny_gan())
    export_model(folder / GOOD["good.text"][0], "char-transformer", tiny_text(), vocab=VOCAB)
    export_model(folder / SKIPPED, "mnist-classifier", DigitClassifier(ClassifierConfig(channels=2, feature_dim=4)))
    for case in CASES:
        case.build(folder / case.file, markers)
    outside = export_model(folder.parent / "outside.safetensors", "vae", tiny_vae())
    nested = export_model(folder / "sub" / "inner.safetensors", "vae", tiny_vae())
    return Corpus(folder, markers, outside, nested)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/bad_input/model_corpus.py OUT")
    corpus = build_corpus(Path(sys.argv[1]) / "models")
    print(f"{len(CASES)} malformed files and {len(GOOD)} good models in {corpus.folder}")
