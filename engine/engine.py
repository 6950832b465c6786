"""The engine's face: everything a server (or a library user) asks of the models goes through ``Engine``.

- ``check`` and ``prepare`` an image request (validate it, pick its seed, split it into pieces of
  at most a batch), ``preferred_batch`` (the rows a forward pass costs anyway), and
  ``generate_images`` (one forward pass for a batch of pieces, on the engine's pool or inline).
- ``submit`` a text sequence to its model's decode thread (continuous batching) and get a
  ``Ticket`` (its seed; ``cancel``), ``room`` (how many more may wait), ``stream_text`` (the same as
  an async iterator, for library use).
- ``calibrate``, ``retire`` and ``close`` manage where batches run and what is kept.

Model code runs on engine threads, never on the event loop. Decode threads are keyed by the served
entry (a file reloaded in place is a new entry of the same version), so sequences started on an
entry finish there; ``retire`` stops an entry's thread once the server has let its last request finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from engine.decode import DecodeBatch, SequenceHandle, SequenceRequest, TokenEvent
from engine.errors import EngineError, InvalidRequestError
from engine.faults import Faults
from engine.images import ImageChunk, ImageGenerator, ImageInputs, ImageRequest, ImageResult
from engine.limits import EngineLimits
from engine.logs import get_logger
from engine.registry import ServedModel
from engine.steps import StepBatch, StepEvent, StepHandle

log = get_logger("engine")

Event = TokenEvent | StepEvent
OnEvent = Callable[[Event | BaseException], None]  # a request's listener, called on the decode thread


class DecodeThread:
    """Drives one model's stepped batch on its own thread (a text model's DecodeBatch, an iterative
    model's StepBatch) and hands each event to its request's listener."""

    def __init__(
        self,
        served: ServedModel,
        limits: EngineLimits,
        faults: Faults | None = None,
        on_failed: Callable[[DecodeThread], None] | None = None,
    ) -> None:
        self.served = served
        self.faults = faults
        self.on_failed = on_failed  # called on this thread once it has failed (the engine replaces it there)
        self.max_pending = limits.decode_pending if served.stepper is None else limits.step_pending
        self._loop: DecodeBatch | StepBatch | None = (
            DecodeBatch.from_loaded(
                served.model,
                max_batch=limits.decode_batch,
                max_pending=limits.decode_pending,
                max_new_tokens_cap=limits.max_new_tokens,
                precision=limits.decode_precision,
            )
            if served.stepper is None
            else StepBatch(served.stepper, max_pending=limits.step_pending, mode=limits.step_batching)
        )
        self._listeners: dict[int, OnEvent] = {}
        self._listeners_lock = threading.Lock()  # held across add + register, so no event beats its listener
        self._wake = threading.Event()
        self._stopping = False
        self.failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"decode-{served.name}@{served.version}", daemon=True)
        self._thread.start()

    def submit(self, request: SequenceRequest | ImageRequest, on_event: OnEvent) -> SequenceHandle | StepHandle:
        """Queue a sequence (text) or an image request (iterative models); raises InvalidRequestError or QueueFullError at once."""
        with self._listeners_lock:  # checked under the lock: the failure path sets it under the same lock
            if self.failed is not None:
                raise EngineError(f"decode loop of {self.served.name} stopped: {self.failed}")
            loop = self._loop
            assert loop is not None  # released only after `failed` is set, under this lock
            handle: SequenceHandle | StepHandle
            if isinstance(loop, StepBatch):
                if not isinstance(request, ImageRequest):
                    raise InvalidRequestError(f"model {self.served.name!r} makes images: send image params, not text")
                handle = loop.add(request)
            else:
                if not isinstance(request, SequenceRequest):
                    raise InvalidRequestError(f"model {self.served.name!r} makes text: send text params, not image")
                handle = loop.add(request)
            self._listeners[handle.id] = on_event
        self._wake.set()
        return handle

    @property
    def alive(self) -> bool:
        """Its thread runs (decoding, or, once failed, building its replacement)."""
        return self._thread.is_alive()

    @property
    def loop(self) -> DecodeBatch:
        """Its DecodeBatch (text models); a failed decode thread has released it (and its KV cache): EngineError."""
        loop = self._loop
        if loop is None:
            raise EngineError(f"decode loop of {self.served.name} stopped: {self.failed}")
        if not isinstance(loop, DecodeBatch):
            raise EngineError(f"{self.served.name} is not a text model")
        return loop

    @property
    def batch(self) -> DecodeBatch | StepBatch | None:
        """Its stepped batch, whatever the kind (None once failed): for the metrics."""
        return self._loop

    def room(self, max_pending: int) -> int:
        """How many more sequences may wait for a slot (of ``max_pending``); 0 once it has failed."""
        loop = self._loop
        if loop is None or self.failed is not None:
            return 0
        return max(0, max_pending - loop.pending_count)

    def cancel(self, handle: SequenceHandle | StepHandle) -> None:
        loop = self._loop
        if loop is None:
            return
        if isinstance(loop, StepBatch):
            cancelled = isinstance(handle, StepHandle) and loop.cancel(handle)
        else:
            cancelled = isinstance(handle, SequenceHandle) and loop.cancel(handle)
        if cancelled:
            self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self.join(5.0)

    def join(self, timeout: float) -> None:
        """Wait for its thread to end (after a failure: once the replacement is built)."""
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        if not self._decode():
            return
        with self._listeners_lock:
            # A failed batch never steps again: free its KV cache now, before the replacement allocates
            # its own (both at once were a +50 MB peak), not when the last job lets go of this thread.
            self._loop = None
        if self.on_failed is not None:
            self.on_failed(self)  # outside the except block: nothing raised there chains the failure

    def _decode(self) -> bool:
        """Step the loop until stopped (False) or until a step fails (True: every sequence has heard)."""
        loop = self._loop
        assert loop is not None
        while not self._stopping:
            if not loop.has_work:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                if self.faults is not None:
                    self.faults.before_decode_step(self.served)
                events = loop.step()
            except Exception as e:  # model code failed: every waiting request hears of it
                log.exception("decode_loop_failed", model=self.served.name, version=self.served.version)
                with self._listeners_lock:
                    # without its traceback: the traceback holds this frame, whose `self` would
                    # keep the dead thread's batch and KV cache alive until the cyclic collector ran
                    self.failed = e.with_traceback(None)
                    listeners, self._listeners = list(self._listeners.values()), {}
                heard = generation_failed(self.served, e)
                for on_event in listeners:
                    on_event(heard)
                return True
            self._deliver(events)
        return False

    def _deliver(self, events: list[TokenEvent] | list[StepEvent]) -> None:
        """Hand each event to its listener. A method of its own: its locals (the last listeners, which
        close over their jobs) end here, not at the next step, which may be long in coming."""
        with self._listeners_lock:
            routed: list[tuple[OnEvent | None, Event]] = [
                (self._listeners.pop(ev.handle.id, None) if ev.finished else self._listeners.get(ev.handle.id), ev) for ev in events
            ]
        for target, ev in routed:
            if target is not None:
                target(ev)


def generation_failed(served: ServedModel, cause: BaseException) -> EngineError:
    """The error a request hears when model code failed under it (its cause is logged, not sent)."""
    return cause if isinstance(cause, EngineError) else EngineError(f"generation failed in {served.name}: {type(cause).__name__}")


def _into_queue(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Event | BaseException]) -> OnEvent:
    def on_event(item: Event | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening any more
            loop.call_soon_threadsafe(queue.put_nowait, item)

    return on_event


@dataclass(eq=False, slots=True)
class Ticket:
    """A sequence submitted to its model's decode thread: its seed, and how to cancel it."""

    seed: int
    _runner: DecodeThread
    _handle: SequenceHandle | StepHandle

    def cancel(self) -> None:
        """Leave the decode batch at its next step (frees its slot and cache); a no-op once finished."""
        self._runner.cancel(self._handle)


