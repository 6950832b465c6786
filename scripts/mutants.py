"""Named mutants of the code where a bug loses requests, and the tests that must kill each one.

    .venv/bin/python scripts/mutants.py            # every mutant (several minutes: not in CI)
    .venv/bin/python scripts/mutants.py --list     # names, files, what each breaks
    .venv/bin/python scripts/mutants.py jobs-finish-twice drain-grace-zero

Each mutant is a textual patch keyed by a code snippet, not a line number: ``old`` must occur
exactly once in ``path`` (a mutant whose snippet moved or changed says so by name, so it can be
updated when code moves between modules). The tree is copied once into a temporary folder
(tracked and untracked, not ignored, files; the models; a link to .venv); each mutant is applied
there, its tests run with ``pytest -x``, and the file is put back. A mutant is KILLED when its
tests fail, SURVIVED when they pass. The working tree is never touched.

Why a list and not mutmut or cosmic-ray: the bugs that lose requests are a handful of conditions
(a finish that runs twice, a cancel that does nothing, a drain that does not wait), each with a
few tests that should catch it in seconds; a tool's thousands of arithmetic mutants over these
modules would need the whole suite (many minutes) per mutant, on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in path
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    breaks: str  # the promise this mutant breaks


MUTANTS: tuple[Mutant, ...] = (
    # -- jobs: exactly one terminal outcome ------------------------------------------------------
    Mutant(
        "jobs-finish-twice",
        "server/pipeline/jobs.py",
        "        if self.done:\n            return False\n        self.done = True",
        "        self.done = True",
        ("tests/server/pipeline",),
        "a job ends with exactly one outcome (the first finish wins)",
    ),
    Mutant(
        "jobs-emit-after-done",
        "server/pipeline/jobs.py",
        "        if not self.done:\n            self.recipient.emit(self, item)",
        "        self.recipient.emit(self, item)",
        ("tests/server/pipeline",),
        "nothing reaches the caller after a job ended",
    ),
    Mutant(
        "jobs-failure-keeps-decoding",
        "server/pipeline/jobs.py",
        "            self.ticket.cancel()  # leaves the decode batch at its next step, freeing its cache",
        "            pass",
        ("tests/server/pipeline/test_text_feeder.py", "-k", "cancelled"),
        "a failed text job leaves its decode loop",
    ),
    # -- cancellation ---------------------------------------------------------------------------
    Mutant(
        "cancel-worker-noop",
        "engine/engine.py",
        "        if loop is not None and loop.cancel(handle):\n            self._wake.set()",
        "        pass",
        (
            "tests/engine/test_engine.py",
            "tests/server/grpc_edge/test_service.py",
            "tests/server/grpc_edge/test_stream.py",
            "-k",
            "closing or deadline or goes_away",
        ),
        "a cancelled sequence stops costing work",
    ),
    Mutant(
        "cancel-stream-close-forgets",
        "engine/engine.py",
        "            if not finished:\n                ticket.cancel()",
        "            pass",
        ("tests/engine/test_engine.py", "-k", "closing"),
        "closing a text stream early cancels its sequence",
    ),
    Mutant(
        "cancel-loop-ignores",
        "engine/decode.py",
        "            self._cancelled.add(handle.id)",
        "            pass",
        ("tests/engine/test_decode.py", "tests/engine/test_engine.py", "-k", "cancel or closing"),
        "DecodeBatch.cancel takes the sequence out at the next step",
    ),
    Mutant(
        "cancel-sync-session-lost",
        "clients/_sync.py",
        "                loop.call_soon_threadsafe(future.cancel)",
        "                pass",
        ("tests/clients/test_sdk_session.py", "tests/clients/test_sdk_sync.py", "-k", "cancel"),
        "cancelling a sync session's future cancels the request on the server",
    ),
    # -- supervisor -----------------------------------------------------------------------------
    Mutant(
        "supervisor-loses-held-jobs",
        "server/pipeline/supervisor.py",
        '            job.fail(*retryable(f"stage {stage.name} failed while holding this request"))',
        "            pass",
        ("tests/server/pipeline/test_supervisor.py",),
        "the jobs a crashed stage held are failed, never dropped",
    ),
    Mutant(
        "supervisor-window-never-expires",
        "server/pipeline/supervisor.py",
        "while self.restarts and now - self.restarts[0] > self.period:",
        "while False:",
        ("tests/server/pipeline/test_supervisor.py",),
        "restarts older than the period do not count against the intensity",
    ),
    Mutant(
        "supervisor-one-restart-too-many",
        "server/pipeline/supervisor.py",
        "        if len(self.restarts) >= self.intensity:",
        "        if len(self.restarts) > self.intensity:",
        ("tests/server/pipeline/test_supervisor.py",),
        "past `intensity` restarts within the period the server gives up",
    ),
    # -- links: bounded, and nothing lost between stages ------------------------------------------
    Mutant(
        "link-group-ignores-capacity",
        "server/pipeline/links.py",
        "            n = min(self.capacity - len(items), len(pending))",
        "            n = len(pending)",
        ("tests/server/pipeline/test_links.py",),
        "a link holds at most its capacity, a group included: the rest waits in its producer",
    ),
    Mutant(
        "link-wake-up-lost",
        "server/pipeline/links.py",
        "            if woken and ready():",
        "            if False:",
        ("tests/server/pipeline/test_links.py",),
        "a consumer cancelled after its wake-up passes it on: no item is left with nobody to take it",
    ),
    # -- admission ------------------------------------------------------------------------------
    Mutant(
        "admission-no-inflight-limit",
        "server/pipeline/admission.py",
        "        if inflight >= self.max_inflight:",
        "        if False:",
        ("tests/server/pipeline/test_core.py", "-k", "admit"),
        "beyond max_inflight a call is refused with RESOURCE_EXHAUSTED",
    ),
    Mutant(
        "admission-open-while-draining",
        "server/pipeline/core.py",
        "        if not self.accepting:",
        "        if False:",
        ("tests/server/pipeline/test_core.py", "-k", "admit"),
        "a draining server refuses new work with UNAVAILABLE",
    ),
    Mutant(
        "admission-deadlines-not-enforced",
        "server/pipeline/core.py",
        '                job.fail(Code.DEADLINE_EXCEEDED, "deadline passed before the request finished")',
        "                pass",
        ("tests/server/pipeline/test_core.py", "-k", "deadline or timeout"),
        "a request past its deadline ends DEADLINE_EXCEEDED",
    ),
    Mutant(
        "admission-timeout-not-capped",
        "server/pipeline/core.py",
        "min(timeout, self.config.request_timeout_s)",
        "timeout",
        ("tests/server/pipeline/test_core.py", "-k", "timeout"),
        "the server's request timeout caps the one a client asks for",
    ),
    Mutant(
        "completion-writes-block",
        "server/grpc_edge/wakeups.py",
        "        writer.setblocking(False)",
        "        pass",
        ("tests/server/grpc_edge/test_wakeups.py",),
        "grpc's poller thread is never held by a full wake-up socket (every call reaches admission)",
    ),
    Mutant(
        "image-batch-eager",
        "engine/images.py",
        "        return self._graph or None\n",
        "        return None\n",
        ("tests/engine/test_images.py", "tests/engine/test_image_graph.py"),
        "an image batch on the CPU is one graph: its engine thread does not wait on the GIL op by op",
    ),
    Mutant(
        "latents-drawn-on-the-loop",
        "engine/engine.py",
        "        whole = images.prepare(request, draw=False)",
        "        whole = images.prepare(request)",
        ("tests/server/pipeline/test_processor.py",),
        "the processor leaves a request's latents to be drawn in its batch, off the event loop",
    ),
    # -- drain ----------------------------------------------------------------------------------
    Mutant(
        "drain-grace-zero",
        "server/runtime/app.py",
        "        await self._shutdown.wait()\n        await self.stop()",
        "        await self._shutdown.wait()\n        await self.stop(grace=0)",
        ("tests/server/runtime/test_process.py", "-k", "drains"),
        "on SIGTERM or a first SIGINT in-flight requests finish within --grace-s",
    ),
    Mutant(
        "drain-does-not-wait",
        "server/runtime/app.py",
        "                await self.pipeline.wait_idle()",
        "                pass",
        ("tests/server/runtime/test_app.py", "-k", "drain"),
        "the drain waits for in-flight work",
    ),
    Mutant(
        "drain-stays-ready",
        "server/runtime/app.py",
        "        self.pipeline.accepting = False\n        self._serving = False\n",
        "        self.pipeline.accepting = False\n",
        ("tests/server/runtime/test_app.py", "-k", "drain"),
        "readiness goes NOT_SERVING when the drain begins",
    ),
    Mutant(
        "drain-leaves-requests-hanging",
        "server/runtime/app.py",
        "        failed = self.pipeline.fail_all(",
        "        failed = 0 and self.pipeline.fail_all(",
        ("tests/server/runtime/test_app.py", "-k", "outlives"),
        "what outlives the grace period fails with UNAVAILABLE",
    ),
    # -- credits --------------------------------------------------------------------------------
    Mutant(
        "credits-not-given-back",
        "server/grpc_edge/outbox.py",
        "        if credit:\n            self.credit_back += 1",
        "        if credit:\n            pass",
        ("tests/server/grpc_edge/test_stream.py", "-k", "credit"),
        "each finished request gives its credit back",
    ),
    Mutant(
        "credits-never-refuse",
        "server/grpc_edge/service.py",
        "        if stream.credit <= 0:",
        "        if False:",
        ("tests/server/grpc_edge/test_stream.py", "-k", "credit"),
        "a request beyond the stream's credit is refused for its id",
    ),
    # -- and two promises of issue #17 outside those modules -------------------------------------
    Mutant(
        "images-untiled",
        "engine/images.py",
        "        total, t = int(z.shape[0]), self.tile\n",
        "        return self._forward(z, labels)\n        total, t = int(z.shape[0]), self.tile\n",
        ("tests/engine/test_images.py", "tests/engine/test_image_graph.py", "-k", "bit_for_bit or whatever_shares or one_tile"),
        "a sample's floats are bit for bit the same whatever its batch",
    ),
    Mutant(
        "auth-stops-at-a-match",
        "server/grpc_edge/auth.py",
        "            valid |= hmac.compare_digest(given, digest)",
        "            valid |= hmac.compare_digest(given, digest)\n            if valid:\n                break",
        ("tests/server/grpc_edge/test_security.py", "-k", "constant_time"),
        "every configured token is compared, whatever matches (constant time)",
    ),
)


def copy_tree(dst: Path) -> None:
    """The files git would see (tracked, and untracked but not ignored), and a link to the venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    for rel in sorted({p for p in listed.decode().split("\0") if p}):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    (dst / ".venv").symlink_to((ROOT / ".venv").resolve())


