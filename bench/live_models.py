"""Does loading a model stall serving? p50/p99 of a steady load with and without loads in progress.

    python -m bench.live_models [--window S] [--rounds N] [--clients C]

Starts ``python -m server`` on a copy of the bundled models (poll 0.1 s, settle 0), drives a
closed loop of Generate calls (vae, n=1, C in flight) and alternates windows: "quiet" (nothing
changes in the folder) and "loading" (a new version of the GAN or the transformer is renamed into
the folder every 0.3 s and the one before last removed, so a load, warm-up and calibration are
always running). Windows alternate (quiet, loading, quiet, ...) so that drift
on a shared machine hits both sides alike; latencies are pooled per side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from bench.serve import http_off
from engine.registry import DEFAULT_MODELS_DIR
from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc

PUBLISH_EVERY_S = 0.3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def loads_total(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith('genserve_model_loads_total{result="loaded"}'))


async def client(stub: pb_grpc.GeneratorStub, stop: asyncio.Event, out: list[tuple[float, float]]) -> None:
    request = pb.GenerateRequest(model="vae", image=pb.ImageParams(n=1, seed=1))
    while not stop.is_set():
        t0 = time.perf_counter()
        async for _ in stub.Generate(request):
            pass
        out.append((t0, time.perf_counter() - t0))


async def publisher(folder: Path, staging: Path, stop: asyncio.Event, count: list[int]) -> None:
    """Publish a new version every ``PUBLISH_EVERY_S`` (loads queue up on the server's loader thread
    when they take longer), and remove the one before last: a load is always in progress. Files are
    staged before the window, and the server is not polled meanwhile (a /metrics scrape holds its GIL)."""
    sources = [DEFAULT_MODELS_DIR / "gan.safetensors", DEFAULT_MODELS_DIR / "transformer.safetensors"]
    while not stop.is_set():
        count[0] += 1
        k = count[0]
        source = sources[k % 2]
        staged = staging / f"{source.stem}@{k + 1}.safetensors"
        await asyncio.to_thread(shutil.copyfile, source, staged)
        os.replace(staged, folder / staged.name)
        old = folder / f"{source.stem}@{k - 1}.safetensors"
        if old.exists():
            old.unlink()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PUBLISH_EVERY_S)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, q)) if xs else float("nan")


async def measure(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="genserve-live-bench-"))
    folder, staging = tmp / "models", tmp / "staging"
    folder.mkdir()
    staging.mkdir()
    for name in ("vae", "gan", "transformer"):
        shutil.copy2(DEFAULT_MODELS_DIR / f"{name}.safetensors", folder / f"{name}.safetensors")
    port, metrics_port = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "server",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        *http_off(),
        "--models-dir",
        str(folder),
    ]
    cmd += ["--models-poll-s", "0.1", "--models-settle-s", "0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 60)
            stub = pb_grpc.GeneratorStub(channel)
            stop_all = asyncio.Event()
            samples: list[tuple[float, float]] = []
            clients = [asyncio.create_task(client(stub, stop_all, samples)) for _ in range(args.clients)]
            await asyncio.sleep(1.0)  # warm-up
            sides: dict[str, list[float]] = {"quiet": [], "loading": []}
            loaded = [0]
            for i in range(2 * args.rounds):
                side = "quiet" if i % 2 == 0 else "loading"
                stop = asyncio.Event()
                pub = asyncio.create_task(publisher(folder, staging, stop, loaded)) if side == "loading" else None
                start = time.perf_counter()
                await asyncio.sleep(args.window)
                end = time.perf_counter()
                stop.set()
                if pub is not None:
                    await pub
                    await asyncio.sleep(1.0)  # queued loads end before the next quiet window
                sides[side] += [d for t0, d in samples if start <= t0 and t0 + d <= end]
            stop_all.set()
            await asyncio.gather(*clients)
            total_loads = loads_total(metrics_port)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "clients": args.clients,
        "window_s": args.window,
        "rounds": args.rounds,
        "loads_done": total_loads,
        **{f"{side}_calls": len(xs) for side, xs in sides.items()},
        **{f"{side}_p50_ms": round(pct(xs, 50), 2) for side, xs in sides.items()},
        **{f"{side}_p99_ms": round(pct(xs, 99), 2) for side, xs in sides.items()},
        **{f"{side}_max_ms": round(pct(xs, 100), 2) for side, xs in sides.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.live_models", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--window", type=float, default=2.0, help="seconds per window")
    parser.add_argument("--rounds", type=int, default=3, help="quiet + loading pairs")
    parser.add_argument("--clients", type=int, default=8, help="Generate calls in flight")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
