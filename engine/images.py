"""Batched generation for one-shot image models (engine/kinds.py: one forward pass per batch).

Flow (synchronous; ``Engine`` calls it, and runs batches on an engine thread or inline):

    gen = ImageGenerator(loaded_model, ImageLimits(max_n=1024, max_batch=256))
    chunk = gen.prepare(ImageRequest(n=16, seed=7), draw=False)  # validate, pick the seed
    results = gen.run([chunk, other_chunk])             # ONE forward pass; latents drawn in it
    parts = [gen.run([p])[0] for p in chunk.split(64)]  # a request > max_batch, piece by piece

Randomness is per request: its whole latent block, (n, latent_dim), comes from its own
``torch.Generator().manual_seed(seed)`` on the CPU, then, for a conditional model given no
labels, n labels from the same generator (z first, so a seed gives the same z with or without
labels). A chunk takes its rows of the whole block (torch's CPU normal sampler fills blocks of 16
values, so drawing piecewise would not equal drawing whole). With fixed-size tiles
(``ImageGenerator.forward``) a request's pixels are bit for bit the same whatever its batch
neighbours or its split into chunks. Why: docs/design/tiling.md

Requests: ``n`` from 1 to ``max_n``; ``seed`` from 0 to 2**63-1 (a signed 64-bit field on the
wire), or None to draw one (the result reports it); ``labels`` for conditional models only, each
in 0..num_classes-1, either n of them or a single one used for every sample; an empty sequence
means "no labels" (a proto3 repeated field cannot tell empty from absent). Every refusal is an
``InvalidImageRequest`` (a ValueError: gRPC INVALID_ARGUMENT) naming the field.

Output: uint8 pixels (k, size, size) rounded from the model's [0, 1] means (x * 255 + 0.5,
clamped, truncated: one vectorised pass per batch), and the float32 means too when asked.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from engine.errors import InvalidImageRequest, brief_repr
from engine.image_graph import ImageGraph, build_graph, image_graph
from engine.kinds import Shape
from engine.limits import ImageLimits
from engine.modelfile import LoadedModel

SEED_LIMIT = 2**63  # seeds are 0 .. 2**63 - 1

Forward = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


_F255 = np.float32(255.0)  # float32 scalars keep numpy's in-place ops in float32
_FHALF = np.float32(0.5)


# Not frozen: one is made a request on the event loop, and a frozen dataclass sets each field
# through object.__setattr__.
@dataclass(slots=True)
class ImageRequest:
    n: int
    seed: int | None = None  # None: a seed is drawn (ImageResult.seed reports it)
    labels: Sequence[int] | np.ndarray | None = None  # conditional models: n labels, or 1 for all
    want_float: bool = False  # also return the float32 means
    request_id: str = ""  # carried through for logs and routing only
    steps: int | None = None  # iterative models: solver steps (None: the model's default); one-shot models refuse it
    guidance: float | None = None  # iterative conditional models: guidance scale (None: the model's default)
    preview_every: int = 0  # iterative models: also deliver the current estimate every this many steps (0: none)


@dataclass(eq=False, slots=True, weakref_slot=True)  # weakly referable: tests check finished work is freed
class ImageChunk:
    """A validated request's inputs, or a slice of them: samples offset .. offset + n - 1 of ``total``.

    ``z`` None: not drawn yet (``prepare(request, draw=False)``). ``run`` then draws rows
    offset .. offset + n - 1 of the request's block, inside the CPU graph (engine/image_graph.py)
    or eagerly (``draw``). Not frozen: a deferred chunk's latents are filled in where drawn.
    """

    request: ImageRequest
    seed: int
    z: torch.Tensor | None  # (n, latent_dim) float32, CPU; None: not drawn yet
    labels: torch.Tensor | None  # (n,) int64, CPU; None for unconditional models (and deferred draws)
    offset: int = 0
    total: int = 0
    n: int = -1  # samples in this chunk (read often by batchers); -1: z's rows

    def __post_init__(self) -> None:
        if self.n < 0:
            if self.z is None:
                raise ValueError("a chunk without latents needs its n")
            self.n = int(self.z.shape[0])

    def split(self, size: int) -> list[ImageChunk]:
        """Consecutive slices of at most ``size`` samples (views: no copy)."""
        if size < 1:
            raise ValueError(f"chunk size must be >= 1, got {size}")
        if self.n <= size:
            return [self]
        z, labels = self.z, self.labels
        return [
            ImageChunk(
                self.request,
                self.seed,
                None if z is None else z[a : a + size],
                None if labels is None else labels[a : a + size],
                self.offset + a,
                self.total,
                min(size, self.n - a),
            )
            for a in range(0, self.n, size)
        ]


@dataclass(eq=False, slots=True, weakref_slot=True)  # not frozen: one a request (see ImageRequest)
class ImageResult:
    """Samples offset .. offset + k - 1 of a request of ``total`` samples."""

    request: ImageRequest
    seed: int
    offset: int
    total: int
    pixels: np.ndarray  # uint8 (k, size, size)
    labels: np.ndarray | None  # int64 (k,), the labels used (given or drawn); None if unconditional
    floats: np.ndarray | None = field(default=None)  # float32 (k, size, size) when want_float
    preview: bool = False  # an iterative model's estimate at ``step``, not the final samples
    step: int = 0  # iterative models: the steps done when these pixels were made

    @property
    def last(self) -> bool:
        """True for the chunk that completes its request."""
        return self.offset + len(self.pixels) == self.total


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


_local = threading.local()


def _generator() -> torch.Generator:
    """This thread's CPU generator, reseeded per request: making one costs ~3 us, a third of a draw."""
    gen: torch.Generator | None = getattr(_local, "generator", None)
    if gen is None:
        gen = _local.generator = torch.Generator()
    return gen


