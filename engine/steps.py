"""Step-level continuous batching for iterative image models (engine/kinds.py ``Shape.ITERATIVE``).

An iterative model advances a state by steps (a flow model integrates its ODE from noise at t = 0
to data at t = 1). ``StepBatch`` keeps every active request's state and advances all of them by one
step per ``step()``: each request at its own time and with its own number of steps. Requests join
between steps when there are rows for them, and leave as soon as they finish or are cancelled,
so a short request does not wait for the long ones beside it. One decode thread per model version
drives it (engine/engine.py ``DecodeThread``, as for text).

    batch = StepBatch(IterativeImages(loaded, ImageLimits(step_rows=64)), max_pending=256)
    handle = batch.add(ImageRequest(n=4, seed=7, steps=20))
    while batch.has_work:
        for event in batch.step():        # previews, finals, cancellations
            ...

Determinism. A request's latents come from its seed (``ImageInputs.draw``, as for one-shot kinds),
every model call sees exactly ``tile`` rows (the last tile padded), and a kind's step is row-wise
(engine/kinds.py), so a request's samples are bit for bit the same alone or beside any others that
join and leave during its steps, and under both batching modes. ``request`` mode (``--step-batching
request``) admits new requests only when the batch is empty: the whole batch runs all its steps,
then the next one starts (the baseline ``python -m bench.flow`` compares against).
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.errors import InvalidImageRequest, QueueFullError, brief_repr
from engine.images import SEED_LIMIT, ImageChunk, ImageInputs, ImageRequest, ImageResult
from engine.kinds import IterativeModule, Shape, Steps
from engine.limits import ImageLimits
from engine.modelfile import LoadedModel

MAX_GUIDANCE = 20.0


class IterativeImages(ImageInputs):
    """An iterative model's request rules (n, seed, labels, steps, guidance, previews) and its
    tiled calls into the kind's ``step``, ``estimate`` and ``decode``."""

    def __init__(self, model: LoadedModel, limits: ImageLimits | None = None) -> None:
        if model.spec.shape is not Shape.ITERATIVE or model.spec.steps is None:
            raise ValueError(f"{model.name}: a {model.kind} is not an iterative image model")
        limits = limits or ImageLimits()
        super().__init__(model, limits, max_n=limits.step_rows)  # a request's samples advance together: at most the batch's rows
        self.rows = limits.step_rows
        self.module: IterativeModule = model.module  # type: ignore[assignment]
        self.steps: Steps = model.spec.steps(model.config)
        self.tile: int = self.limits.tile or model.spec.tile

    def _check_steps(self, request: ImageRequest) -> None:
        steps, guidance, every = request.steps, request.guidance, request.preview_every
        s = self.steps
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or not s.low <= steps <= s.high):
            raise InvalidImageRequest(
                "steps", f"steps must be an integer from {s.low} to {s.high} (default {s.default}), got {brief_repr(steps)}"
            )
        if guidance is not None:
            if not self.conditional:
                raise InvalidImageRequest("guidance", f"guidance is not accepted: model {self.model.name!r} is unconditional")
            if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not 0.0 <= guidance <= MAX_GUIDANCE:
                raise InvalidImageRequest("guidance", f"guidance must be a number from 0 to {MAX_GUIDANCE:g}, got {brief_repr(guidance)}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise InvalidImageRequest("preview_every", f"preview_every must be an integer >= 0 (0: no previews), got {brief_repr(every)}")

    # -- tiled model calls (the engine thread) ---------------------------------------------------

    def _tiled(self, rows: int, call: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.Tensor:
        """``call`` over ``tensors`` in tiles of exactly ``tile`` rows (the last padded): batch invariance."""
        t = self.tile
        pad = -rows % t
        padded = [None if x is None else (torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x) for x in tensors]
        outs = [call(*(None if x is None else x[a : a + t] for x in padded)) for a in range(0, rows + pad, t)]
        return torch.cat(outs)[:rows] if len(outs) > 1 else outs[0][:rows]

    def step(self, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, labels: torch.Tensor | None, guidance: torch.Tensor) -> torch.Tensor:
        return self._tiled(x.shape[0], self.module.step, x, t, dt, labels, guidance)

    def estimate(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, guidance: torch.Tensor) -> torch.Tensor:
        return self._tiled(x.shape[0], self.module.estimate, x, t, labels, guidance)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self._tiled(x.shape[0], self.module.decode, x)


@dataclass(eq=False, slots=True)
class StepHandle:
    """A request in a step batch: its id (for routing), its seed, and whether it was cancelled."""

    id: int
    seed: int
    request: ImageRequest
    labels: np.ndarray | None  # the labels it gave, as int64 (None: drawn from its seed)
    cancelled: bool = False
    finished: bool = False


@dataclass(eq=False, slots=True)
class StepEvent:
    """What a step produced for one request: a preview, its final samples, or its end by cancellation."""

    handle: StepHandle
    result: ImageResult | None  # None: cancelled
    finished: bool  # its last event (final samples or cancelled)


@dataclass(eq=False, slots=True)
class _Active:
    handle: StepHandle
    x: torch.Tensor  # (n, latent_dim): the state
    labels: torch.Tensor | None  # (n,) int64; None for unconditional models
    labels_np: np.ndarray | None
    steps: int
    guidance: float
    done: int = 0  # steps taken
    n: int = field(init=False)

    def __post_init__(self) -> None:
        self.n = int(self.x.shape[0])


_ids = itertools.count(1)


class StepBatch:
    """The active requests of one iterative model, advanced together one step at a time."""

    def __init__(self, images: IterativeImages, *, max_pending: int, mode: str = "step") -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.images = images
        self.rows = images.rows
        self.max_pending = max_pending
        self.request_level = mode == "request"
        self._pending: deque[StepHandle] = deque()
        self._active: list[_Active] = []
        self._lock = threading.Lock()  # add / cancel (any thread) against step (the decode thread)
        self._cancelled = 0
        self.steps_run = 0  # model steps taken (for the metrics)

    # -- counts ----------------------------------------------------------------------------------

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def active_rows(self) -> int:
        return sum(a.n for a in self._active)

    @property
    def has_work(self) -> bool:
        return bool(self._pending or self._active)

    # -- requests (any thread) ---------------------------------------------------------------------

    def add(self, request: ImageRequest) -> StepHandle:
        """Queue a request; raises InvalidImageRequest (naming the field) or QueueFullError at once."""
        given = self.images.check(request)
        seed = int(request.seed) if request.seed is not None else secrets.randbelow(SEED_LIMIT)
        handle = StepHandle(next(_ids), seed, request, given)
        with self._lock:
            if len(self._pending) >= self.max_pending:
                raise QueueFullError(f"{len(self._pending)} requests already wait for this model's step batch")
            self._pending.append(handle)
        return handle

    def cancel(self, handle: StepHandle) -> bool:
        """Leave the batch at the next step; False when it has finished already."""
        with self._lock:
            if handle.cancelled or handle.finished:
                return False
            handle.cancelled = True
            self._cancelled += 1
            return True

    # -- the step (the decode thread) ---------------------------------------------------------------

    def step(self) -> list[StepEvent]:
        """Admit what fits, advance every active request by one step; its events (previews, finals, cancellations)."""
        events: list[StepEvent] = []
        self._drop_cancelled(events)
        self._admit()
        if not self._active:
            return events
        active = self._active
        inputs = self.images
        with torch.inference_mode():
            x = torch.cat([a.x for a in active]) if len(active) > 1 else active[0].x
            t = torch.cat([torch.full((a.n,), a.done / a.steps) for a in active])
            dt = torch.cat([torch.full((a.n,), 1.0 / a.steps) for a in active])
            guidance = torch.cat([torch.full((a.n,), a.guidance) for a in active])
            labels = torch.cat([a.labels for a in active if a.labels is not None]) if inputs.conditional else None
            moved = inputs.step(x, t, dt, labels, guidance)
            self.steps_run += 1
            finished: list[_Active] = []
            previews: list[_Active] = []
            at = 0
            for a in active:
                a.x = moved[at : at + a.n].clone()  # its own storage: the batch's tensor is freed with this step
                at += a.n
                a.done += 1
                if a.done >= a.steps:
                    finished.append(a)
                elif a.handle.request.preview_every and a.done % a.handle.request.preview_every == 0:
                    previews.append(a)
            if previews:
                self._previews(previews, events)
            if finished:
                self._finals(finished, events)
        if finished:
            gone = {id(a) for a in finished}
            self._active = [a for a in active if id(a) not in gone]
        return events

    def _drop_cancelled(self, events: list[StepEvent]) -> None:
        if not self._cancelled:
            return
        with self._lock:
            self._cancelled = 0
            gone = [h for h in self._pending if h.cancelled]
            if gone:
                self._pending = deque(h for h in self._pending if not h.cancelled)
        gone += [a.handle for a in self._active if a.handle.cancelled]
        self._active = [a for a in self._active if not a.handle.cancelled]
        events.extend(StepEvent(h, None, True) for h in gone)

    def _admit(self) -> None:
        if self.request_level and self._active:
            return  # request-level batching: the batch runs all its steps before the next one starts
        free = self.rows - self.active_rows
        inputs = self.images
        spec = inputs.steps
        while True:
            with self._lock:
                if not self._pending or self._pending[0].request.n > free:
                    return
                handle = self._pending.popleft()
            r = handle.request
            chunk = inputs.draw(ImageChunk(r, handle.seed, None, None, 0, r.n, r.n))
            given, labels = handle.labels, chunk.labels
            if given is not None:
                labels = torch.from_numpy(given).expand(r.n).contiguous() if len(given) == 1 else torch.from_numpy(given)
            assert chunk.z is not None
            self._active.append(
                _Active(
                    handle,
                    chunk.z,
                    labels,
                    None if labels is None else labels.numpy(),
                    r.steps if r.steps is not None else spec.default,
                    float(r.guidance) if r.guidance is not None else spec.guidance,
                )
            )
            free -= r.n

    def _stack(self, group: list[_Active]) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = torch.cat([a.x for a in group]) if len(group) > 1 else group[0].x
        labels = torch.cat([a.labels for a in group if a.labels is not None]) if self.images.conditional else None
        return x, labels

    def _previews(self, group: list[_Active], events: list[StepEvent]) -> None:
        x, labels = self._stack(group)
        t = torch.cat([torch.full((a.n,), a.done / a.steps) for a in group])
        guidance = torch.cat([torch.full((a.n,), a.guidance) for a in group])
        clean = self.images.estimate(x, t, labels, guidance)
        self._results(group, self.images.decode(clean), events, preview=True)

    def _finals(self, group: list[_Active], events: list[StepEvent]) -> None:
        x, _ = self._stack(group)
        self._results(group, self.images.decode(x), events, preview=False)

    def _results(self, group: list[_Active], floats: torch.Tensor, events: list[StepEvent], *, preview: bool) -> None:
        s = self.images.image_size
        values = floats.clamp(0.0, 1.0).numpy()
        pixels = (values * np.float32(255.0) + np.float32(0.5)).astype(np.uint8).reshape(-1, s, s)
        at = 0
        for a in group:
            r = a.handle.request
            result = ImageResult(
                request=r,
                seed=a.handle.seed,
                offset=0,
                total=a.n,
                pixels=pixels[at : at + a.n],
                labels=a.labels_np,
                floats=values[at : at + a.n].reshape(a.n, s, s).copy() if r.want_float else None,
                preview=preview,
                step=a.done,
            )
            at += a.n
            a.handle.finished = not preview
            events.append(StepEvent(a.handle, result, not preview))
