"""The edge between our values and genserve.v1 messages: building requests, assembling answers.

Shared by the one-call methods (``Generate``) and the session (``GenerateStream``), which see
the same ``GenerateResponse`` messages.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from typing import TypedDict, Unpack

import numpy as np
import numpy.typing as npt

from clients._exceptions import InvalidRequest, ServerError
from clients._types import ImageResult, TextResult, finish_reason
from genserve.v1 import generator_pb2 as pb

Labels = int | str | Sequence[int] | None

# What a request's numbers may be to be sent at all: the range of the protobuf field's type (protobuf
# raises "ValueError: Value out of range" past it), or the server's range where that one is narrower
# and the same on every server (image seeds, temperature, top_p): a request refused here would be
# refused there too, and the message says the server's range. Ranges that depend on the server or
# model (n up to max_n, max_new_tokens up to the server's cap, a model's labels) are the server's to
# check, with a message that says the limit it has.
UINT32_MAX = 2**32 - 1  # n, version, max_new_tokens, top_k, timeout_ms
TEXT_SEED_MAX = 2**64 - 1  # a uint64, all of it (torch.Generator takes 0 <= seed < 2**64)
IMAGE_SEED_MAX = 2**63 - 1  # a uint64, but image seeds are 0..2**63-1 (engine/images.py)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1  # each label
FLOAT32_MAX = float(np.finfo(np.float32).max)  # temperature, top_p: a bigger float is sent as inf


def _integer(field: str, value: object, low: int, high: int, expected: str) -> int:
    """``value`` as an int in low..high (a numpy integer is fine, a bool or float is not), else InvalidRequest:
    "<field> must be an integer <expected>, got <value>"."""
    number: int | None = None
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError):
            number = operator.index(value)  # type: ignore[arg-type]
    if number is None or not low <= number <= high:
        raise InvalidRequest(f"{field} must be an integer {expected}, got {value!r}")
    return number


def _number(value: object) -> float | None:
    """``value`` as a float, or None when it is no real number (a bool or a string is not one; a numpy float is)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


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
    times. A list of n labels is one per sample. More than n labels, or a label that is no int32,
    raises InvalidRequest; whether a label is in the model's range is the server's to say.
    """
    if isinstance(labels, str):
        try:
            labels = parse_labels(labels)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
    label_list = [labels] if isinstance(labels, int | np.integer) else list(() if labels is None else labels)
    for i, label in enumerate(label_list):
        if isinstance(label, bool) or not isinstance(label, int | np.integer) or not INT32_MIN <= label <= INT32_MAX:
            where = f" at index {i}" if len(label_list) > 1 else ""
            raise InvalidRequest(f"labels must be integers in the model's range (see its label_min and label_max), got {label!r}{where}")
    if len(label_list) > n >= 1:  # (n < 1: the server refuses n first)
        raise InvalidRequest(f"labels has {len(label_list)} entries, more than the {n} samples; give at most {n} labels (fewer are cycled)")
    if 1 < len(label_list) < n:
        label_list = [label_list[i % len(label_list)] for i in range(n)]
    return [int(label) for label in label_list]


# The options of a request, one keyword set per kind, shared by every method that sends one
# (AsyncClient, Client, Session, SyncSession): a new option is added here, once.
class ImageOptions(TypedDict, total=False):
    """seed: the same seed gives the same samples (drawn by the server when None).
    labels: conditional models: one label for all samples; a list, cycled over the samples when shorter
        (``range(10)`` with n=40: 0-9 four times); or a string such as "0-9" or "1,3,5"; None: drawn from the seed.
    version: 0 (or unset) for the latest.
    steps: iterative models (flow): solver steps (unset: the model's default; see ``list_models``).
    guidance: iterative conditional models: classifier-free guidance scale, 0 to 20 (1: none; unset: the model's default).
    preview_every: iterative models: also send the current estimate every this many steps (``stream_images``; 0: none)."""

    seed: int | None
    labels: Labels
    version: int
    steps: int | None
    guidance: float | None
    preview_every: int


class TextOptions(TypedDict, total=False):
    """Unset (or None) sampling options take the server's defaults (its default number of tokens for
    a request that sets none, temperature 1.0, top-k and top-p off); ``temperature=0`` is greedy. The
    text ends after ``max_new_tokens`` or once it contains one of the ``stop`` strings. version: 0
    (or unset) for the latest."""

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


def _version(options: Mapping[str, object]) -> int:
    return _integer("version", options.get("version", 0), 0, UINT32_MAX, "from 0 to 2**32-1 (0: the latest)")


def _optional_integer(options: Mapping[str, object], field: str, low: int, high: int, expected: str) -> int | None:
    value = options.get(field)
    return None if value is None else _integer(field, value, low, high, expected)


def image_request(model: str, n: int, *, want_float: bool = False, id: str = "", **options: Unpack[ImageOptions]) -> pb.GenerateRequest:
    """The request for ``n`` samples; raises InvalidRequest, naming the field, for a value it cannot carry."""
    _check_options(options, _IMAGE_OPTIONS, "an image")
    n = _integer("n", n, 0, UINT32_MAX, "from 1 to the model's max_n")
    seed = _optional_integer(options, "seed", 0, IMAGE_SEED_MAX, "from 0 to 2**63-1")
    steps = _optional_integer(options, "steps", 0, UINT32_MAX, "from the model's steps_min to steps_max")
    every = _optional_integer(options, "preview_every", 0, UINT32_MAX, "from 0 (no previews) up")
    guidance = options.get("guidance")
    if guidance is not None:
        g = _number(guidance)
        if g is None or not 0 <= g <= FLOAT32_MAX:  # NaN fails the comparison; the range is the server's (0 to 20)
            raise InvalidRequest(f"guidance must be a number from 0 to 20, got {guidance!r}")
    params = pb.ImageParams(
        n=n,
        seed=seed,
        labels=expand_labels(options.get("labels"), n),
        want_float=want_float,
        steps=steps,
        guidance=guidance,
        preview_every=every or 0,
    )
    return pb.GenerateRequest(model=model, version=_version(options), id=id, image=params)


def text_request(model: str, prompt: str, *, id: str = "", **options: Unpack[TextOptions]) -> pb.GenerateRequest:
    """The request for text after ``prompt``; raises InvalidRequest, naming the field, for a value it cannot carry."""
    _check_options(options, _TEXT_OPTIONS, "a text")
    stop = options.get("stop", ())
    stops = [stop] if isinstance(stop, str) else list(stop)
    temperature = options.get("temperature")  # the server's ranges and words, for NaN and inf too
    if temperature is not None:
        t = _number(temperature)
        if t is None or not 0 <= t <= FLOAT32_MAX:  # NaN fails the comparison
            why = " (infinite as the float32 a request carries)" if t is not None and math.isfinite(t) and t > 0 else ""
            raise InvalidRequest(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}{why}")
    top_p = options.get("top_p")
    if top_p is not None:
        p = _number(top_p)
        if p is None or not 0 < p <= 1:  # NaN fails the comparison
            raise InvalidRequest(f"top_p must be in (0, 1] (1 turns it off), got {top_p!r}")
    params = pb.TextParams(
        prompt=prompt,
        max_new_tokens=_optional_integer(options, "max_new_tokens", 0, UINT32_MAX, "from 1 to the server's max_new_tokens"),
        temperature=temperature,
        top_k=_optional_integer(options, "top_k", 0, UINT32_MAX, "from 0 to 2**32-1 (0 turns it off)"),
        top_p=top_p,
        seed=_optional_integer(options, "seed", 0, TEXT_SEED_MAX, "from 0 to 2**64-1"),
        stop=stops,
    )
    return pb.GenerateRequest(model=model, version=_version(options), id=id, text=params)


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
