"""Stage names, typed: which stage a model name gets, and what it is called (its link shares the name)."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine import ServedModel


class ModelStage(enum.Enum):
    """The stage a model name gets, by what it serves; its ``name`` is the stage's and its link's."""

    BATCHER = "batcher"  # one-shot image models
    TEXT = "text"  # text models: the feeder of its decode thread
    STEPS = "steps"  # iterative image models: the feeder of its step batch

    @classmethod
    def of(cls, served: ServedModel) -> ModelStage:
        if served.images is not None:
            return cls.BATCHER
        return cls.STEPS if served.stepper is not None else cls.TEXT

    def stage_name(self, model: str) -> str:
        return f"{self.value}-{model}"
