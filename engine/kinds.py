"""Model kinds: what a model file's ``kind`` names, and how the engine serves each (docs/kinds.md).

A kind is one ``Kind`` value, defined in its own module beside its config and module classes (the
built-in ones in ``engine/models/``): the config dataclass written into each file's metadata, the
module rebuilt from it, the serving shape the engine batches it by, and where its training recipe
and extra evaluation figures live (import paths, loaded only by ``python -m training``). Nothing
else in the engine, the server or training's loop and evaluation names a kind: they ask its Kind.

Serving shapes, and what each asks of a kind's module and config:

- ``ONE_SHOT`` (one forward pass per batch): ``module(z, labels) -> (B, image_size**2)`` floats
  in [0, 1], from latents ``z`` (B, config.latent_dim) and labels (B,) int64 or None;
  ``config.latent_dim``, ``config.num_classes`` (0: unconditional) and ``config.image_size``.
  Rows must not mix (no batch statistics): a sample depends on its own latent only.
- ``ITERATIVE`` (a state advanced by steps; requests join and leave between steps): the image
  fields above, and the ``IterativeModule`` methods below.
- ``TOKEN_DECODE`` (KV cache, continuous batching): the character Transformer's cached-forward
  protocol (engine/models/transformer.py) and ``config.block_size``; files carry a ``vocab``.
- ``NOT_SERVED``: a file the registry skips (the evaluation classifier).

Discovery (``known_kinds``): the built-in modules, then every entry point of the group
``genserve.kinds`` (a pip-installed package), then the modules named by ``GENSERVE_KINDS`` or
``load_kind_modules`` (comma-separated module names or ``.py`` files: a kind in a local file). A
kind module exposes ``KIND`` (one Kind) or ``KINDS`` (several). Two kinds of one name are refused.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

ENTRY_POINT_GROUP = "genserve.kinds"
ENV_VAR = "GENSERVE_KINDS"
BUILTIN_MODULES = (
    "engine.models.vae",
    "engine.models.gan",
    "engine.models.transformer",
    "engine.models.classifier",
    "engine.models.flow",
)


class Shape(StrEnum):
    """How the engine batches a kind's requests."""

    ONE_SHOT = "one-shot"
    ITERATIVE = "iterative"
    TOKEN_DECODE = "token-decode"
    NOT_SERVED = "not-served"


class IterativeModule(Protocol):
    """What an ``ITERATIVE`` kind's module offers the engine's step loop (engine/steps.py).

    The state ``x`` is (B, latent_dim) and starts as the request's latents (its seed's draw); each
    row is at its own time ``t`` (B,) in [0, 1) and moves by its own ``dt`` (B,); ``guidance`` (B,)
    is each row's guidance scale. Every op must be row-independent, as for one-shot kinds.
    """

    def step(self, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, labels: torch.Tensor | None, guidance: torch.Tensor) -> torch.Tensor:
        """The state one step later: (B, latent_dim)."""
        ...

    def estimate(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, guidance: torch.Tensor) -> torch.Tensor:
        """The current estimate of the clean state (what a preview decodes): (B, latent_dim)."""
        ...

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from final (or estimated) states: (B, image_size**2)."""
        ...

    def sample(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Every step at the file's defaults, then decode, in one batch (training.eval judges samples this way)."""
        ...


@dataclass(frozen=True)
class Steps:
    """An iterative kind's step counts: a request may ask for ``low`` to ``high``; ``default`` when it does not."""

    low: int
    high: int
    default: int
    guidance: float  # the default guidance scale (1: none)


