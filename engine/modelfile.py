"""The exported model file: safetensors tensors plus metadata that rebuilds the model.

Layout (format version 1):
- tensors: the served module's ``state_dict`` with dotted names (``decoder.hidden.weight``),
  float32, contiguous; tied weights are stored once (the Transformer's head is ``tok_emb``).
- metadata (all strings, as safetensors requires): ``kind`` (a kind's name: engine/kinds.py),
  ``format_version``, ``config`` (JSON of every architecture hyper-parameter), ``vocab`` (JSON
  string of the characters, text models only), ``training`` (JSON of the training figures).

Loading never unpickles anything: the header is checked by hand before safetensors reads a byte
of tensor data, and the expected tensors come from building the module on the ``meta`` device,
so a header that claims absurd sizes costs no memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.errors import ModelFileError
from engine.kinds import Kind, known_kinds

FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
SUPPORTED_DTYPES = {"F32": torch.float32}


@dataclass
class LoadedModel:
    """A model rebuilt from its file, in eval mode on the requested device."""

    path: Path
    spec: Kind  # what its ``kind`` names: how it is served and trained (engine/kinds.py)
    config: Any
    module: nn.Module
    vocab: str | None = None
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.spec.name

    @property
    def name(self) -> str:
        return self.path.stem


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(cls: type[Any], raw: Any, path: str | os.PathLike[str]) -> Any:
    """Build a config dataclass from untrusted JSON, naming the first bad field."""
    if not isinstance(raw, dict):
        raise ModelFileError(path, f"metadata 'config' must be a JSON object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ModelFileError(path, f"config has unknown field(s) {unknown} for {cls.__name__}")
    missing = sorted(names - set(raw))
    if missing:  # a default could silently change the architecture (tanh vs relu): refuse
        raise ModelFileError(path, f"config lacks field(s) {missing} for {cls.__name__}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        hint = hints[name]
        if typing.get_origin(hint) is typing.Literal:
            allowed = typing.get_args(hint)
            value = getattr(cls, "RENAMED", {}).get(name, {}).get(value, value)  # a value's older name, in files that carry it
            if value not in allowed:
                raise ModelFileError(path, f"config field {name!r} is {value!r}, expected one of {list(allowed)}")
        elif hint is int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ModelFileError(path, f"config field {name!r} must be a non-negative integer, got {value!r}")
        elif hint is float:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ModelFileError(path, f"config field {name!r} must be a number, got {value!r}")
            value = float(value)
        values[name] = value
    return cls(**values)


def export_model(
    path: str | os.PathLike[str],
    kind: str,
    module: nn.Module,
    *,
    vocab: str | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``module`` (which has a ``config`` dataclass attribute) as a model file."""
    if kind not in known_kinds():
        raise ValueError(f"unknown model kind {kind!r} (known: {sorted(known_kinds())})")
    config = module.config
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in module.state_dict().items()}
    metadata = {
        "kind": kind,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config_to_dict(config), sort_keys=True),
        "training": json.dumps(training or {}, sort_keys=True),
    }
    if vocab is not None:
        metadata["vocab"] = json.dumps(vocab)
    return save_atomically(tensors, path, metadata)


def save_atomically(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str]) -> Path:
    """Write a safetensors file via a temporary sibling, so readers never see a half-written file.

    safetensors creates its files with mode 0600; a model file is meant to be read by the server,
    its operator and other users alike, so the file gets the mode a plain ``open()`` would give it
    (0666 less the umask: 0644 with the usual 022).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, out)
    return out


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``os.umask`` sets as it reads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Check a safetensors header by hand; return (tensor entries, metadata)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            head = f.read(9)
            n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else -1
            plausible = 0 < n <= min(MAX_HEADER_BYTES, size - 8)
            if not plausible:
                # Only now look for other formats: a valid header length can begin with the
                # same bytes as pickle's magic (a 896-byte header starts with 0x80 0x03).
                if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                    raise ModelFileError(p, "is a Python pickle; genserve loads only safetensors (pickle can run code)")
                if head[:4] == b"PK\x03\x04":
                    raise ModelFileError(p, "is a zip archive (a torch.save checkpoint?); genserve loads only safetensors")
                if len(head) < 8:
                    raise ModelFileError(p, f"is not a safetensors file: {size} bytes is shorter than the 8-byte header length")
                raise ModelFileError(p, f"is not a safetensors file (or is truncated): header claims {n} bytes, file has {size}")
            f.seek(8)
            raw = f.read(n)
    except OSError as e:
        raise ModelFileError(p, f"cannot be read: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(p, f"is not a safetensors file: header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ModelFileError(p, "is not a safetensors file: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelFileError(p, "metadata must map strings to strings")
    data_len = size - 8 - n
    for name, entry in header.items():
        if not _well_formed(entry):
            raise ModelFileError(p, "malformed header entry", tensor=name)
        start, end = entry["data_offsets"]
        if not 0 <= start <= end <= data_len:
            raise ModelFileError(
                p, f"data offsets {entry['data_offsets']} fall outside the {data_len} data bytes (truncated?)", tensor=name
            )
    return header, metadata


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _well_formed(entry: Any) -> bool:
    """A header entry: {"dtype": str, "shape": [int...], "data_offsets": [int, int]}."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        return False
    shape, offsets = entry["shape"], entry["data_offsets"]
    return (
        isinstance(entry["dtype"], str)
        and isinstance(shape, list)
        and all(_is_count(d) for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_count(o) for o in offsets)
    )