def apply(tree: Path, m: Mutant) -> str:
    """Write the mutant into ``tree``; return the original text of its file."""
    path = tree / m.path
    if not path.is_file():
        raise SystemExit(f"mutant {m.name}: {m.path} does not exist (moved? update its path)")
    text = path.read_text(encoding="utf-8")
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"mutant {m.name}: its snippet occurs {count} times in {m.path}, not once (code moved? update it)")
    path.write_text(text.replace(m.old, m.new), encoding="utf-8")
    return text


def run(tree: Path, m: Mutant, timeout: float) -> tuple[str, float]:
    original = apply(tree, m)
    started = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *m.tests]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        rc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, timeout=timeout).returncode
        verdict = "SURVIVED" if rc == 0 else ("KILLED" if rc == 1 else f"ERROR (pytest exit {rc})")
    except subprocess.TimeoutExpired:
        verdict = "KILLED (timeout)"  # a hang is a failure the tests found, if slowly
    finally:
        (tree / m.path).write_text(original, encoding="utf-8")
    return verdict, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for one mutant's tests")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:34} {m.path:22} {m.breaks}")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutants: {', '.join(unknown)} (see --list)")
    chosen = [by_name[n] for n in args.names] if args.names else list(MUTANTS)
    survived = []
    with tempfile.TemporaryDirectory(prefix="genserve-mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        for m in chosen:
            verdict, seconds = run(tree, m, args.timeout)
            print(f"{verdict:18} {m.name:34} {seconds:6.1f} s  {m.breaks}", flush=True)
            if verdict == "SURVIVED":
                survived.append(m.name)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} killed" + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
