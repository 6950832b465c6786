"""How much the engine does at once, and what one request may ask for: the engine's own defaults.

No torch here: ``python -m server`` builds its settings (server/config.py) from these defaults
before it imports anything heavy, so ``--help`` answers at once and each default is written once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageLimits:
    max_n: int = 1024  # samples one request may ask for
    max_batch: int = 256  # samples in one forward pass (bigger requests are split)
    tile: int | None = None  # rows per model call; None: the kind's default tile (engine/kinds.py)
    step_rows: int = 64  # samples one iterative model advances together (its step batch; a request's n at most)

    def __post_init__(self) -> None:
        if self.max_n < 1 or self.max_batch < 1 or self.step_rows < 1:
            raise ValueError(f"max_n, max_batch and step_rows must be >= 1, got {self.max_n}, {self.max_batch} and {self.step_rows}")
        if self.tile is not None and self.tile < 1:
            raise ValueError(f"tile must be >= 1, got {self.tile}")


@dataclass(frozen=True)
class EngineLimits:
    image_threads: int = 1  # pool threads running image batches
    decode_batch: int = 64  # sequences one text model decodes together
    decode_pending: int = 256  # sequences waiting for a decode slot, per text model
    inline_image_ms: float = 3.0  # image models whose full batch takes less run on the calling thread (0: never)
    max_new_tokens: int = 1024  # the most tokens one text request may ask for
    default_new_tokens: int = 256  # what a text request that sets none gets (at most max_new_tokens)
    step_pending: int = 256  # requests waiting for room in an iterative model's step batch
    step_batching: str = (
        "step"  # iterative models: "step" (requests join and leave between steps) or "request" (a batch runs all its steps, the next waits)
    )
    decode_precision: str = "float32"  # text models' linear layers: "float32", or "int8" (faster, a little less exact)

    def __post_init__(self) -> None:
        if self.step_batching not in STEP_BATCHING:
            raise ValueError(f"step_batching must be one of {list(STEP_BATCHING)}, got {self.step_batching!r}")
        if self.decode_precision not in DECODE_PRECISIONS:
            raise ValueError(f"decode_precision must be one of {list(DECODE_PRECISIONS)}, got {self.decode_precision!r}")
        if self.step_pending < 1:
            raise ValueError(f"step_pending must be >= 1, got {self.step_pending}")


STEP_BATCHING = ("step", "request")
DECODE_PRECISIONS = ("float32", "int8")  # engine/models/transformer.py's DecodePrecision