def _json_meta(path: Path, metadata: dict[str, str], key: str) -> Any:
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise ModelFileError(path, f"metadata {key!r} is not valid JSON ({e})") from e


def _own(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone() if tensor.device.type == "cpu" else tensor


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a model from its file alone; raise ModelFileError naming the file and tensor."""
    p = Path(path)
    header, metadata = read_header(p)
    for key in ("kind", "format_version", "config"):
        if key not in metadata:
            raise ModelFileError(p, f"metadata has no {key!r}: not a genserve model file")
    kind_name = metadata["kind"]
    kinds = known_kinds()
    if kind_name not in kinds:
        raise ModelFileError(p, f"unknown model kind {kind_name!r} (known: {sorted(kinds)})")
    version = metadata["format_version"]
    if not version.isdigit() or int(version) != FORMAT_VERSION:
        raise ModelFileError(p, f"format version {version!r} is not supported (this genserve reads version {FORMAT_VERSION})")
    kind = kinds[kind_name]
    config = config_from_dict(kind.config_cls, _json_meta(p, metadata, "config"), p)
    vocab: str | None = None
    if "vocab" in metadata:
        vocab = _json_meta(p, metadata, "vocab")
        if not isinstance(vocab, str) or len(set(vocab)) != len(vocab):
            raise ModelFileError(p, "metadata 'vocab' must be a string of distinct characters")
        if len(vocab) != getattr(config, "vocab_size", len(vocab)):
            raise ModelFileError(p, f"vocab has {len(vocab)} characters but config.vocab_size is {config.vocab_size}")
    elif hasattr(config, "vocab_size"):
        raise ModelFileError(p, "text model without a 'vocab' in its metadata")
    training = _json_meta(p, metadata, "training") if "training" in metadata else {}

    try:
        with torch.device("meta"):  # shapes only, no memory, whatever the config claims
            skeleton = kind.module_cls(config)
    except (ValueError, TypeError, ArithmeticError) as e:
        raise ModelFileError(p, f"config does not describe a valid {kind_name}: {e}") from e
    expected = skeleton.state_dict()
    missing = [n for n in expected if n not in header]
    if missing:
        raise ModelFileError(
            p, f"missing tensor (and {len(missing) - 1} more)" if len(missing) > 1 else "missing tensor", tensor=missing[0]
        )
    unexpected = [n for n in header if n not in expected]
    if unexpected:
        raise ModelFileError(p, f"unexpected tensor for a {kind_name}", tensor=unexpected[0])
    for name, t in expected.items():
        entry = header[name]
        if entry["dtype"] not in SUPPORTED_DTYPES:
            raise ModelFileError(p, f"dtype {entry['dtype']} is not supported (expected F32)", tensor=name)
        if list(entry["shape"]) != list(t.shape):
            raise ModelFileError(
                p, f"shape {list(entry['shape'])} does not match {list(t.shape)} of the declared architecture", tensor=name
            )

    try:
        # On the CPU, copied out of safetensors' memory map: a mapped tensor would change under the
        # server when its file is rewritten in place (`cp` over it), and a truncated file faults
        # (SIGBUS) the first time a forward pass touches a page that is gone. The copy is lost in the
        # noise of a load; it gives up page sharing between worker processes. Tensors read onto a GPU
        # are copies already.
        with safe_open(str(p), framework="pt", device=str(device)) as f:
            tensors = {name: _own(f.get_tensor(name)) for name in expected}
    except Exception as e:  # safetensors raises its own error types; name the file
        raise ModelFileError(p, f"safetensors could not read the tensors: {e}") from e
    for name, tensor in tensors.items():  # one pass over the weights: a NaN would serve blank images or crash sampling
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(p, "has non-finite values (NaN or infinity)", tensor=name)
    # The skeleton's meta parameters take the file's tensors as they are (assign=True): no random
    # initialisation and no second copy of the weights.
    skeleton.load_state_dict(tensors, strict=True, assign=True)
    module = skeleton.to(device).eval()
    return LoadedModel(path=p, spec=kind, config=config, module=module, vocab=vocab, training=training)