class ImageInputs:
    """An image model's request rules and latents (one-shot and iterative kinds alike): ``check``
    a request, ``draw`` its latents and labels from its seed."""

    def __init__(self, model: LoadedModel, limits: ImageLimits | None = None, max_n: int | None = None) -> None:
        self.model = model
        self.limits = limits or ImageLimits()
        self.max_n = self.limits.max_n if max_n is None else min(max_n, self.limits.max_n)
        cfg = model.config
        self.latent_dim: int = cfg.latent_dim
        self.num_classes: int = cfg.num_classes
        self.image_size: int = cfg.image_size

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def check(self, request: ImageRequest) -> np.ndarray | None:
        """Raise InvalidImageRequest if ``request`` cannot be served (the server's admission asks
        here, so the rules live in one place); return its labels as int64 (None: none given)."""
        n = request.n
        max_n = self.max_n
        if not _is_int(n) or not 1 <= n <= max_n:
            raise InvalidImageRequest("n", f"n must be an integer from 1 to {max_n}, got {brief_repr(n)}")
        seed = request.seed
        if seed is not None and (not _is_int(seed) or not 0 <= seed < SEED_LIMIT):
            raise InvalidImageRequest("seed", f"seed must be an integer from 0 to 2**63-1, got {brief_repr(seed)}")
        self._check_steps(request)
        return self._check_labels(request.labels, n)

    def _check_steps(self, request: ImageRequest) -> None:
        """A one-shot model takes no steps: refuse them, naming the field (an iterative model overrides)."""
        if request.steps is None and request.guidance is None and not request.preview_every:
            return  # the usual request: one test (this runs per request on the event loop)
        why = f"model {self.model.name!r} is a one-shot {self.model.kind} model (one forward pass, no steps)"
        for name in ("steps", "guidance"):
            if getattr(request, name) is not None:
                raise InvalidImageRequest(name, f"{name} is not accepted: {why}")
        raise InvalidImageRequest("preview_every", f"preview_every is not accepted: {why}")

    def draw(self, chunk: ImageChunk) -> ImageChunk:
        """Fill in a deferred chunk's latents (and drawn labels) eagerly; returns it. The request's
        whole block is drawn from its seed (z first, then a conditional model's labels: a seed gives
        the same z with or without labels), and the chunk's rows taken from it."""
        if chunk.z is None:
            gen = _generator().manual_seed(chunk.seed)
            total = chunk.total
            z = torch.randn((total, self.latent_dim), generator=gen)
            labels = torch.randint(0, self.num_classes, (total,), generator=gen) if self.conditional else None
            a, b = chunk.offset, chunk.offset + chunk.n
            whole = a == 0 and b == total
            chunk.z = z if whole else z[a:b]
            chunk.labels = labels if labels is None or whole else labels[a:b]
        return chunk

    def _check_labels(self, labels: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray | None:
        """Labels as int64, or None when none were given; vectorised (n can be large)."""
        if labels is None or len(labels) == 0:
            return None
        if not self.conditional:
            raise InvalidImageRequest("labels", f"model {self.model.name!r} is unconditional: labels are not accepted")
        if len(labels) not in (1, n):  # a request carries every sample's label: the SDK cycles fewer before sending
            k = len(labels)
            than = f"more than the {n} samples" if k > n else f"fewer than the {n} samples (repeat them to cycle them)"
            raise InvalidImageRequest("labels", f"labels has {k} entries, {than}; send {n} (one per sample) or 1 (used for every sample)")
        arr = np.asarray(labels)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":  # bools, floats, strings, huge ints (object) land here
            raise InvalidImageRequest("labels", f"labels must be integers, got {brief_repr(labels)}")
        bad = (arr < 0) | (arr >= self.num_classes)
        if bad.any():
            i = int(bad.argmax())
            raise InvalidImageRequest("labels", f"label {int(arr[i])} at index {i} is outside 0..{self.num_classes - 1}")
        return arr.astype(np.int64)  # a copy: the caller's array may change later


class ImageGenerator(ImageInputs):
    """Generation for one loaded one-shot image model; cheap to build, safe to share between threads."""

    def __init__(self, model: LoadedModel, limits: ImageLimits | None = None) -> None:
        if model.spec.shape is not Shape.ONE_SHOT:
            raise ValueError(f"{model.name}: a {model.kind} is not a one-shot image model")
        super().__init__(model, limits)
        self._forward = cast(Forward, model.module)  # a one-shot module's forward(z, labels) is its images
        self.device = next(model.module.parameters()).device
        # Rows per model call: every call sees exactly this many (the last tile is padded), so a
        # sample's floats are bit for bit the same alone or beside any neighbours (docs/design/tiling.md).
        self.tile: int = self.limits.tile or model.spec.tile
        self._half = torch.tensor(0.5, device=self.device)  # made once: a tensor constant per batch costs a few us
        self._graph: ImageGraph | bool | None = self.device.type == "cpu"  # True: not built yet (on first run)

    # -- validation and inputs (cheap; a processor stage may call this off the engine thread) --

    def prepare(self, request: ImageRequest, *, draw: bool = True) -> ImageChunk:
        """Validate ``request`` (``check``), pick its seed and draw its latents (and labels); raise
        InvalidImageRequest. ``draw=False`` (the engine's ``prepare``): leave the drawing to ``run``,
        in the batch, off the caller's thread; a request that brings labels is drawn here all the same."""
        given = self.check(request)
        n = request.n
        seed = int(request.seed) if request.seed is not None else secrets.randbelow(SEED_LIMIT)
        if given is None and not draw:
            return ImageChunk(request, seed, None, None, 0, n, n)
        chunk = ImageChunk(request, seed, None, None, 0, n, n)
        self.draw(chunk)
        if given is not None:  # drawn labels were replaced: the given ones (z does not depend on labels)
            chunk.labels = torch.from_numpy(given).expand(n) if len(given) == 1 else torch.from_numpy(given)
        return chunk

    # -- the forward pass (engine thread) -----------------------------------------------------

    def run(self, chunks: Sequence[ImageChunk]) -> list[ImageResult]:
        """Generate every chunk in ONE forward pass of at most ``max_batch`` samples; one result per chunk."""
        if not chunks:
            return []
        total = sum(c.n for c in chunks)
        if total > self.limits.max_batch:  # the batcher's job; memory is bounded by configuration
            raise ValueError(f"a batch holds at most {self.limits.max_batch} samples, got {total}: split the chunks first")
        want_float = any(c.request.want_float for c in chunks)
        graph = self.graph()
        drawn: np.ndarray | None = None  # labels drawn inside the graph (conditional models)
        floats: np.ndarray | None
        if graph is not None and all(c.z is None for c in chunks):
            # The CPU's one call, latents drawn inside (engine/image_graph.py): no torch call on the
            # event loop for the batch's requests, and the GIL given up once for the whole batch.
            x, levels, drawn_labels = graph.seeded(
                [c.seed for c in chunks], [c.total for c in chunks], [c.offset for c in chunks], [c.n for c in chunks], _generator()
            )
            floats, pixels = (x.numpy() if want_float else None), levels.numpy()
            drawn = drawn_labels.numpy() if self.conditional else None
        else:
            z, labels = self._inputs(chunks)
            if graph is not None:  # the CPU's one call for the given latents
                x, levels = graph(z, labels)
                floats, pixels = (x.numpy() if want_float else None), levels.numpy()
            else:
                with torch.inference_mode():
                    x = self.forward(z, labels)  # (B, size * size) in [0, 1], on the model's device
                    floats = x.float().cpu().numpy() if want_float else None
                    pixels = self._to_uint8(x, in_place=not want_float or self.device.type != "cpu")
        s = self.image_size
        pixels = pixels.reshape(total, s, s)
        results: list[ImageResult] = []
        a = 0
        for c in chunks:  # per request, not per sample: numpy views into the batch arrays
            b = a + c.n
            results.append(
                ImageResult(
                    request=c.request,
                    seed=c.seed,
                    offset=c.offset,
                    total=c.total,
                    pixels=pixels[a:b],
                    labels=drawn[a:b] if drawn is not None else None if c.labels is None else c.labels.numpy(),
                    floats=floats[a:b].reshape(c.n, s, s) if floats is not None and c.request.want_float else None,
                )
            )
            a = b
        return results

    def _inputs(self, chunks: Sequence[ImageChunk]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's latents and labels, one tensor each (deferred chunks drawn here)."""
        zs: list[torch.Tensor] = []
        for c in chunks:
            zs.append(c.z if c.z is not None else cast(torch.Tensor, self.draw(c).z))
        if len(chunks) == 1:
            return zs[0], chunks[0].labels
        labels = torch.cat([c.labels for c in chunks if c.labels is not None]) if self.conditional else None
        return torch.cat(zs), labels

    def graph(self) -> ImageGraph | None:
        """The CPU graph of ``forward`` and ``_to_uint8`` (built on first use, shared by every
        generator of this model and tile); None on other devices or where it is not available."""
        if self._graph is True:
            module = self.model.module
            self._graph = image_graph(
                module,
                self.tile,
                lambda: build_graph(
                    module,
                    latent_dim=self.latent_dim,
                    num_classes=self.num_classes,
                    tile=self.tile,
                    reference=self._eager,
                    draw=self._eager_draw,
                ),
            )
        return self._graph or None

    def _eager_draw(self, seed: int, total: int, offset: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        chunk = self.draw(ImageChunk(ImageRequest(n=total), seed, None, None, offset, total, n))
        return cast(torch.Tensor, chunk.z), chunk.labels

    def _eager(self, z: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(floats, uint8 levels) the eager way: what the graph must equal bit for bit."""
        with torch.inference_mode():
            x = self.forward(z, labels)
            return x, torch.from_numpy(self._to_uint8(x, in_place=False))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The model on (B, latent_dim) CPU latents, ``tile`` rows per call: (B, size * size) on the device.

        Batch invariance by construction: a CPU GEMM picks its blocking, and so the order in which
        it sums a row's products, from the matrix shape. Each call here has exactly ``tile`` rows
        (the last tile padded with zeros), so every row takes the same kernel path whatever its
        neighbours or its place in the batch. Call under ``torch.inference_mode``.
        """
        total, t = int(z.shape[0]), self.tile
        pad = -total % t
        if pad:
            z = torch.cat([z, z.new_zeros((pad, z.shape[1]))])
            labels = None if labels is None else torch.cat([labels, labels.new_zeros(pad)])
        if self.device.type != "cpu":
            z = z.to(self.device, non_blocking=True)
            labels = None if labels is None else labels.to(self.device, non_blocking=True)
        if total + pad == t:  # one tile: no copy, a view of the padded output
            return self._forward(z, labels)[:total]
        first = self._forward(z[:t], None if labels is None else labels[:t])
        x = first.new_empty((total + pad, first.shape[1]))
        x[:t] = first
        for a in range(t, total + pad, t):
            x[a : a + t] = self._forward(z[a : a + t], None if labels is None else labels[a : a + t])
        return x[:total]

    def batch_invariant(self) -> bool:
        """Whether a row's floats are the same wherever it sits in a tile, the premise of
        ``forward``'s tiling: a block of probe rows is run at the start of one tile, then near the
        end and in the middle of another, beside other rows, and compared bit for bit. Narrow
        layers can fail it on some BLAS kernels; the registry warns then."""
        t = self.tile
        k = max(1, t // 8)
        gen = torch.Generator().manual_seed(1)
        z = torch.randn((2 * t, self.latent_dim), generator=gen).to(self.device)
        labels = torch.randint(0, self.num_classes, (2 * t,), generator=gen).to(self.device) if self.conditional else None
        with torch.inference_mode():
            want = self.forward(z[:t], None if labels is None else labels[:t])[:k]
            for at in sorted({t - k, (t - k) // 2} - {0}):
                zb = z[t:].clone()
                zb[at : at + k] = z[:k]
                lb = None
                if labels is not None:
                    lb = labels[t:].clone()
                    lb[at : at + k] = labels[:k]
                if not torch.equal(self.forward(zb, lb)[at : at + k], want):
                    return False
        return True

    def _to_uint8(self, x: torch.Tensor, in_place: bool) -> np.ndarray:
        """[0, 1] -> uint8 levels, rounded to nearest: x * 255 + 0.5, clamped, truncated; one batch at a time.

        ``in_place`` reuses x (the model's fresh output) when its floats are not returned (or have
        already been copied off the GPU). On the CPU numpy's in-place passes and float -> uint8 cast
        are quicker than torch's; on a GPU ``torch.add(0.5, x, alpha=255)`` is one pass instead of two, and
        the cast runs there, so a quarter of the bytes cross to the host.
        """
        if x.device.type == "cpu":
            y = x if in_place else x.clone()
            y.clamp_(0.0, 1.0)  # guards a model whose output strays outside [0, 1]
            a = y.numpy()
            np.multiply(a, _F255, out=a)
            a += _FHALF
            return a.astype(np.uint8)
        y = torch.add(self._half, x, alpha=255.0, out=x) if in_place else torch.add(self._half, x, alpha=255.0)
        y.clamp_(0.0, 255.0)
        return y.to(torch.uint8).cpu().numpy()

    # -- conveniences ---------------------------------------------------------------------------

    def generate(self, requests: Sequence[ImageRequest]) -> list[ImageResult]:
        """Prepare and run ``requests`` as one forward pass (their total must fit in max_batch)."""
        return self.run([self.prepare(r) for r in requests])
