"""Text over the HTTP edge's Server-Sent Events against the same over gRPC, from one server, in one run.

    python -m bench.sse [--streams 8] [--tokens 300] [--rounds 5] [--json PATH]

One ``python -m server`` with its HTTP edge on. Each round runs ``--streams`` concurrent text
requests (prompt "ROMEO:", temperature 0.8, seeds 0..streams-1) twice: over gRPC with the SDK's
``AsyncClient.stream_text``, and over HTTP with the official ``openai`` package's streamed
completions; tokens/s is streams x tokens over the wall time of each. Both clients run in this
process on the server's cores, in alternation, so what they cost is in both figures alike. It prints
each round and the median ratio SSE / gRPC (issue 34's target: within 15%).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.serve import ROOT, free_ports


async def grpc_round(address: str, streams: int, tokens: int) -> float:
    from clients import AsyncClient

    async with AsyncClient(address, timeout=120) as client:

        async def one(seed: int) -> None:
            async for _ in client.stream_text("transformer", "ROMEO:", max_new_tokens=tokens, seed=seed, temperature=0.8):
                pass

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(streams)))
        return streams * tokens / (time.perf_counter() - started)


async def sse_round(base_url: str, streams: int, tokens: int) -> float:
    import openai

    api = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)

    async def one(seed: int) -> None:
        stream = await api.completions.create(
            model="transformer", prompt="ROMEO:", max_tokens=tokens, seed=seed, temperature=0.8, stream=True
        )
        async for _ in stream:
            pass

    try:
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(streams)))
        return streams * tokens / (time.perf_counter() - started)
    finally:
        await api.close()


async def measure(args: argparse.Namespace) -> dict[str, object]:
    port, http_port = free_ports(2)
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--http-port", str(http_port), "--metrics-port", "0"]
    server = subprocess.Popen([*cmd, "--log-level", "warning", "--models-dir", str(args.models_dir)], cwd=ROOT)
    try:
        address, base_url = f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}/v1"
        deadline = time.monotonic() + 120
        while True:  # ready: a first short request answers
            try:
                await grpc_round(address, 1, 1)
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                await asyncio.sleep(0.5)
        rounds = []
        for r in range(args.rounds):
            g = await grpc_round(address, args.streams, args.tokens)
            s = await sse_round(base_url, args.streams, args.tokens)
            rounds.append({"grpc_tokens_per_s": g, "sse_tokens_per_s": s, "ratio": s / g})
            print(f"round {r + 1}: gRPC {g:,.0f} tokens/s, SSE {s:,.0f} tokens/s, SSE/gRPC {s / g:.3f}", flush=True)
        median = statistics.median(x["ratio"] for x in rounds)
        print(f"median SSE/gRPC {median:.3f} ({args.streams} streams x {args.tokens} tokens, temperature 0.8)")
        return {"streams": args.streams, "tokens": args.tokens, "rounds": rounds, "median_ratio": median}
    finally:
        server.terminate()
        server.wait(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=8, help="concurrent text requests (default 8)")
    parser.add_argument("--tokens", type=int, default=300, help="tokens each (default 300)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models", help="models to serve (default: the bundled ones)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
