"""The peers of the serving comparison: the same VAE decoder behind LitServe, FastAPI and Ray Serve.

    python -m bench.peer_apps {litserve,fastapi,ray} --port P [--batch 32] [--batch-timeout-ms 5] [--threads T]

Each peer serves ``POST /predict`` with a JSON body ``{"seed": 1}`` (one image, as their users
send it) and answers ``{"seed": 1, "image": "<base64 of 784 uint8 pixels>"}``: the same 784 bytes
our Generate sends, base64 being the cheapest way JSON users carry them. ``GET /health`` answers
200 once the model is loaded. The compute is ours: ``ImageGenerator.prepare`` + ``run`` on the
bundled ``models/vae.safetensors`` with the same torch thread count as our server, so only the
serving layer differs between the sides.

  litserve  ``LitAPI(max_batch_size, batch_timeout)`` + ``fast_queue`` (its zmq queue, the fast path
            its docs recommend), one inference worker, one API server (2 cores).
  fastapi   one ``async def`` route that runs the forward pass in a worker thread
            (``run_in_threadpool``), uvicorn with uvloop + httptools, one process, no batching:
            what a FastAPI user writes. Not batching is its design, not a handicap we chose.
  ray       Ray Serve deployment, ``@serve.batch(max_batch_size, batch_wait_timeout_s)``, one
            replica, ``max_ongoing_requests`` = 2 x batch (so a batch can fill while one runs),
            ``num_cpus`` = the machine's cores (a local cluster of this machine only).

These need the ``peers`` extra (``pip install -e '.[peers]'``); nothing else in the project imports them.
"""

import argparse
import base64
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("litserve", "fastapi", "ray")
# The batching peers' settings: those of the issue's orientation figures (batch 32, 5 ms). Not swept here yet: a
# sweep of --batch / --batch-timeout-ms on a quiet machine would show whether another setting suits them better.
BATCH = 32
BATCH_TIMEOUT_MS = 5.0


class Decoder:
    """One-image requests to base64 pixels through the engine's own image path (same work as our server's)."""

    def __init__(self, models_dir: Path, threads: int, max_batch: int) -> None:
        import torch

        from engine.images import ImageGenerator
        from engine.limits import ImageLimits
        from engine.modelfile import load_model

        if threads > 0:
            torch.set_num_threads(threads)
        self.gen = ImageGenerator(load_model(models_dir / "vae.safetensors"), ImageLimits(max_n=1, max_batch=max(1, max_batch)))

    def decode(self, seeds: list[int]) -> list[dict[str, Any]]:
        from engine.images import ImageRequest

        results = self.gen.run([self.gen.prepare(ImageRequest(n=1, seed=s)) for s in seeds])
        return [{"seed": r.seed, "image": base64.b64encode(r.pixels.tobytes()).decode("ascii")} for r in results]


def seed_of(body: Any) -> int:
    """The request's seed; a clear error naming the field for anything else."""
    seed = body.get("seed", 0) if isinstance(body, dict) else None
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer from 0 to 2**63-1, got {seed!r}")
    return seed


def serve_litserve(args: argparse.Namespace) -> None:
    import litserve as ls

    from bench.peer_litserve import VAEAPI  # a module-level class: LitServe pickles it into its worker process

    api = VAEAPI(max_batch_size=args.batch, batch_timeout=args.batch_timeout_ms / 1000.0)
    api.settings = (args.models_dir, args.threads, args.batch)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, fast_queue=True, timeout=args.request_timeout_s)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)


def serve_fastapi(args: argparse.Namespace) -> None:
    import uvicorn
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.concurrency import run_in_threadpool

    app = FastAPI()
    decoder = Decoder(args.models_dir, args.threads, 1)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        try:
            seed = seed_of(await request.json())
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        (out,) = await run_in_threadpool(decoder.decode, [seed])
        return out

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, loop="uvloop", http="httptools")


def serve_ray(args: argparse.Namespace) -> None:
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    batch, wait_s = args.batch, args.batch_timeout_ms / 1000.0

    @serve.deployment(num_replicas=1, max_ongoing_requests=2 * batch, ray_actor_options={"num_cpus": 0})
    class VAE:
        def __init__(self) -> None:
            self.decoder = Decoder(args.models_dir, args.threads, batch)

        @serve.batch(max_batch_size=batch, batch_wait_timeout_s=wait_s)
        async def decode(self, seeds: list[int]) -> list[dict[str, Any]]:
            return self.decoder.decode(seeds)

        async def __call__(self, request: Request) -> Any:
            if request.url.path.endswith("/health"):
                return {"status": "ok"}
            try:
                seed = seed_of(await request.json())
            except ValueError as e:
                return JSONResponse({"detail": str(e)}, status_code=400)
            return await self.decode(seed)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config={"log_level": "WARNING"})
    serve.run(VAE.bind(), route_prefix="/", blocking=True)  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peer_apps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument(
        "--threads", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1), help="torch threads (our server's default)"
    )
    parser.add_argument("--batch", type=int, default=BATCH, help="max batch size (litserve, ray)")
    parser.add_argument("--batch-timeout-ms", type=float, default=BATCH_TIMEOUT_MS, help="batch wait (litserve, ray)")
    parser.add_argument("--request-timeout-s", type=float, default=30.0, help="litserve's request timeout (504 after it)")
    args = parser.parse_args(argv)
    if not (args.models_dir / "vae.safetensors").is_file():
        parser.error(f"--models-dir {args.models_dir}: no vae.safetensors there")
    sys.path.insert(0, str(ROOT))  # Ray's workers and LitServe's processes import bench.* and engine.*
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    {"litserve": serve_litserve, "fastapi": serve_fastapi, "ray": serve_ray}[args.peer](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
