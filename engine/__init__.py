"""genserve's inference engine: model files, model architectures, batched image generation and
continuous-batching text decoding, usable without the server (docs/engine.md).

This is its public face: the server imports only this package, ``engine.errors`` and
``engine.logs``. Names load on first use (PEP 562), so ``from engine import EngineLimits`` costs
no torch import: the server's settings are built from the engine's defaults before anything heavy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what mypy sees; at run time __getattr__ loads each on first use
    from engine.decode import SequenceRequest as SequenceRequest
    from engine.decode import TokenEvent as TokenEvent
    from engine.device import choose_device as choose_device
    from engine.engine import Engine as Engine
    from engine.engine import OnEvent as OnEvent
    from engine.engine import Ticket as Ticket
    from engine.images import ImageChunk as ImageChunk
    from engine.images import ImageRequest as ImageRequest
    from engine.images import ImageResult as ImageResult
    from engine.kinds import Kind as Kind
    from engine.kinds import KindError as KindError
    from engine.kinds import Shape as Shape
    from engine.kinds import known_kinds as known_kinds
    from engine.kinds import load_kind_modules as load_kind_modules
    from engine.limits import DECODE_PRECISIONS as DECODE_PRECISIONS
    from engine.limits import EngineLimits as EngineLimits
    from engine.limits import ImageLimits as ImageLimits
    from engine.registry import SUFFIX as SUFFIX
    from engine.registry import FolderReport as FolderReport
    from engine.registry import ImageInfo as ImageInfo
    from engine.registry import LoadFailure as LoadFailure
    from engine.registry import ModelInfo as ModelInfo
    from engine.registry import ModelRegistry as ModelRegistry
    from engine.registry import ServedModel as ServedModel
    from engine.registry import TextInfo as TextInfo
    from engine.registry import failure_reason as failure_reason
    from engine.registry import parse_file_name as parse_file_name
    from engine.sampling import SamplingParams as SamplingParams
    from engine.sampling import check_max_new_tokens as check_max_new_tokens
    from engine.steps import StepEvent as StepEvent

_HOMES = {
    "engine.decode": ("SequenceRequest", "TokenEvent"),
    "engine.device": ("choose_device",),
    "engine.engine": ("Engine", "OnEvent", "Ticket"),
    "engine.images": ("ImageChunk", "ImageRequest", "ImageResult"),
    "engine.kinds": ("Kind", "KindError", "Shape", "known_kinds", "load_kind_modules"),
    "engine.limits": ("DECODE_PRECISIONS", "EngineLimits", "ImageLimits"),
    "engine.registry": (
        "SUFFIX",
        "FolderReport",
        "ImageInfo",
        "LoadFailure",
        "ModelInfo",
        "ModelRegistry",
        "ServedModel",
        "TextInfo",
        "failure_reason",
        "parse_file_name",
    ),
    "engine.sampling": ("SamplingParams", "check_max_new_tokens"),
    "engine.steps": ("StepEvent",),
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}
__all__ = [
    "DECODE_PRECISIONS",
    "SUFFIX",
    "Engine",
    "EngineLimits",
    "FolderReport",
    "ImageChunk",
    "ImageInfo",
    "ImageLimits",
    "ImageRequest",
    "ImageResult",
    "Kind",
    "KindError",
    "LoadFailure",
    "ModelInfo",
    "ModelRegistry",
    "OnEvent",
    "SamplingParams",
    "SequenceRequest",
    "ServedModel",
    "Shape",
    "StepEvent",
    "TextInfo",
    "Ticket",
    "TokenEvent",
    "check_max_new_tokens",
    "choose_device",
    "failure_reason",
    "known_kinds",
    "load_kind_modules",
    "parse_file_name",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__
