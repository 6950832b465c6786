"""The edge between our values and genserve.v1 messages: building requests, assembling answers.

Shared by the one-call methods (``Generate``) and the session (``GenerateStream``), which see
the same ``GenerateResponse`` messages.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def image_request(
    model: str, n: int, *, seed: int | None = None, labels: Labels = None, version: int = 0, want_float: bool = False, id: str = ""
) -> pb.GenerateRequest:
    """``labels``: see ``expand_labels`` (one for all, a list cycled over the samples, "0-9"); None: drawn from the seed."""
    params = pb.ImageParams(n=n, seed=seed, labels=expand_labels(labels, n), want_float=want_float)
    return pb.GenerateRequest(model=model, version=version, id=id, image=params)


def text_request(
    model: str,
    prompt: str,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
    version: int = 0,
    id: str = "",
) -> pb.GenerateRequest:
    """Unset sampling options take the server's defaults (256 tokens, temperature 1, no top-k/top-p)."""
    stops = [stop] if isinstance(stop, str) else list(stop)
    params = pb.TextParams(
        prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stops
    )
    return pb.GenerateRequest(model=model, version=version, id=id, text=params)


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
