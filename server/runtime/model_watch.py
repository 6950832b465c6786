"""Live models: watch the models folder; load, replace and retire models while the server serves.

Every ``poll_s`` seconds (and at once on ``rescan()``, which SIGHUP calls) the watcher lists the
``*.safetensors`` files directly inside the folder (names starting with "." are ignored: they are
temporary files) and compares each with what it knows:

- a new file, or one whose size, mtime, inode or ctime changed, is a candidate. When only the
  inode or ctime changed (a file replaced by one of the same size and mtime: ``cp -p``, ``rsync -t``)
  its checksum decides whether the content did. A candidate is loaded once it has settled: its
  mtime is ``settle_s`` old, or stat saw it unchanged for ``settle_s``; a file still being written
  is left alone until then. A load that fails anyway (a writer that paused) is refused and tried
  again when the file changes.
- loading runs on one loader thread (read, check, warm up, calibrate, checksum), never on the
  event loop. Then, on the loop: the pipeline gets the model name's stages if it has none
  (``Pipeline.add_model``), and the registry publishes the version, atomically. A new version
  becomes the latest if it is the highest; a rewritten file replaces its version.
- a refused file (not safetensors, wrong tensors, bad name, a duplicate version) is logged with
  its path and reason and counted (``genserve_model_loads_total{result="refused"}``); what was
  served keeps being served, and the file is not retried until it changes.
- a file that is gone unpublishes its version (new requests for that version get NOT_FOUND, the
  unversioned ones the highest version left). A version replaced or unpublished is retired in the
  background: its requests in flight finish on it (for up to ``grace_s``, then they fail with
  UNAVAILABLE), its decode thread stops, and its name's stages stop once no version needs them.

Within one scan, loads come before removals, so renaming ``m@1`` to ``m@2`` never leaves ``m``
without a version. The safe way to publish: write the file elsewhere on the same file system and
``mv`` (rename) it into the folder (docs/live-models.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine import SUFFIX, Engine, ModelRegistry, ServedModel, failure_reason, parse_file_name
from engine.errors import ModelFileError
from engine.logs import get_logger
from server.metrics import Metrics
from server.pipeline.core import Pipeline

if TYPE_CHECKING:
    from server.pipeline.supervisor import Supervisor

log = get_logger("server.runtime.model_watch")

LOADER_NICE = 10  # added to the loader thread's nice value


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What stat says about a model file; any difference makes the file a candidate."""

    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)

    def same_size_and_mtime(self, other: FileStamp) -> bool:
        return self.size == other.size and self.mtime_ns == other.mtime_ns


@dataclass(slots=True)
class KnownFile:
    """A file the watcher has dealt with: served from (entry), or refused or skipped (entry None)."""

    stamp: FileStamp
    entry: ServedModel | None
    checksum: str | None  # of the content that was loaded (None: not computed yet)
    scans: int = 1  # scans that saw this stamp before it was dealt with (1: at first sight)


def stamp_folder(folder: Path) -> dict[Path, FileStamp]:
    """The model files directly inside ``folder`` and their stamps (blocking: call off the loop)."""
    stamps: dict[Path, FileStamp] = {}
    with os.scandir(folder) as entries:
        for item in entries:
            if item.name.startswith(".") or not item.name.endswith(SUFFIX):
                continue  # hidden names are temporary files (rsync's .NAME.XXXXXX, editors')
            with contextlib.suppress(FileNotFoundError):  # gone between the listing and the stat
                if item.is_file():
                    stamps[Path(item.path)] = FileStamp.of(item.stat())
    return stamps


def _yield_to_serving() -> None:
    """Run the loader thread at a lower CPU priority (Linux: a thread has its own nice value), so
    that on a busy machine a load takes the cores that serving leaves over (docs/live-models.md)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)


def file_key(path: Path) -> tuple[str, int] | None:
    """(name, version) from a file name, or None for a name that is refused."""
    try:
        return parse_file_name(path)
    except ModelFileError:
        return None


def checksum(path: Path) -> str:
    """BLAKE2b of the file's bytes (blocking)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


