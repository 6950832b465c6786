"""The peers of the serving comparison: the same VAE decoder behind LitServe, FastAPI and Ray Serve, and the
same Transformer (as Hugging Face GPT-2) streaming text behind LitServe and FastAPI.

    python -m bench.peer_apps {litserve,fastapi,ray} --port P [--batch 32] [--batch-timeout-ms 5] [--threads T]
    python -m bench.peer_apps {litserve-text,litserve-text-batch,fastapi-text,text-echo} --port P [--batch 8] [--threads T]

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

Text (bench/text_load.py drives them): ``POST /predict`` with the body our ``/v1/completions`` takes
(``{"prompt", "max_tokens", "temperature", "seed"}``; other fields ignored). The model is the bundled
``models/transformer.safetensors`` loaded into ``GPT2LMHeadModel`` by bench/interop.py, sampled by HF
``generate`` (temperature, top_k 0, top_p 1; no end-of-text token, so every request gets its
``max_tokens``). The model's context is 128 positions, so a request that outgrows it is generated in
windows: when the context is full, its last 64 tokens start the next ``generate`` (our engine's
crop, engine/decode.py). Streams are Server-Sent Events ``data: {"text": "..."}`` then ``data: [DONE]``.

  litserve-text        ``LitAPI(stream=True)``, ``predict`` yields what a ``TextIteratorStreamer`` yields
                       while ``generate`` runs in a thread (as its docs and users write it); one worker,
                       so one request decodes at a time, the others queue.
  litserve-text-batch  ``LitAPI(max_batch_size=--batch, batch_timeout)``: one ``generate`` for the batch
                       (left-padded), the batch's first request's temperature and seed for all, as many
                       tokens as the batch's largest ``max_tokens``; answers whole completions
                       (``{"text": "..."}``), so the first token arrives with the last.
  fastapi-text         an ``async def`` route that starts ``generate`` in a thread with a
                       ``TextIteratorStreamer`` and returns a ``StreamingResponse`` iterating it (each
                       request its own thread: concurrent, no batching); uvicorn with uvloop + httptools.
  text-echo            no model, no framework: a bare asyncio HTTP/1.1 server that streams ``max_tokens``
                       SSE messages of genserve's shape at once, so the load generator's own ceiling shows.

These need the ``peers`` extra (``pip install -e '.[peers]'``); nothing else in the project imports them.
"""

import argparse
import base64
import json
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("litserve", "fastapi", "ray")
TEXT_PEERS = ("litserve-text", "litserve-text-batch", "fastapi-text", "text-echo")
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


class CharTokenizer:
    """What ``TextIteratorStreamer`` needs of a tokenizer, for a character-level vocabulary: ``decode``."""

    def __init__(self, vocab: str) -> None:
        self.vocab = vocab

    def decode(self, ids: Any, **kwargs: Any) -> str:
        if isinstance(ids, int):
            ids = [ids]
        return "".join(self.vocab[int(i)] for i in ids)


@dataclass(frozen=True)
class TextAsk:
    prompt: str
    max_tokens: int
    temperature: float
    seed: int


def text_ask(body: Any, default_tokens: int = 32) -> TextAsk:
    """The request's prompt, max_tokens, temperature and seed (/v1/completions' names); ValueError naming the field."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    prompt, max_tokens = body.get("prompt"), body.get("max_tokens", default_tokens)
    temperature, seed = body.get("temperature", 1.0), body.get("seed", 0)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 4096:
        raise ValueError(f"max_tokens must be an integer from 1 to 4096, got {max_tokens!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 < temperature <= 2:
        raise ValueError(f"temperature must be a number in (0, 2], got {temperature!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer from 0 to 2**63-1, got {seed!r}")
    return TextAsk(prompt, max_tokens, float(temperature), seed)


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class HFText:
    """The bundled Transformer as Hugging Face GPT-2 (bench/interop.py), sampled by ``generate``."""

    def __init__(self, models_dir: Path, threads: int) -> None:
        import torch
        import transformers

        from bench.interop import to_hf_gpt2
        from engine.modelfile import load_model

        if threads > 0:
            torch.set_num_threads(threads)
        transformers.logging.set_verbosity_error()
        loaded = load_model(models_dir / "transformer.safetensors")
        self.vocab = loaded.vocab or ""
        self.lookup = {c: i for i, c in enumerate(self.vocab)}
        self.hf = to_hf_gpt2(loaded.module)  # type: ignore[arg-type]  # a CharTransformer: the file says so
        self.block = int(loaded.module.config.block_size)  # type: ignore[union-attr,arg-type]
        self.keep = max(1, self.block // 2)  # tokens a full context keeps (engine/decode.py's crop)
        self.tokenizer = CharTokenizer(self.vocab)

    def ids(self, prompt: str) -> list[int]:
        unknown = sorted({c for c in prompt if c not in self.lookup})
        if unknown:
            raise ValueError(f"prompt has characters outside the vocabulary: {''.join(unknown)!r}")
        return [self.lookup[c] for c in prompt][-self.block :]

    def generate(self, contexts: list[list[int]], new_tokens: int, temperature: float, streamer: Any = None) -> list[list[int]]:
        """One ``generate`` of ``new_tokens`` for each context (left-padded; each fits the window with them): the new ids."""
        import torch

        width = max(len(c) for c in contexts)
        ids = torch.tensor([[0] * (width - len(c)) + c for c in contexts], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], dtype=torch.long)
        with torch.inference_mode():
            out = self.hf.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                temperature=temperature, top_k=0, top_p=1.0, pad_token_id=0, use_cache=True, streamer=streamer,
            )  # fmt: skip
        return [row[width:] for row in out.tolist()]

    def windows(self, contexts: list[list[int]], left: int) -> tuple[list[list[int]], int]:
        """The contexts the next ``generate`` starts from (full ones cropped to their last ``keep``) and its tokens."""
        if max(len(c) for c in contexts) >= self.block:
            contexts = [c[-self.keep :] for c in contexts]
        return contexts, min(left, self.block - max(len(c) for c in contexts))

    def stream(self, ask: TextAsk) -> Iterator[str]:
        """The text of one request as a ``TextIteratorStreamer`` yields it, ``generate`` running in a thread."""
        import torch
        from transformers import TextIteratorStreamer

        context, left = self.ids(ask.prompt), ask.max_tokens
        torch.manual_seed(ask.seed)
        while left > 0:
            (context,), n = self.windows([context], left)
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True)  # type: ignore[arg-type]  # duck-typed
            result: dict[str, Any] = {}

            def run(ctx: list[int] = context, n: int = n, streamer: Any = streamer, result: dict[str, Any] = result) -> None:
                try:
                    result["ids"] = self.generate([ctx], n, ask.temperature, streamer)[0]
                except BaseException as e:
                    result["error"] = e
                    streamer.end()

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            yield from streamer
            thread.join()
            if "error" in result:
                raise result["error"]
            context, left = context + result["ids"], left - n

    def complete(self, asks: list[TextAsk]) -> list[str]:
        """One batch: ``generate`` for all, the first request's temperature and seed, the largest max_tokens."""
        import torch

        contexts, out = [self.ids(a.prompt) for a in asks], [[] for _ in asks]  # type: list[list[int]], list[list[int]]
        left = max(a.max_tokens for a in asks)
        torch.manual_seed(asks[0].seed)
        while left > 0:
            contexts, n = self.windows(contexts, left)
            new = self.generate(contexts, n, asks[0].temperature)
            contexts = [c + x for c, x in zip(contexts, new, strict=True)]
            out = [o + x for o, x in zip(out, new, strict=True)]
            left -= n
        return [self.tokenizer.decode(o[: a.max_tokens]) for o, a in zip(out, asks, strict=True)]


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


