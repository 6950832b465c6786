"""The server's own cost per GenerateStream request, without grpc or a load generator.

    python -m bench.path [--baseline DIR] [--runs 3] [--rounds 3] [--requests N] [--window W] [--models-dir DIR]

A ``GenServer`` is started in this process (its real service, pipeline, stages and engine) and fed
one-image VAE requests through the same method the stream reader calls for each request it parses
(``GeneratorService._stream_request``), ``W`` in flight; the results come back through the
stream's outbox and are serialized as grpc would. It prints, per round, the requests/s and the
event loop thread's CPU time per request (``time.thread_time``: the figure the stream rows of
``bench.serve`` are limited by, less what grpc.aio itself costs per message).

Why: end to end, the same two builds differ by less than the noise of a shared 2-core machine
(``bench.ab`` rounds of one build vary by 20%); in-process, with nothing else on the cores, rounds
of one build vary by ~5%, and the minimum over rounds by less. ``--baseline DIR`` runs another
source tree's copy (a worktree of main, say) in alternation with this one and prints the min and
median of each: that is how a change to the per-request path is judged.

Every request is accounted for: each must end with exactly one Finish, OK, or the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class _Context:
    """What the stream path asks of grpc's servicer context: no deadline."""

    def time_remaining(self) -> float | None:
        return None


async def measure(models_dir: str, requests: int, window: int, rounds: int, model: str) -> list[tuple[float, float]]:
    """(requests/s, loop CPU us per request) for each round."""
    from genserve.v1 import generator_pb2 as pb
    from server.config import ServerConfig
    from server.grpc_edge.outbox import MAX_RESULTS_PER_MESSAGE, StreamOutbox
    from server.runtime.app import GenServer

    config = ServerConfig(models_dir=models_dir, port=0, metrics_port=0, log_level="warning")
    server = GenServer(config)
    await server.start()
    service, context = server.service, _Context()
    figures = []
    try:
        for _ in range(rounds):
            stream = StreamOutbox(
                config.stream_credits,
                max_pending=2 * config.stream_credits + MAX_RESULTS_PER_MESSAGE,
                grant=server.pipeline.admission.stream_grant,
            )
            stream.credit = requests  # the client's credit is not what is measured here
            sent = finished = 0
            wall, cpu = time.perf_counter(), time.thread_time()
            while finished < requests:
                if sent - finished <= window // 2 and sent < requests:  # top up the window, 256 a message
                    todo = min(window - (sent - finished), requests - sent)
                    while todo:
                        ids = range(sent, sent + min(256, todo))
                        message = pb.StreamRequest(
                            requests=[pb.GenerateRequest(id=str(i), model=model, image=pb.ImageParams(n=1, seed=i)) for i in ids]
                        )
                        parsed = pb.StreamRequest.FromString(message.SerializeToString())  # as grpc hands it over
                        for request in parsed.requests:
                            service._stream_request(request, stream, context)
                        sent += len(ids)
                        todo -= len(ids)
                await stream.ready.wait()
                out = stream.next_message()
                if out is None:
                    continue
                out.SerializeToString()
                for result in out.results:
                    if result.HasField("finish"):
                        if result.finish.code:
                            raise RuntimeError(f"request {result.id} ended with code {result.finish.code}: {result.finish.message}")
                        finished += 1
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            if finished != requests or stream.jobs:
                raise RuntimeError(f"{requests} requests sent, {finished} finished, {len(stream.jobs)} still open")
            figures.append((requests / wall, cpu / requests * 1e6))
    finally:
        await server.stop(1.0)
    return figures


def _one_tree(args: argparse.Namespace) -> int:
    """Measure this tree; print one line per round."""
    work = measure(args.models_dir, args.requests, args.window, args.rounds, args.model)
    try:
        import uvloop  # the server's own loop where it is installed (server/__main__.py)
    except ImportError:
        figures = asyncio.run(work)
    else:
        figures = uvloop.run(work)
    for rate, cpu_us in figures:
        print(f"ROUND {rate:.0f} {cpu_us:.2f}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.path", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (each run starts a server)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each tree, alternating")
    parser.add_argument("--window", type=int, default=2048, help="requests in flight")
    parser.add_argument("--model", default="vae", help="a one-image model to ask for")
    parser.add_argument("--models-dir", default=str(ROOT / "models"))
    parser.add_argument("--baseline", type=Path, default=None, help="another source tree, measured in alternation with this one")
    parser.add_argument("--one-tree", action="store_true", help=argparse.SUPPRESS)  # a child run: this tree, raw lines
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1 or args.runs < 1 or args.window < 1:
        parser.error("--requests, --rounds, --runs and --window must be >= 1")
    if args.one_tree:
        return _one_tree(args)
    if args.baseline is not None and not (args.baseline / "server" / "config.py").is_file():
        parser.error(f"--baseline {args.baseline}: not a genserve source tree (no server/config.py)")
    trees = ([("baseline", args.baseline.resolve())] if args.baseline else []) + [("this tree", ROOT)]
    child = [
        *("--requests", str(args.requests), "--rounds", str(args.rounds), "--window", str(args.window)),
        *("--model", args.model, "--models-dir", str(Path(args.models_dir).resolve()), "--one-tree"),
    ]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in trees}
    for run in range(args.runs):
        for name, tree in trees:
            env = dict(os.environ, PYTHONPATH=str(tree))
            # this file's code, run from the tree (its server and engine first on the path: sys.path[0] is the cwd)
            code = f"import runpy, sys; sys.argv[0] = 'bench.path'; runpy.run_path({str(Path(__file__).resolve())!r}, run_name='__main__')"
            done = subprocess.run([sys.executable, "-c", code, *child], cwd=tree, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stdout + done.stderr, file=sys.stderr)
                print(f"bench.path: the run of {name} ({tree}) failed (exit {done.returncode})", file=sys.stderr)
                return 1
            fields = [line.split() for line in done.stdout.splitlines() if line.startswith("ROUND ")]
            measured = [(float(rate), float(cpu)) for _, rate, cpu in fields]
            results[name] += measured
            line = "  ".join(f"{rate:7.0f} req/s {cpu:5.1f} us" for rate, cpu in measured)
            print(f"run {run + 1} {name:9s}  {line}", flush=True)
    print("loop CPU per request (us): min / median over every round; requests/s: median")
    for name, measured in results.items():
        cpus = [cpu for _, cpu in measured]
        rates = [rate for rate, _ in measured]
        print(f"  {name:9s}  {min(cpus):5.1f} / {statistics.median(cpus):5.1f} us   {statistics.median(rates):7.0f} req/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