class ModelWatcher:
    def __init__(
        self,
        folder: str | Path,
        registry: ModelRegistry,
        engine: Engine,
        pipeline: Pipeline,
        supervisor: Supervisor,
        metrics: Metrics,
        *,
        poll_s: float,
        settle_s: float,
        grace_s: float,
        clock: Callable[[], float] = time.time,  # the clock file mtimes are on
    ) -> None:
        self.folder = Path(folder)
        self.registry = registry
        self.engine = engine
        self.pipeline = pipeline
        self.supervisor = supervisor
        self.metrics = metrics
        self.poll_s = poll_s
        self.settle_s = settle_s
        self.grace_s = grace_s
        self.clock = clock
        self.known: dict[Path, KnownFile] = {}
        self.scans = 0  # completed scans (tests wait on it)
        self._pending: dict[Path, tuple[FileStamp, float, int]] = {}  # not settled: stamp, first seen (monotonic, scan)
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader", initializer=_yield_to_serving)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # adding stages + publishing, against retiring + removing stages
        self._scanning = asyncio.Lock()  # a scan works from its own listing: two at once would undo each other
        self._retiring: set[asyncio.Task[None]] = set()
        self._last_error = ""
        self._gauged: set[str] = set()  # model names with a genserve_model_versions series

    # -- start-up -------------------------------------------------------------------------------

    def adopt(self, before: dict[Path, FileStamp]) -> None:
        """Take over the files the server loaded at start, stamped just before that load (so a
        file that changed during it is seen as changed at the first scan)."""
        by_path = {e.path: e for e in self.registry.served()}
        for path, stamp in before.items():
            self.known[path] = KnownFile(stamp, by_path.get(path), None)
        self._count_versions()

    # -- running --------------------------------------------------------------------------------

    def rescan(self) -> None:
        """Scan now (SIGHUP), without waiting for the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Scan every ``poll_s`` seconds (only on ``rescan()`` when 0) until cancelled."""
        loop = asyncio.get_running_loop()
        for path, known in list(self.known.items()):  # what the start-up load read, for the same-stamp check
            if known.entry is not None and known.checksum is None:
                with contextlib.suppress(OSError):
                    known.checksum = await loop.run_in_executor(self._loader, checksum, path)
        while True:
            try:
                await self.scan()
            except Exception as e:  # a scan that fails (folder gone, permissions) is retried at the next poll
                message = f"{type(e).__name__}: {e}"
                if message != self._last_error:  # once per kind of trouble, not once per poll
                    log.error("model_scan_failed", folder=str(self.folder), error=message)
                self._last_error = message
            else:
                self._last_error = ""
            if self.scans == 1:
                log.info("models_watched", folder=str(self.folder), poll_s=self.poll_s or "off (SIGHUP only)", settle_s=self.settle_s)
            self._wake.clear()
            if self.poll_s > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_s):
                        await self._wake.wait()
            else:
                await self._wake.wait()

    async def close(self) -> None:
        """Stop retiring in the background (the server's drain decides what is left) and the loader."""
        for task in list(self._retiring):
            task.cancel()
        for task in list(self._retiring):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loader.shutdown(wait=False, cancel_futures=True)

    async def scan(self) -> None:
        """One pass over the folder: load what settled, then retire what went (one pass at a time)."""
        async with self._scanning:
            await self._scan()

    async def _scan(self) -> None:
        loop = asyncio.get_running_loop()
        current = await loop.run_in_executor(self._loader, stamp_folder, self.folder)
        now_wall, now = self.clock(), time.monotonic()
        ready: list[tuple[Path, FileStamp, int]] = []
        for path, stamp in sorted(current.items()):
            known = self.known.get(path)
            if known is not None and known.stamp == stamp:
                continue
            if known is not None and known.checksum is not None and known.stamp.same_size_and_mtime(stamp):
                same = await loop.run_in_executor(self._loader, checksum, path) == known.checksum  # replaced or touched: the bytes tell
                if same:
                    known.stamp = stamp
                    continue
            first_scan = self._pending[path][2] if path in self._pending and self._pending[path][0] == stamp else self.scans
            if self._settled(path, stamp, now_wall, now):
                ready.append((path, stamp, self.scans - first_scan + 1))
        for path in [p for p in self._pending if p not in current]:
            del self._pending[path]
        for path, stamp, scans in ready:
            await self._load(path, stamp, scans)
        for path in [p for p in self.known if p not in current]:
            self._forget(path)
        self.scans += 1

    def _settled(self, path: Path, stamp: FileStamp, now_wall: float, now: float) -> bool:
        """Not written for ``settle_s``: by its mtime, or (a clock that disagrees) by watching it."""
        if now_wall - stamp.mtime_ns / 1e9 >= self.settle_s:
            self._pending.pop(path, None)
            return True
        seen = self._pending.get(path)
        if seen is None or seen[0] != stamp:
            self._pending[path] = (stamp, now, self.scans)
            log.debug("model_file_settling", path=str(path), size=stamp.size)
            return False
        if now - seen[1] >= self.settle_s:
            del self._pending[path]
            return True
        return False

    # -- load -----------------------------------------------------------------------------------

    def _prepare(self, path: Path) -> tuple[ServedModel, str]:
        """On the loader thread: checksum first (a change during the load shows at the next scan)."""
        digest = checksum(path)
        entry = self.registry.prepare(path)
        if entry.images is not None:  # where its batches run (inline or on the pool), before it serves
            self.engine.calibrate(entry)
        return entry, digest

    async def _load(self, path: Path, stamp: FileStamp, scans: int) -> None:
        previous = self.known.get(path)
        try:
            name, version = parse_file_name(path)
            for other_path, other in self.known.items():
                if other_path != path and other.entry is not None and (other.entry.name, other.entry.version) == (name, version):
                    raise ModelFileError(path, f"duplicates {name} version {version} of {other_path.name}")
            entry, digest = await asyncio.get_running_loop().run_in_executor(self._loader, self._prepare, path)
        except Exception as e:
            kept = previous.entry if previous is not None else None
            log.error(
                "model_refused",
                path=str(path),
                reason=failure_reason(e),
                still_serving=f"{kept.name}@{kept.version}" if kept is not None else None,
            )
            self.metrics.model_loads.labels("refused").inc()
            # remembered by its stamp: not retried until the file changes; an earlier good load of
            # this file keeps serving (and is retired when the file goes)
            self.known[path] = KnownFile(stamp, kept, previous.checksum if previous is not None else None, scans)
            return
        async with self._lock:
            added = await self.pipeline.add_model(entry, self.supervisor)
            replaced = self.registry.publish(entry)
        self.known[path] = KnownFile(stamp, entry, digest, scans)
        self.metrics.model_loads.labels("loaded").inc()
        self._count_versions()
        if added:
            log.info("model_stages_added", name=entry.name)
        old = previous.entry if previous is not None else None
        for gone in {e for e in (replaced, old) if e is not None and e is not entry}:
            self._retire(gone)

    # -- retire ---------------------------------------------------------------------------------

    def _forget(self, path: Path) -> None:
        known = self.known.pop(path)
        entry = known.entry
        if entry is None:
            return
        key = (entry.name, entry.version)
        for other_path, other in list(self.known.items()):  # a duplicate refused because of this file loads at the next scan
            if other.entry is None and file_key(other_path) == key:
                del self.known[other_path]
        with contextlib.suppress(LookupError):
            if self.registry.get(entry.name, entry.version) is entry:
                self.registry.unload(entry.name, entry.version)
        self._count_versions()
        self._retire(entry)

    def _retire(self, entry: ServedModel) -> None:
        task = asyncio.create_task(self._retire_version(entry), name=f"retire-{entry.name}@{entry.version}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire_version(self, entry: ServedModel) -> None:
        try:
            await self._retire_steps(entry)
        except Exception:  # a background task: say so in the log rather than in "exception never retrieved"
            log.exception("model_retire_failed", name=entry.name, version=entry.version)

    async def _retire_steps(self, entry: ServedModel) -> None:
        inflight = sum(1 for job in self.pipeline.inflight if job.served is entry)
        log.info("model_retiring", name=entry.name, version=entry.version, path=str(entry.path), inflight=inflight, grace_s=self.grace_s)
        finished, failed = await self.pipeline.drain_version(entry, self.grace_s)
        await asyncio.get_running_loop().run_in_executor(None, self.engine.retire, entry)  # joins a decode thread
        async with self._lock:
            removed = await self.pipeline.remove_model(entry.name, self.supervisor)
        log.info("model_retired", name=entry.name, version=entry.version, finished=finished, failed=failed, stages_removed=removed)

    def _count_versions(self) -> None:
        counts: dict[str, int] = {}
        for e in self.registry.served():
            counts[e.name] = counts.get(e.name, 0) + 1
        gauge = self.metrics.model_versions
        for name, n in counts.items():
            gauge.labels(name).set(n)
        for name in self._gauged - counts.keys():
            gauge.remove(name)
        self._gauged = set(counts)
