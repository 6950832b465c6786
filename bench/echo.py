"""A bare grpc.aio Generator that answers at once: the ceiling the serving benchmark compares against.

    python -m bench.echo --port P [--credits N] [--metrics-port M]

Same call shapes as the real server, no model behind them:
  Generate        an image request gets one ``images`` chunk (784 bytes per 28x28 sample) and a
                  ``finish``; a text request gets ``max_new_tokens`` one-character ``text``
                  messages and a ``finish``.
  GenerateStream  the first message grants ``--credits``; each request message is answered by
                  ONE response message carrying, for every request in it, its images (or text)
                  and its finish, and handing the credits of the finished requests back. A
                  request beyond the credit is refused for its id with RESOURCE_EXHAUSTED.
  ListModels      ``vae`` and ``transformer``.
It also serves grpc.health.v1, so a harness waits for it as it waits for the real server, and
with ``--metrics-port`` counts Generate calls by status as the server does
(``genserve_requests_total{model,rpc,code}``), so that the benchmark accounts for both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, start_http_server

from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.grpc_edge.accept import aio_server

IMAGE_SIZE = 28
MAX_N = 64
PIXELS = bytes(range(256)) * (IMAGE_SIZE * IMAGE_SIZE * MAX_N // 256 + 1)
DEFAULT_TOKENS = 256
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
MODELS = pb.ListModelsResponse(
    models=[
        pb.ModelInfo(
            name="vae",
            version=1,
            kind="vae",
            summary="echo",
            latest=True,
            image=pb.ImageAccepts(max_n=MAX_N, image_size=IMAGE_SIZE, latent_dim=20),
        ),
        pb.ModelInfo(
            name="transformer",
            version=1,
            kind="char-transformer",
            summary="echo",
            latest=True,
            text=pb.TextAccepts(vocab="abcdefghijklmnopqrstuvwxyz", context_window=128, max_new_tokens=1024),
        ),
    ]
)


def answer(request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    """The messages a request gets: its payload (images, or one text message per token), then its finish."""
    rid = request.id
    if request.HasField("text"):
        n = request.text.max_new_tokens if request.text.HasField("max_new_tokens") else DEFAULT_TOKENS
        out = [pb.GenerateResponse(id=rid, text=pb.Text(text="a", token_ids=[1], n_generated=i + 1)) for i in range(n)]
        reason = pb.FINISH_REASON_LENGTH
    else:
        n = min(max(request.image.n, 1), MAX_N)
        size = IMAGE_SIZE * IMAGE_SIZE
        images = pb.Images(offset=0, count=n, height=IMAGE_SIZE, width=IMAGE_SIZE, pixels=PIXELS[: n * size])
        out = [pb.GenerateResponse(id=rid, images=images)]
        reason = pb.FINISH_REASON_COMPLETE
    seed = request.text.seed if request.HasField("text") else request.image.seed
    finish = pb.Finish(reason=reason, code=0, seed=seed, model=request.model, version=1, n_generated=n)
    out.append(pb.GenerateResponse(id=rid, finish=finish))
    return out


class EchoGenerator(pb_grpc.GeneratorServicer):
    """Answers every request at once; holds nothing between calls but a stream's credit."""

    def __init__(self, credits: int, registry: CollectorRegistry | None = None) -> None:
        self.credits = credits
        self.calls: Counter | None = None
        if registry is not None:  # the server's metric name and labels: bench/accounting.py reads both alike
            self.calls = Counter("genserve_requests_total", "Finished requests by outcome", ["model", "rpc", "code"], registry=registry)

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        return MODELS

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator[pb.GenerateResponse]:
        code = "CANCELLED"
        try:
            for message in answer(request):
                yield message
            code = "OK"
        finally:
            if self.calls is not None:
                self.calls.labels(request.model, "Generate", code).inc()

    async def GenerateStream(self, request_iterator: AsyncIterator[pb.StreamRequest], context: Any) -> AsyncIterator[pb.StreamResponse]:
        yield pb.StreamResponse(credits=self.credits)
        # Every admitted request finishes within the message that brought it, so the credit the
        # client holds when it sends a message is the whole grant: only a message with more
        # requests than that can be refused.
        async for message in request_iterator:
            results: list[pb.GenerateResponse] = []
            admitted = 0
            for request in message.requests:
                if admitted >= self.credits:
                    refusal = pb.Finish(reason=pb.FINISH_REASON_ERROR, code=RESOURCE_EXHAUSTED, message="no credit for this request")
                    results.append(pb.GenerateResponse(id=request.id, finish=refusal))
                    continue
                admitted += 1
                results.extend(answer(request))
            yield pb.StreamResponse(results=results, credits=admitted)


async def serve(port: int, credits: int, max_message_mb: int = 16, metrics_port: int = 0, accept_ahead: int = 1) -> None:
    """Serve on 127.0.0.1:port until SIGTERM or SIGINT; prints one line once it accepts calls."""
    limit = max_message_mb * 1024 * 1024
    server = aio_server(
        accept_ahead=accept_ahead, options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    )
    registry = CollectorRegistry() if metrics_port else None
    pb_grpc.add_GeneratorServicer_to_server(EchoGenerator(credits, registry), server)
    if registry is not None:
        start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"bench.echo: cannot listen on 127.0.0.1:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench.echo listening on 127.0.0.1:{port} (credits {credits})", flush=True)
    await stop.wait()
    await server.stop(grace=1.0)


def run(coro: Any) -> None:
    """Run ``coro`` on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--credits", type=int, default=512, help="credit granted to each GenerateStream (the server's --stream-credits)")
    parser.add_argument(
        "--accept-ahead", type=int, default=1, help="calls asked of grpc core ahead of need (server/grpc_edge/accept.py; 1: grpc.aio's own)"
    )
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics on 127.0.0.1 (0: off)")
    args = parser.parse_args(argv)
    if args.credits < 1:
        parser.error("--credits must be >= 1")
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.port, args.credits, metrics_port=args.metrics_port, accept_ahead=args.accept_ahead))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