def serve_litserve_text(args: argparse.Namespace) -> None:
    import litserve as ls

    from bench.peer_litserve import TextBatchAPI, TextStreamAPI

    api: Any
    if args.peer == "litserve-text":
        api = TextStreamAPI(stream=True)
    else:
        api = TextBatchAPI(max_batch_size=args.batch, batch_timeout=args.batch_timeout_ms / 1000.0)
    api.settings = (args.models_dir, args.threads)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, fast_queue=True, timeout=args.request_timeout_s)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)


def serve_fastapi_text(args: argparse.Namespace) -> None:
    import uvicorn
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    model = HFText(args.models_dir, args.threads)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request) -> StreamingResponse:
        try:
            ask = text_ask(await request.json())
            model.ids(ask.prompt)
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

        def events() -> Iterator[str]:  # a sync generator: Starlette iterates it in its thread pool
            for text in model.stream(ask):
                if text:
                    yield sse({"text": text})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, loop="uvloop", http="httptools")


def serve_text_echo(args: argparse.Namespace) -> None:
    """A bare asyncio HTTP/1.1 server: ``max_tokens`` SSE messages of /v1/completions' shape, each its own write, at once."""
    import asyncio

    message = b'data: {"id":"echo","object":"text_completion","choices":[{"index":0,"text":"a","finish_reason":null}]}\n\n'
    chunk = b"%x\r\n%s\r\n" % (len(message), message)
    done = sse("[DONE]").encode()
    tail = b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (int(line.split(b":", 1)[1]) for line in request.lower().split(b"\r\n") if line.startswith(b"content-length:")), 0
            )
            body = json.loads(await reader.readexactly(length)) if length else {}
            if request.startswith(b"GET"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            else:
                writer.write(head)
                for _ in range(int(body.get("max_tokens", 32))):
                    writer.write(chunk)
                    await asyncio.sleep(0)  # each message its own write, as a server that produces them one by one
                writer.write(tail)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", args.port, backlog=4096)
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peer_apps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("peer", choices=PEERS + TEXT_PEERS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument(
        "--threads", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1), help="torch threads (our server's default)"
    )
    parser.add_argument("--batch", type=int, default=BATCH, help="max batch size (litserve, ray)")
    parser.add_argument("--batch-timeout-ms", type=float, default=BATCH_TIMEOUT_MS, help="batch wait (litserve, ray)")
    parser.add_argument("--request-timeout-s", type=float, default=30.0, help="litserve's request timeout (504 after it)")
    args = parser.parse_args(argv)
    need = "vae" if args.peer in PEERS else "transformer" if args.peer != "text-echo" else None
    if need and not (args.models_dir / f"{need}.safetensors").is_file():
        parser.error(f"--models-dir {args.models_dir}: no {need}.safetensors there")
    sys.path.insert(0, str(ROOT))  # Ray's workers and LitServe's processes import bench.* and engine.*
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    serve = {"litserve": serve_litserve, "fastapi": serve_fastapi, "ray": serve_ray, "litserve-text": serve_litserve_text}
    serve |= {"litserve-text-batch": serve_litserve_text, "fastapi-text": serve_fastapi_text, "text-echo": serve_text_echo}
    serve[args.peer](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