@dataclass(frozen=True)
class Kind:
    """One kind of model: its file's config, its module, how it is served and trained."""

    name: str  # the ``kind`` in the file's metadata
    summary: str  # one line, shown by ListModels
    config_cls: type[Any]  # a frozen dataclass of int, float and Literal fields (engine/modelfile.py)
    module_cls: type[nn.Module]  # built as module_cls(config)
    shape: Shape
    tile: int = 32  # image kinds: rows per model call (batch invariance: docs/design/tiling.md)
    steps: Callable[[Any], Steps] | None = None  # iterative kinds: the step counts a config allows
    trainer: str | None = None  # "package.module:TaskClass": ``python -m training <command>`` trains it
    command: str | None = None  # its ``python -m training`` sub-command (default: the name)
    figures: str | None = None  # "package.module:function": extra figures (LoadedModel -> dict) for training.eval

    @property
    def images(self) -> bool:
        return self.shape in (Shape.ONE_SHOT, Shape.ITERATIVE)

    @property
    def text(self) -> bool:
        return self.shape is Shape.TOKEN_DECODE

    @property
    def served(self) -> bool:
        return self.shape is not Shape.NOT_SERVED

    @property
    def training_command(self) -> str:
        return self.command or self.name

    def sample_images(self, module: nn.Module, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Images (B, image_size**2) in [0, 1] from latents, as served (an iterative kind at its defaults)."""
        if self.shape is Shape.ONE_SHOT:
            return module(z, labels)
        if self.shape is Shape.ITERATIVE:
            return module.sample(z, labels)  # type: ignore[operator]
        raise ValueError(f"a {self.name} model does not make images")


def load_object(path: str) -> Any:
    """``"package.module:name"`` -> that object (a kind's trainer or figures)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name) if name else importlib.import_module(module)


class KindError(ValueError):
    """A kind module that cannot be used (import failure, no KIND, a duplicate name)."""


_lock = threading.Lock()
_kinds: dict[str, Kind] | None = None
_sources: dict[str, str] = {}  # kind name -> where it came from (for duplicate errors)
_loaded_specs: set[str] = set()


def known_kinds() -> dict[str, Kind]:
    """Every kind this process knows, by name (discovered on first call)."""
    global _kinds
    with _lock:
        if _kinds is None:
            found: dict[str, Kind] = {}
            for module in BUILTIN_MODULES:
                _register(found, _kinds_of(importlib.import_module(module), module), module)
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                try:
                    obj = ep.load()
                except Exception as e:
                    raise KindError(f"entry point {ep.name!r} ({ep.value}) of {ENTRY_POINT_GROUP} failed to import: {e}") from e
                _register(found, _kinds_of(obj, ep.value), f"entry point {ep.value}")
            _kinds = found
        specs = [s for s in os.environ.get(ENV_VAR, "").split(",") if s.strip()]
    if specs:
        load_kind_modules(specs, source=ENV_VAR)
    return dict(_kinds)


def kind_of(name: str) -> Kind:
    """The kind called ``name``; KeyError naming the known ones."""
    kinds = known_kinds()
    if name not in kinds:
        raise KeyError(f"unknown model kind {name!r} (known: {sorted(kinds)})")
    return kinds[name]


def load_kind_modules(specs: Iterable[str], *, source: str = "--kinds") -> list[Kind]:
    """Import each module name or ``.py`` file in ``specs`` and register its kinds; returns them.
    A spec already loaded is skipped. Raises KindError naming the spec."""
    known_kinds()  # built-ins and entry points first
    added: list[Kind] = []
    for raw in specs:
        spec = raw.strip()
        if not spec:
            continue
        with _lock:
            if spec in _loaded_specs:
                continue
        module = _import_spec(spec, source)
        kinds = _kinds_of(module, spec)
        with _lock:
            assert _kinds is not None
            _register(_kinds, kinds, f"{source} {spec}")
            _loaded_specs.add(spec)
        added.extend(kinds)
    return added


def _import_spec(spec: str, source: str) -> Any:
    try:
        if spec.endswith(".py"):
            path = Path(spec).resolve()
            if not path.is_file():
                raise KindError(f"{source}: kind file {spec} does not exist")
            name = f"genserve_kind_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise KindError(f"{source}: cannot import {spec}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module  # dataclasses and pickling look modules up by name
            module_spec.loader.exec_module(module)
            return module
        return importlib.import_module(spec)
    except KindError:
        raise
    except Exception as e:
        raise KindError(f"{source}: kind module {spec!r} failed to import: {type(e).__name__}: {e}") from e


def _kinds_of(obj: Any, where: str) -> list[Kind]:
    if isinstance(obj, Kind):
        return [obj]
    if isinstance(obj, Sequence) and all(isinstance(k, Kind) for k in obj):
        return list(obj)
    kinds: list[Kind] = []
    if isinstance(getattr(obj, "KIND", None), Kind):
        kinds.append(obj.KIND)
    many = getattr(obj, "KINDS", None)
    if isinstance(many, Sequence) and not isinstance(many, str):
        kinds.extend(k for k in many if isinstance(k, Kind))
    if not kinds:
        raise KindError(f"{where} defines no kind: a kind module sets KIND = engine.kinds.Kind(...) (docs/kinds.md)")
    return kinds


def _register(table: dict[str, Kind], kinds: list[Kind], source: str) -> None:
    for kind in kinds:
        if kind.name in table and table[kind.name] is not kind:
            raise KindError(f"kind {kind.name!r} from {source} is already defined by {_sources.get(kind.name, 'another module')}")
        table[kind.name] = kind
        _sources[kind.name] = source
