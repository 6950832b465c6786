"""The edge between our values and genserve.v1 messages: building requests, assembling answers.

Shared by the one-call methods (``Generate``) and the session (``GenerateStream``), which see
the same ``GenerateResponse`` messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypedDict, Unpack

import numpy as np
import numpy.typing as npt

from clients._exceptions import ServerError
from clients._types import ImageResult, TextResult, finish_reason
from genserve.v1 import generator_pb2 as pb

Labels = int | Sequence[int] | None


# The options of a request, one keyword set per kind, shared by every method that sends one
# (AsyncClient, Client, Session, SyncSession): a new option is added here, once.
class ImageOptions(TypedDict, total=False):
    """seed: the same seed gives the same samples (drawn by the server when None).
    labels: conditional models: one label for all samples or one per sample (drawn from the seed when None).
    version: 0 (or unset) for the latest."""

    seed: int | None
    labels: Labels
    version: int


class TextOptions(TypedDict, total=False):
    """Unset (or None) sampling options take the server's defaults (256 tokens, temperature 1.0,
    top-k and top-p off); ``temperature=0`` is greedy. The text ends after ``max_new_tokens`` or once
    it contains one of the ``stop`` strings. version: 0 (or unset) for the latest."""

    max_new_tokens: int | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    seed: int | None
    stop: str | Sequence[str]
    version: int


def _check_options(options: Mapping[str, object], allowed: frozenset[str], kind: str) -> None:
    """``**options`` takes any keyword at run time: a misspelt one is an error, as in a plain signature."""
    unknown = options.keys() - allowed
    if unknown:
        raise TypeError(f"unexpected option(s) for {kind} request: {', '.join(sorted(unknown))}; known: {', '.join(sorted(allowed))}")


_IMAGE_OPTIONS = frozenset(ImageOptions.__annotations__)
_TEXT_OPTIONS = frozenset(TextOptions.__annotations__)


def image_request(model: str, n: int, *, want_float: bool = False, id: str = "", **options: Unpack[ImageOptions]) -> pb.GenerateRequest:
    _check_options(options, _IMAGE_OPTIONS, "an image")
    labels = options.get("labels")
    label_list = [labels] if isinstance(labels, int) else list(labels or ())
    params = pb.ImageParams(n=n, seed=options.get("seed"), labels=label_list, want_float=want_float)
    return pb.GenerateRequest(model=model, version=options.get("version", 0), id=id, image=params)


def text_request(model: str, prompt: str, *, id: str = "", **options: Unpack[TextOptions]) -> pb.GenerateRequest:
    _check_options(options, _TEXT_OPTIONS, "a text")
    stop = options.get("stop", ())
    stops = [stop] if isinstance(stop, str) else list(stop)
    params = pb.TextParams(
        prompt=prompt,
        max_new_tokens=options.get("max_new_tokens"),
        temperature=options.get("temperature"),
        top_k=options.get("top_k"),
        top_p=options.get("top_p"),
        seed=options.get("seed"),
        stop=stops,
    )
    return pb.GenerateRequest(model=model, version=options.get("version", 0), id=id, text=params)


class ImageAssembler:
    """Places the chunks of one image request (in any order) into one (n, height, width) array."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.received = 0
        self._images: npt.NDArray[np.uint8] | None = None
        self._floats: npt.NDArray[np.float32] | None = None
        self._labels: list[int] = []

    def add(self, chunk: pb.Images) -> int:
        """Take one chunk; returns the number of samples it held."""
        count, h, w, offset = chunk.count, chunk.height, chunk.width, chunk.offset
        if offset + count > self.n or len(chunk.pixels) != count * h * w:
            raise ServerError(f"malformed image chunk: offset {offset}, count {count}, {h}x{w}, {len(chunk.pixels)} bytes, n {self.n}")
        if self._images is None:
            self._images = np.zeros((self.n, h, w), dtype=np.uint8)
        elif self._images.shape[1:] != (h, w):
            raise ServerError(f"image chunk of {h}x{w} after chunks of {self._images.shape[1]}x{self._images.shape[2]}")
        self._images[offset : offset + count] = np.frombuffer(chunk.pixels, dtype=np.uint8).reshape(count, h, w)
        if chunk.floats:
            if self._floats is None:
                self._floats = np.zeros((self.n, h, w), dtype=np.float32)
            self._floats[offset : offset + count] = np.frombuffer(chunk.floats, dtype="<f4").reshape(count, h, w)
        if chunk.labels:
            if not self._labels:
                self._labels = [0] * self.n
            self._labels[offset : offset + count] = chunk.labels
        self.received += count
        return count

    def result(self, finish: pb.Finish, id: str = "") -> ImageResult:
        if self._images is None or self.received != self.n:
            raise ServerError(f"the server finished the request after {self.received} of {self.n} samples")
        return ImageResult(self._images, tuple(self._labels), finish.seed, finish.model, finish.version, id, self._floats)


class TextAssembler:
    """Joins the pieces of one text request."""

    def __init__(self) -> None:
        self.pieces: list[str] = []

    @property
    def received(self) -> int:
        return len(self.pieces)

    def add(self, text: pb.Text) -> str:
        self.pieces.append(text.text)
        return text.text

    def result(self, finish: pb.Finish, id: str = "") -> TextResult:
        text = "".join(self.pieces)
        return TextResult(text, finish_reason(finish.reason), finish.n_generated, finish.seed, finish.model, finish.version, id)
