"""The engine's one fault-injection seam: ``Engine(faults=...)`` (or ``engine.faults = ...``).

Nothing in the product installs one; ``engine.faults`` is None and each seam costs one attribute
test. A harness (``tests/chaos``) subclasses ``Faults`` and overrides what it needs; every method
is called at the point named, and what it raises is what model code raising there would do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.images import ImageChunk
    from engine.registry import ServedModel


class Faults:
    """Hooks a harness overrides; the defaults do nothing."""

    async def before_image_batch(self, served: ServedModel, chunks: Sequence[ImageChunk]) -> None:
        """On the event loop, before one image batch is run: awaiting here stalls the batch."""

    def before_forward(self, served: ServedModel, chunks: Sequence[ImageChunk]) -> None:
        """On the thread that runs the batch (a pool thread, or the event loop when the model runs
        inline), just before its forward pass: raising here fails the batch as model code would."""

    def before_decode_step(self, served: ServedModel) -> None:
        """On a text model's decode thread, before each ``DecodeBatch.step``: raising here fails
        the batch and every sequence in it, as a failed step would."""
