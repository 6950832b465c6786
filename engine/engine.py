"""The asyncio face of the engine: model code runs on engine threads, never on the event loop.

- Image batches run on a thread pool owned by the engine (torch releases the GIL in its kernels).
- Each text model version gets a ``TextWorker``: one thread that drives its ``DecodeLoop``
  (continuous batching) and hands every token to the asyncio queue of the request it belongs to.
  A request whose consumer goes away (client gone, deadline passed) is cancelled in the loop and
  leaves it at the next step.
- Hot swap: workers are keyed by the served entry (not its name and version: a file reloaded in
  place is a new entry of the same version), so sequences started on an entry finish there;
  ``retire`` stops an entry's worker once the server has let its last request finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from engine.decode import DecodeLoop, SequenceHandle, SequenceRequest, TokenEvent
from engine.images import ImageChunk, ImageRequest, ImageResult
from engine.logs import get_logger
from engine.registry import ServedModel

log = get_logger("engine")

Sink = Callable[[TokenEvent | BaseException], None]


class EngineError(RuntimeError):
    """Raised when model code failed for a request (the request gets a retryable status)."""


class TextWorker:
    """Drives one DecodeLoop on its own thread and routes each event to its request's sink."""

    def __init__(self, served: ServedModel, *, max_batch: int, max_pending: int) -> None:
        self.served = served
        self.loop = DecodeLoop.from_loaded(served.model, max_batch=max_batch, max_pending=max_pending)
        self._sinks: dict[int, Sink] = {}
        self._sinks_lock = threading.Lock()  # held across add + register, so no event beats its sink
        self._wake = threading.Event()
        self._stopping = False
        self.failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"decode-{served.name}@{served.version}", daemon=True)
        self._thread.start()

    def submit(self, request: SequenceRequest, sink: Sink) -> SequenceHandle:
        """Queue a sequence; raises InvalidRequestError or QueueFullError at once."""
        with self._sinks_lock:  # checked under the lock: the failure path sets it under the same lock
            if self.failed is not None:
                raise EngineError(f"decode loop of {self.served.name} stopped: {self.failed}")
            handle = self.loop.add(request)
            self._sinks[handle.id] = sink
        self._wake.set()
        return handle

    def cancel(self, handle: SequenceHandle) -> None:
        if self.loop.cancel(handle):
            self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopping:
            if not self.loop.has_work:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                events = self.loop.step()
            except Exception as e:  # model code failed: every waiting request hears of it
                log.exception("decode_loop_failed", model=self.served.name, version=self.served.version)
                with self._sinks_lock:
                    # without its traceback: the traceback holds this frame, whose `self` would
                    # keep the dead worker and its KV cache alive until the cyclic collector ran
                    self.failed = e.with_traceback(None)
                    sinks, self._sinks = list(self._sinks.values()), {}
                for sink in sinks:
                    sink(e)
                return
            with self._sinks_lock:
                routed: list[tuple[Sink | None, TokenEvent]] = [
                    (self._sinks.pop(ev.handle.id, None) if ev.finished else self._sinks.get(ev.handle.id), ev) for ev in events
                ]
            for target, ev in routed:
                if target is not None:
                    target(ev)


def _threadsafe_sink(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[TokenEvent | BaseException]) -> Sink:
    def sink(item: TokenEvent | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening any more
            loop.call_soon_threadsafe(queue.put_nowait, item)

    return sink


class Engine:
    """Runs model code for the server: image batches on a thread pool, text on decode-loop threads."""

    def __init__(self, *, image_threads: int = 1, decode_batch: int = 32, decode_pending: int = 64, inline_image_ms: float = 0.0) -> None:
        self._pool = ThreadPoolExecutor(max_workers=image_threads, thread_name_prefix="engine-images")
        # Image models whose whole batch is measured (``calibrate``) below this many ms run on the
        # calling (event loop) thread. A hop to a pool thread looks free but is not: the worker
        # must win the GIL back from a busy event loop between torch ops, which turned a 0.2 ms
        # VAE batch into 3-6 ms inside the server. 0: every batch goes to the pool.
        self.inline_image_ms = inline_image_ms
        self._inline: dict[ServedModel, bool] = {}
        self._decode_batch = decode_batch
        self._decode_pending = decode_pending
        self._workers: dict[ServedModel, TextWorker] = {}
        self._workers_lock = threading.Lock()
        self._closed = False

    async def generate_images(self, served: ServedModel, chunks: Sequence[ImageChunk]) -> list[ImageResult]:
        """One forward pass for ``chunks`` (prepared by ``served.images.prepare``), on the pool."""
        if served.images is None:
            raise ValueError(f"model {served.name!r} is a {served.kind}, not an image model")
        try:
            if self._inline.get(served, False):
                return served.images.run(list(chunks))
            return await asyncio.get_running_loop().run_in_executor(self._pool, served.images.run, list(chunks))
        except ValueError:
            raise
        except Exception as e:
            log.exception("image_batch_failed", model=served.name, version=served.version)
            raise EngineError(f"generation failed in {served.name}: {type(e).__name__}") from e

    def calibrate(self, served: ServedModel, batch: int, rounds: int = 7) -> float:
        """Time a full batch of ``served`` (the fastest of ``rounds``: start-up is noisy; call before
        serving) and decide where its batches run: inline when below ``inline_image_ms``, else on the pool."""
        images = served.images
        if images is None:
            raise ValueError(f"model {served.name!r} is a {served.kind}, not an image model")
        chunk = images.prepare(ImageRequest(n=min(batch, images.limits.max_batch), seed=0))
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            images.run([chunk])
            times.append((time.perf_counter() - started) * 1000)
        ms = min(times)
        inline = ms < self.inline_image_ms
        self._inline[served] = inline
        log.info("image_batches_placed", model=served.name, version=served.version, batch=chunk.n, batch_ms=round(ms, 3), inline=inline)
        return ms

    def text_worker(self, served: ServedModel) -> TextWorker:
        """The decode loop of this model version (started on first use; restarted after a failure)."""
        with self._workers_lock:
            if self._closed:
                raise EngineError("engine is closed")
            worker = self._workers.get(served)
            if worker is None or worker.failed is not None:
                worker = TextWorker(served, max_batch=self._decode_batch, max_pending=self._decode_pending)
                self._workers[served] = worker
                log.info("decode_loop_started", model=served.name, version=served.version, max_batch=self._decode_batch)
            return worker

    async def stream_text(self, served: ServedModel, request: SequenceRequest) -> AsyncGenerator[TokenEvent, None]:
        """Token events of one sequence, as they are decoded; the last one has a finish reason.

        Raises InvalidRequestError or QueueFullError before the first event. Closing the iterator
        early (client gone, deadline) cancels the sequence, which frees its slot at the next step.
        """
        queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        worker = self.text_worker(served)
        handle = worker.submit(request, _threadsafe_sink(asyncio.get_running_loop(), queue))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineError(f"generation failed in {served.name}: {type(item).__name__}") from item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                worker.cancel(handle)

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