class Engine:
    """Runs model code: image batches on a thread pool, text on one decode thread per model version."""

    def __init__(self, limits: EngineLimits | None = None, *, faults: Faults | None = None) -> None:
        limits = limits or EngineLimits()
        self.limits = limits
        self.faults = faults  # the fault-injection seam (engine/faults.py): None in the product; see install_faults
        self._pool = ThreadPoolExecutor(max_workers=limits.image_threads, thread_name_prefix="engine-images")
        # Image models whose whole batch (``calibrate``) takes under ``inline_image_ms`` run on the
        # calling (event loop) thread: a pool thread must win the GIL back from a busy loop between
        # torch ops (docs/design/batch-window.md). 0: every batch goes to the pool.
        self._inline: dict[ServedModel, bool] = {}
        self._workers: dict[ServedModel, DecodeThread] = {}
        self._workers_lock = threading.Lock()
        self._closed = False

    # -- one-shot image models ----------------------------------------------------------------

    def check(self, served: ServedModel, request: ImageRequest) -> None:
        """Raise InvalidImageRequest (naming the field) if ``served`` (a one-shot or iterative image
        model) cannot take ``request``."""
        inputs: ImageInputs | None = served.images if served.images is not None else served.stepper
        if inputs is None:
            raise InvalidRequestError(f"model {served.name!r} is a {served.kind} model, not an image model")
        inputs.check(request)

    def prepare(self, served: ServedModel, request: ImageRequest, max_piece: int | None = None) -> list[ImageChunk]:
        """``request`` checked, its seed picked (``chunks[0].seed``), in pieces of at most a batch
        (and ``max_piece``), in order. Latents are drawn when a piece runs, in its batch."""
        images = self._images(served)
        whole = images.prepare(request, draw=False)
        size = images.limits.max_batch if max_piece is None else min(images.limits.max_batch, max_piece)
        return whole.split(size) if whole.n > size else [whole]

    def preferred_batch(self, served: ServedModel) -> int:
        """Samples a forward pass of ``served`` costs anyway (its tile): a smaller batch gains nothing by running early."""
        return self._images(served).tile

    @staticmethod
    def _images(served: ServedModel) -> ImageGenerator:
        if served.images is None:
            raise InvalidRequestError(f"model {served.name!r} is a {served.kind} model, not an image model")
        return served.images

    async def generate_images(self, served: ServedModel, chunks: Sequence[ImageChunk]) -> list[ImageResult]:
        """One forward pass for ``chunks`` (from ``prepare``), on the pool or inline (``calibrate``)."""
        if served.images is None:
            raise ValueError(f"model {served.name!r} is a {served.kind}, not an image model")
        run: Callable[[Sequence[ImageChunk]], list[ImageResult]] = served.images.run
        if self.faults is not None:
            await self.faults.before_image_batch(served, chunks)
            run = self._with_faults(served, self.faults)
        try:
            if self._inline.get(served, False):
                return run(list(chunks))
            return await asyncio.get_running_loop().run_in_executor(self._pool, run, list(chunks))
        except ValueError:
            raise
        except Exception as e:
            log.exception("image_batch_failed", model=served.name, version=served.version)
            raise generation_failed(served, e) from e

    def install_faults(self, faults: Faults | None) -> None:
        """Install (or, with None, remove) a fault-injection harness, for running decode loops too."""
        with self._workers_lock:
            self.faults = faults
            for worker in self._workers.values():
                worker.faults = faults

    @staticmethod
    def _with_faults(served: ServedModel, faults: Faults) -> Callable[[Sequence[ImageChunk]], list[ImageResult]]:
        images = served.images
        assert images is not None

        def run(chunks: Sequence[ImageChunk]) -> list[ImageResult]:
            faults.before_forward(served, chunks)
            return images.run(chunks)

        return run

    def calibrate(self, served: ServedModel, rounds: int = 7) -> float:
        """Time a full batch of ``served`` (its ``max_batch``; the fastest of ``rounds``: start-up is noisy;
        call before serving) and decide where its batches run: inline when below ``inline_image_ms``, else on the pool."""
        images = served.images
        if images is None:
            raise ValueError(f"model {served.name!r} is a {served.kind}, not an image model")
        # as served: one-sample requests, their latents drawn in the batch (as ``prepare`` leaves them)
        chunks = [images.prepare(ImageRequest(n=1, seed=i), draw=False) for i in range(images.limits.max_batch)]
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            images.run(chunks)
            times.append((time.perf_counter() - started) * 1000)
        ms = min(times)
        inline = ms < self.limits.inline_image_ms
        self._inline[served] = inline
        log.info("image_batches_placed", model=served.name, version=served.version, batch=len(chunks), batch_ms=round(ms, 3), inline=inline)
        return ms

    def decode_thread(self, served: ServedModel) -> DecodeThread:
        """The decode thread of this model version (started on first use; replaced after a failure).

        A failed decode thread builds its replacement as it dies (``_replace``), so the new KV cache
        (~50 MB of zeros for the bundled transformer) is not allocated on the event loop. Until the
        replacement is in, this returns the failed one: its ``submit`` refuses with a retryable
        EngineError, its ``room`` is 0 (the text stage waits).
        """
        with self._workers_lock:
            if self._closed:
                raise EngineError("engine is closed")
            worker = self._workers.get(served)
            if worker is None or (worker.failed is not None and not worker.alive):  # alive: its thread is replacing it
                worker = self._new_worker(served)
                self._workers[served] = worker
            return worker

    def _new_worker(self, served: ServedModel) -> DecodeThread:
        worker = DecodeThread(served, self.limits, self.faults, on_failed=self._replace)
        log.info("decode_loop_started", model=served.name, version=served.version, max_batch=self.limits.decode_batch)
        return worker

    def _replace(self, failed: DecodeThread) -> None:
        """On the failed decode thread: build its replacement here, then install it, unless the
        engine closed or someone else replaced it meanwhile."""
        served = failed.served
        with self._workers_lock:
            if self._closed or self._workers.get(served) is not failed:
                return
        worker: DecodeThread | None = None
        try:
            worker = self._new_worker(served)
        except Exception:  # e.g. out of memory: decode_thread() will try again on the next request
            log.exception("decode_loop_replacement_failed", model=served.name, version=served.version)
        with self._workers_lock:
            if worker is not None and not self._closed and self._workers.get(served) is failed:
                worker.faults = self.faults  # installed or removed while it was being built
                self._workers[served] = worker
                worker = None
        if worker is not None:  # not wanted any more
            worker.stop()

    # -- text models ----------------------------------------------------------------------------

    def submit(self, served: ServedModel, request: SequenceRequest | ImageRequest, on_event: OnEvent) -> Ticket:
        """The stepped path: queue a text sequence in its model's decode batch, or an image request in
        an iterative model's step batch; ``on_event`` gets each event (tokens; previews and the final
        samples), the last one marked finished, or the EngineError that ended the batch, on the decode
        thread. Raises InvalidRequestError, QueueFullError or EngineError at once."""
        worker = self.decode_thread(served)
        handle = worker.submit(request, on_event)
        return Ticket(handle.seed, worker, handle)

    def cancel(self, ticket: Ticket) -> None:
        ticket.cancel()

    def room(self, served: ServedModel, max_pending: int | None = None) -> int:
        """How many more requests ``served`` (a text or iterative model) may have waiting for a place in
        its batch (of ``max_pending``, default the limits'); 0 while a failed decode thread is being replaced."""
        worker = self.decode_thread(served)
        return worker.room(worker.max_pending if max_pending is None else max_pending)

    async def stream_text(self, served: ServedModel, request: SequenceRequest) -> AsyncGenerator[TokenEvent, None]:
        """Token events of one sequence, as they are decoded; the last one has a finish reason
        (the library's API, on top of ``submit``).

        Raises InvalidRequestError or QueueFullError before the first event. Closing the iterator
        early (client gone, deadline) cancels the sequence, which frees its slot at the next step.
        """
        async for event in self._stream(served, request):
            assert isinstance(event, TokenEvent)
            yield event

    async def stream_images(self, served: ServedModel, request: ImageRequest) -> AsyncGenerator[ImageResult, None]:
        """An iterative model's previews (``preview=True``, every ``request.preview_every`` steps)
        and then its final samples, as they are made (the library's API, on top of ``submit``).
        Closing the iterator early cancels the request, which leaves the batch at the next step."""
        async for event in self._stream(served, request):
            assert isinstance(event, StepEvent)
            if event.result is None:
                raise EngineError(f"request to {served.name} was cancelled")
            yield event.result

    async def _stream(self, served: ServedModel, request: SequenceRequest | ImageRequest) -> AsyncGenerator[Event, None]:
        queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        waiting = self.decode_thread(served)
        if waiting.failed is not None and waiting.alive:  # its thread is building its replacement: wait for it there
            await asyncio.to_thread(waiting.join, 10.0)
        ticket = self.submit(served, request, _into_queue(asyncio.get_running_loop(), queue))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise generation_failed(served, item) from item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                ticket.cancel()

    def step_stats(self) -> list[tuple[str, int, int]]:
        """(model, steps run, active requests) of each iterative model's step batch, summed over its versions (metrics)."""
        with self._workers_lock:
            batches = [(served.name, w.batch) for served, w in self._workers.items()]
        totals: dict[str, tuple[int, int]] = {}
        for name, batch in batches:
            if isinstance(batch, StepBatch):
                run, active = totals.get(name, (0, 0))
                totals[name] = (run + batch.steps_run, active + batch.active_count)
        return [(name, run, active) for name, (run, active) in sorted(totals.items())]

    def retire(self, served: ServedModel) -> None:
        """Forget a version the server no longer serves: stop its decode thread (blocks while it
        joins: call off the event loop). Call it once no request uses the entry: a sequence still
        in the loop would hear nothing more (the server waits for its jobs, or fails them, first)."""
        self._inline.pop(served, None)
        with self._workers_lock:
            worker = self._workers.pop(served, None)
        if worker is not None:
            worker.stop()
            log.info("decode_loop_stopped", model=served.name, version=served.version)

    def close(self) -> None:
        with self._workers_lock:
            self._closed = True
            workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            worker.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)
