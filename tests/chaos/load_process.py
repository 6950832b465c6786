"""The load in a process of its own, so that the server's process holds the server alone (and the
injector beside it, which must reach into it): its RSS is then the server's, not the clients'.

    parent (``LoadProcess``)                      child (``python -m tests.chaos.load_process``)
    ``start``: start the child       ------>      import grpc and the stubs; write b"ready\\n"
    ``run``: fix until, send a plan  ------>      run ``Load.run`` until ``until``
             ... until b"done\\n"     <------      every client has its outcomes
    ``books``: read them             <------      write the ledger, given-up ids and errors (pickled)

The books are read only when asked for (``books``), after the server's memory has been measured:
they are the load's, and tens of thousands of entries would otherwise count as the server's.

Both processes read ``time.monotonic()`` (one clock on a machine: CLOCK_MONOTONIC), so deadlines,
admissions and fault windows compare across them. The pipes carry pickles between two processes
of this harness only (the child is this file, started here).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.chaos.config import ChaosConfig
from tests.chaos.ledger import Ledger

READY = b"ready\n"
DONE = b"done\n"
ROOT = Path(__file__).resolve().parents[2]  # the checkout: the child imports tests.chaos from here


@dataclass
class Plan:
    address: str
    config: ChaosConfig
    models: dict[str, str]  # name -> "image" | "text"
    client_seed: int
    until: float  # time.monotonic()


@dataclass
class LoadResult:
    ledger: Ledger
    given_up: list[str]
    errors: list[str]  # protocol errors and crashed clients


class LoadProcess:
    """The parent's side: ``await start()``, ``await run(plan)``, then ``await books()``."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 60.0) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.chaos.load_process", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
        )
        assert self._proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self._proc.stdout.readline()
        if line != READY:
            raise RuntimeError(f"the load process did not start: it said {line!r}, exit status {await self._proc.wait()}")

    async def run(self, plan: Plan) -> None:
        """Send the plan; return once the load has ended (its books stay in the child until ``books``)."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None, "start() first"
        proc.stdin.write(pickle.dumps(plan))
        await proc.stdin.drain()
        proc.stdin.close()
        line = await proc.stdout.readline()
        if line != DONE:
            raise RuntimeError(f"the load process failed (exit status {await proc.wait()}); its stderr says why")

    async def books(self) -> LoadResult:
        proc = self._proc
        assert proc is not None and proc.stdout is not None, "run() first"
        data = await proc.stdout.read()
        code = await proc.wait()
        if code != 0 or not data:
            raise RuntimeError(f"the load process failed (exit status {code}); its stderr says why")
        result = pickle.loads(data)
        assert isinstance(result, LoadResult)
        return result

    def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()


async def _run(plan: Plan) -> LoadResult:
    from tests.chaos.load import Load  # grpc and the stubs; not torch

    load = Load(plan.address, Ledger(), plan.config, plan.models)
    await load.run(plan.client_seed, plan.until)
    return LoadResult(load.ledger, load.given_up, load.errors)


def main() -> int:
    out = sys.stdout.buffer
    import tests.chaos.load  # noqa: F401  (the imports happen before "ready", not inside the run)

    out.write(READY)
    out.flush()
    plan = pickle.loads(sys.stdin.buffer.read())
    if plan.until < time.monotonic():
        print("load process: the plan's end has passed already", file=sys.stderr)
    from tests.chaos import load_process  # this file by its module name, not __main__: the parent unpickles its classes

    result = asyncio.run(load_process._run(plan))
    out.write(DONE)
    out.flush()
    out.write(pickle.dumps(result))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
