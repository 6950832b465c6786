"""Values the SDK hands back: what a model accepts, and the result of one request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from genserve.v1 import generator_pb2 as pb

__all__ = ["ImageResult", "ImageSpec", "ModelInfo", "TextResult", "TextSpec"]

FinishReason = Literal["complete", "length", "stop", "error", "unspecified"]

_REASONS: dict[int, FinishReason] = {
    pb.FINISH_REASON_UNSPECIFIED: "unspecified",
    pb.FINISH_REASON_COMPLETE: "complete",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_ERROR: "error",
}


def finish_reason(value: int) -> FinishReason:
    return _REASONS.get(value, "unspecified")


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """What an image model accepts."""

    max_n: int  # samples one request may ask for
    image_size: int  # samples are image_size x image_size
    latent_dim: int
    conditional: bool  # labels accepted (drawn from the seed when none are given)
    label_min: int | None  # inclusive label range: conditional models only, else None
    label_max: int | None
    steps_min: int = 0  # iterative models (flow): the steps a request may ask for; 0 for one-shot models
    steps_max: int = 0
    steps_default: int = 0
    guidance_default: float = 0.0  # iterative conditional models: the guidance scale a request gets by default

    @property
    def iterative(self) -> bool:
        return self.steps_max > 0


@dataclass(frozen=True, slots=True)
class TextSpec:
    """What a text model accepts."""

    vocab: str  # the characters a prompt may use
    context_window: int  # longer prompts are refused
    max_new_tokens: int  # the most tokens one request may ask for


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One served model version, as ``list_models()`` reports it."""

    name: str
    version: int
    kind: str  # the model file's kind: "vae", "wgan-gp", "char-transformer", "flow" or a kind of the server's own
    summary: str
    parameters: int
    device: str
    latest: bool  # a request for version 0 gets this version
    image: ImageSpec | None = None  # set for image models
    text: TextSpec | None = None  # set for text models

    @classmethod
    def from_proto(cls, m: pb.ModelInfo) -> ModelInfo:
        which = m.WhichOneof("accepts")
        image = text = None
        if which == "image":
            i = m.image
            # by conditional, not HasField: a server from before the fields were optional leaves out a label_min of 0
            low, high = (i.label_min, i.label_max) if i.conditional else (None, None)
            image = ImageSpec(
                i.max_n, i.image_size, i.latent_dim, i.conditional, low, high, i.steps_min, i.steps_max, i.steps_default, i.guidance_default
            )
        elif which == "text":
            text = TextSpec(m.text.vocab, m.text.context_window, m.text.max_new_tokens)
        return cls(m.name, m.version, m.kind, m.summary, m.parameters, m.device, m.latest, image, text)


@dataclass(frozen=True, slots=True)
class ImageResult:
    """The samples of one image request, with what the server reports about them."""

    images: npt.NDArray[np.uint8]  # (n, height, width), 0..255
    labels: tuple[int, ...]  # the label of each sample (conditional models), else empty
    seed: int  # the seed used: the same seed gives the same samples
    model: str
    version: int  # the version that served the request
    id: str = ""  # the request's id within a session
    floats: npt.NDArray[np.float32] | None = field(default=None, repr=False)  # (n, height, width) in [0, 1], when asked for


@dataclass(frozen=True, slots=True)
class TextResult:
    """The text of one text request (the generated characters, without the prompt)."""

    text: str
    finish_reason: FinishReason  # "length" (max_new_tokens reached) or "stop" (a stop string was generated)
    n_generated: int  # tokens generated
    seed: int
    model: str
    version: int
    id: str = ""


@dataclass(frozen=True, slots=True)
class ImageStep:
    """One of ``stream_images``' results: an iterative model's preview, or its final samples (``final``)."""

    images: npt.NDArray[np.uint8]  # (n, height, width), 0..255
    step: int  # the steps done when these were made
    final: bool
