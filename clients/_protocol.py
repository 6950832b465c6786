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

Labels = int | str | Sequence[int] | None


def parse_labels(spec: str) -> list[int]:
    """``"0-9"``, ``"7"``, ``"1,3,5"`` or ``"0-4,9"`` as a list of labels, in the order written."""
    labels: list[int] = []
    for part in spec.replace(" ", "").split(","):
        low, dash, high = part.partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise ValueError(f"labels {spec!r}: {part!r} is not a label or a range like 0-9") from None
        if last < first:
            raise ValueError(f"labels {spec!r}: the range {part!r} runs backwards")
        labels.extend(range(first, last + 1))
    return labels


def expand_labels(labels: Labels, n: int) -> list[int]:
    """The labels a request carries for ``n`` samples.

    One label (an int, or a list of one) is every sample's. A list of k labels with 1 < k < n is
    cycled: sample i gets ``labels[i % k]``, so ``range(10)`` (or ``"0-9"``) with n=40 is 0-9 four
    times. A list of n labels is one per sample; more than n is left for the server to refuse.
    """
    if isinstance(labels, str):
        labels = parse_labels(labels)
    label_list = [labels] if isinstance(labels, int) else list(labels or ())
    if 1 < len(label_list) < n:
        label_list = [label_list[i % len(label_list)] for i in range(n)]
    return label_list


# The options of a request, one keyword set per kind, shared by every method that sends one
# (AsyncClient, Client, Session, SyncSession): a new option is added here, once.
class ImageOptions(TypedDict, total=False):
    """seed: the same seed gives the same samples (drawn by the server when None).
    labels: conditional models: one label for all samples; a list, cycled over the samples when shorter
        (``range(10)`` with n=40: 0-9 four times); or a string such as "0-9" or "1,3,5"; None: drawn from the seed.
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
    params = pb.ImageParams(n=n, seed=options.get("seed"), labels=expand_labels(options.get("labels"), n), want_float=want_float)
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
