"""Text decoding beside Hugging Face ``generate``, on the same weights and torch thread count, in one run.

    python -m bench.text [--quick] [--threads N] [--rounds R] [--streams 32] [--tokens 100] [--no-server] [--server-args "..."]

Contenders, each decoding ``streams`` sequences of ``tokens`` new tokens (prompts of 16 characters,
temperature 1, top_k 0, distinct seeds), timed in rounds whose order is shuffled so that noise from
a shared machine hits all of them alike:
  server   ``python -m server`` (a subprocess, ``--threads N``): ``streams`` concurrent Generate calls
           from a grpc.aio client in this process; tokens counted from the text chunks received.
  h2load   the same server driven by h2load (C, Debian's ``nghttp2-client``) with ``streams`` calls in
           flight on one connection, so that the load generator costs little next to the server
           (a Python client takes a large share of two cores). Seeds are drawn by the server (one
           request body for all calls); tokens = calls x tokens, each call's status counted from the
           server's metrics (every one must be OK: h2load cannot read grpc-status).
  engine   ``DecodeBatch`` in this process, without the server: every sequence added, then ``step()``
           until idle (the decode loop's own ceiling).
  inv      the same with ``batch_invariant=True`` (fixed-shape passes: what bit-for-bit batch
           invariance costs).
  sdpa     the engine with torch's attention in its decode step instead of engine/kernels' (what
           the native kernel saves).
  hf       transformers ``GPT2LMHeadModel.generate`` at batch ``streams`` (KV cache, do_sample) on the
           same weights (``bench.interop.to_hf_gpt2``), its default (SDPA) attention.
  hf-eager the same with ``attn_implementation="eager"``, transformers' matmul attention (as fast or
           faster here); "/best hf" divides by the faster of the two.
  int8     the engine with ``--decode-precision int8`` (int8 linears, a float16 cache), beside
  hf-int8, hf-eager-int8  HF with its blocks' linears in int8 (torch's dynamic quantization,
           ``bench.interop.hf_int8``): "/best hf" of an int8 side divides by the faster HF int8.
After the rates, each precision's validation nats/char on the same windows (its cost in quality).
Tokens/s = tokens / wall time of the round. On a shared machine wall time mostly measures the
neighbours, so each round also counts CPU time: this process's for engine, inv and hf (one torch
thread runs on the calling thread), the server process's (all its threads) for server and h2load;
tokens per CPU-second compares what each side spends per token, whatever else the machine runs.
Time to first token (low load): one call at a time,
until its first text chunk (server), its first token event (engine), ``generate`` of 1 token (hf).
The engine's step is also profiled once (torch.profiler, top operators by self time) with --profile.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import torch

from bench import accounting
from bench.engine import MODELS, hf_run, ours_run, ours_ttft, prompts
from bench.interop import hf_int8, to_hf_gpt2
from bench.serve import free_ports, http_off
from engine.decode import DecodeBatch, SlotCache
from engine.modelfile import load_model
from engine.models.transformer import CharTransformer, ScriptedForward
from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
H2LOAD_ID = "h2load"  # the id of every h2load call (one request body serves them all)
SIDES = ("server", "h2load", "engine", "inv", "sdpa", "int8", "hf", "hf-eager", "hf-int8", "hf-eager-int8")
QUALITY_WINDOWS = 64  # validation windows of block_size characters for nats/char


def default_threads() -> int:
    """The server's default: all usable cores but one (for its event loop), at least one."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


async def server_round(stub: Any, texts: list[str], tokens: int, seed0: int) -> tuple[int, float]:
    """(tokens received, wall seconds) for ``len(texts)`` concurrent Generate calls."""

    async def one(i: int) -> int:
        params = pb.TextParams(prompt=texts[i], max_new_tokens=tokens, seed=seed0 + i, temperature=1.0)
        got = 0
        async for resp in stub.Generate(pb.GenerateRequest(model="transformer", text=params), timeout=60):
            if resp.WhichOneof("payload") == "text":
                got += len(resp.text.token_ids)
        return got

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(len(texts))))
    return sum(counts), time.perf_counter() - t0


async def server_ttft(stub: Any, text: str, seed: int) -> float:
    params = pb.TextParams(prompt=text, max_new_tokens=16, seed=seed, temperature=1.0)
    t0 = time.perf_counter()
    first = 0.0
    async for resp in stub.Generate(pb.GenerateRequest(model="transformer", text=params), timeout=30):
        if resp.WhichOneof("payload") == "text" and not first:
            first = time.perf_counter() - t0
    return first


def h2load_round(port: int, metrics_port: int, body: Path, calls: int, streams: int, tokens: int) -> tuple[int, float]:
    """(tokens, wall seconds) for ``calls`` Generate calls, ``streams`` in flight, driven by h2load.

    h2load does not read grpc-status, so every call's status is counted from the server's metrics
    around the round (bench/accounting.py), as bench.serve does: all ``calls`` must be OK. (The
    bytes received, checked here before, tell a failed call only by its missing chunks, and
    nothing of which status ended it.)
    """
    cmd = ["h2load", "-n", str(calls), "-c", "1", "-m", str(streams), "-d", str(body)]
    cmd += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    cmd += [f"http://127.0.0.1:{port}/genserve.v1.Generator/Generate"]
    before = accounting.settled(metrics_port)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    seconds = parse_h2load(out, calls)
    check_all_ok(accounting.tally(before, accounting.settled(metrics_port), calls, calls), calls)
    return calls * tokens, seconds


def parse_h2load(out: str, calls: int) -> float:
    """Seconds h2load took for ``calls`` calls; RuntimeError unless every call got an HTTP answer."""
    finished = re.search(r"finished in ([\d.]+)(m?s)", out)
    done = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", out)
    if not finished or not done:
        raise RuntimeError(f"unexpected h2load output:\n{out}")
    if int(done.group(1)) != calls:
        raise RuntimeError(f"h2load: {done.group(0)} of {calls} calls")
    return float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)


def check_all_ok(tally: accounting.Tally, calls: int) -> None:
    """RuntimeError unless the server counted exactly ``calls`` calls, every one OK."""
    if tally.by_status != {"OK": calls}:
        counted = ", ".join(f"{code} {n}" for code, n in tally.by_status.items()) or "none"
        raise RuntimeError(f"h2load sent {calls} calls; the server counted {counted}: every call must be OK")


async def wait_ready(stub: Any, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            resp = await stub.ListModels(pb.ListModelsRequest(), timeout=2)
            if any(m.name == "transformer" for m in resp.models):
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the server was not ready within {timeout_s} s")


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) of process ``pid`` (its every thread), or of this one when None."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


async def bench(args: argparse.Namespace) -> list[str]:
    import transformers

    transformers.logging.set_verbosity_error()
    loaded = load_model(MODELS / "transformer.safetensors")
    assert loaded.vocab is not None
    vocab = loaded.vocab
    hfs = {
        "hf": to_hf_gpt2(loaded.module),  # type: ignore[arg-type]
        "hf-eager": to_hf_gpt2(loaded.module, attn_implementation="eager"),  # type: ignore[arg-type]
        "hf-int8": hf_int8(to_hf_gpt2(loaded.module)),  # type: ignore[arg-type]
        "hf-eager-int8": hf_int8(to_hf_gpt2(loaded.module, attn_implementation="eager")),  # type: ignore[arg-type]
    }
    for model in hfs.values():
        model.generation_config.eos_token_id = None  # no end-of-text token in a character vocabulary
    hf = hfs["hf"]
    slots = args.max_batch or args.streams
    loop = DecodeBatch.from_loaded(loaded, max_batch=slots, max_pending=0)
    loop8 = DecodeBatch.from_loaded(loaded, max_batch=slots, max_pending=0, precision="int8")
    inv = DecodeBatch.from_loaded(loaded, max_batch=slots, max_pending=0, batch_invariant=True)
    sdpa = DecodeBatch.from_loaded(loaded, max_batch=slots, max_pending=0)
    if isinstance(sdpa._cache.forward, ScriptedForward):
        sdpa._cache.forward.native = False  # the decode step with torch's attention: what engine/kernels saves
    texts = prompts(vocab, args.streams)
    stoi = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([[stoi[c] for c in t] for t in texts])
    cpu = torch.device("cpu")

    rates: dict[str, list[float]] = {name: [] for name in SIDES}
    cpu_rates: dict[str, list[float]] = {name: [] for name in SIDES}
    ttft: dict[str, list[float]] = {name: [] for name in SIDES}
    contenders: dict[str, Callable[[int], Any]] = {}
    proc: subprocess.Popen[bytes] | None = None
    tmp = tempfile.TemporaryDirectory(prefix="bench-text-")
    channel: grpc.aio.Channel | None = None
    try:
        if not args.no_server:
            port, metrics_port = free_ports(2)
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
                str(MODELS),
            ]
            cmd += ["--threads", str(args.threads), "--log-level", "warning", "--decode-batch", str(max(64, args.streams))]
            cmd += shlex.split(args.server_args)
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            stub = pb_grpc.GeneratorStub(channel)
            await wait_ready(stub, proc)
            await server_round(stub, texts[:8], 8, 0)  # warm-up
            contenders["server"] = lambda seed: server_round(stub, texts, args.tokens, seed)
            if shutil.which("h2load") and not args.no_h2load:
                params = pb.TextParams(prompt=texts[0], max_new_tokens=args.tokens)
                request = pb.GenerateRequest(model="transformer", id=H2LOAD_ID, text=params)
                payload = request.SerializeToString()
                body = Path(tmp.name) / "request.bin"
                body.write_bytes(b"\0" + struct.pack(">I", len(payload)) + payload)
                calls = args.streams * args.h2load_waves

                async def h2load_round_(seed: int, port: int = port, body: Path = body) -> tuple[int, float]:
                    return h2load_round(port, metrics_port, body, calls, args.streams, args.tokens)

                contenders["h2load"] = h2load_round_
        ours = {"engine": loop, "inv": inv, "sdpa": sdpa, "int8": loop8}
        for batch in ours.values():
            ours_run(batch, texts[:8], 8, 0)  # warm-ups: first calls pay lazy initialisation
        for model in hfs.values():
            hf_run(model, ids[:1], 8, 0, cpu)

        def ours_round(batch: DecodeBatch) -> Callable[[int], Any]:
            async def round_(seed: int) -> tuple[int, float]:
                n, dt, _ = ours_run(batch, texts, args.tokens, seed)
                return n, dt

            return round_

        def hf_round(model: Any) -> Callable[[int], Any]:
            async def round_(seed: int) -> tuple[int, float]:
                return hf_run(model, ids, args.tokens, seed, cpu)

            return round_

        contenders |= {name: ours_round(batch) for name, batch in ours.items()}
        contenders |= {name: hf_round(model) for name, model in hfs.items()}
        rng = random.Random(args.seed)
        order = list(contenders)
        seed = 1000
        for _ in range(args.rounds):
            rng.shuffle(order)
            for name in order:
                seed += 100
                pid = proc.pid if proc is not None and name in ("server", "h2load") else None
                c0 = cpu_seconds(pid)
                n, dt = await contenders[name](seed)
                rates[name].append(n / dt)
                cpu_rates[name].append(n / max(cpu_seconds(pid) - c0, 1e-3))
            for k in range(args.ttft_calls):
                if "server" in contenders:
                    ttft["server"].append(await server_ttft(stub, texts[k % len(texts)], seed + k))
                ttft["engine"].append(ours_ttft(loop, texts[k % len(texts)], seed + k))
                ttft["inv"].append(ours_ttft(inv, texts[k % len(texts)], seed + k))
                ttft["hf"].append(hf_run(hf, ids[k % len(texts) : k % len(texts) + 1], 1, seed + k, cpu)[1])
    finally:
        if channel is not None:
            await channel.close()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        tmp.cleanup()

    hf_med = statistics.median(rates["hf"])
    hf_cpu = statistics.median(cpu_rates["hf"])
    best_hf = max(hf_med, statistics.median(rates["hf-eager"]))
    best_hf8 = max(statistics.median(rates["hf-int8"]), statistics.median(rates["hf-eager-int8"]))
    lines = [
        f"text: {args.streams} streams x {args.tokens} new tokens, prompts of 16 chars, temperature 1; "
        f"{args.threads} torch thread(s) on every side; {args.rounds} rounds, order shuffled; {len(os.sched_getaffinity(0))} usable cores",
        f"{'side':>13} {'tok/s p50':>10} {'/hf':>6} {'/best hf':>9} {'tok/CPU-s p50':>14} {'/hf':>6} {'TTFT p50 ms':>12}"
        "  per-round tok/s / hf's",
    ]
    if args.server_args:
        lines.insert(1, f"server sides run with: {args.server_args}")
    for name in SIDES:
        rs = rates[name]
        if not rs:
            continue
        per_round = " ".join(f"{r / h:.2f}" for r, h in zip(rs, rates["hf"], strict=True))
        c = statistics.median(cpu_rates[name])
        t = median_ms(ttft[name]) if ttft[name] else math.nan
        r = statistics.median(rs)
        int8 = "int8" in name or (name in ("server", "h2load") and "int8" in args.server_args)
        best = best_hf8 if int8 else best_hf  # int8 beside HF's int8, as the issue asks
        lines.append(f"{name:>13} {r:>10.0f} {r / hf_med:>6.2f} {r / best:>9.2f} {c:>14.0f} {c / hf_cpu:>6.2f} {t:>12.2f}  {per_round}")
    lines += quality_lines(loaded.module, hfs, vocab)  # type: ignore[arg-type]
    if args.profile:
        lines += profile_step(loop, texts, args.tokens)
    return lines


def quality_lines(model: CharTransformer, hfs: dict[str, Any], vocab: str) -> list[str]:
    """Validation nats/char of each precision, on the same windows: ours through the cached forward (the
    serving path: int8 linears, float16 cache), HF through its forward."""
    from training.data import load_shakespeare

    size = model.config.block_size
    val = load_shakespeare().val[: QUALITY_WINDOWS * size].view(QUALITY_WINDOWS, size)

    def nats(logits: torch.Tensor) -> float:
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        return -logp.gather(-1, val[:, 1:].unsqueeze(-1)).mean().item()

    rows = []
    with torch.inference_mode():
        for precision in ("float32", "int8"):
            cache = SlotCache(model, QUALITY_WINDOWS, precision)
            rows.append((f"engine {precision}", nats(cache.prefill(list(range(QUALITY_WINDOWS)), val.tolist()))))
        rows += [(name, nats(hfs[name](val).logits)) for name in ("hf", "hf-int8")]
    return ["", f"validation nats/char ({QUALITY_WINDOWS} windows of {size} characters, teacher-forced):"] + [
        f"  {name:>14} {n:.4f}" for name, n in rows
    ]


def profile_step(loop: DecodeBatch, texts: list[str], tokens: int) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        n, dt, steps = ours_run(loop, texts, tokens, 7)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return ["", f"engine under the profiler: {n} tokens in {dt:.3f} s, {len(steps)} steps", table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.text", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=default_threads(), help="torch threads, here and in the server")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=0, help="slots of the engine's loops (0: --streams)")
    parser.add_argument("--tokens", type=int, default=100, help="new tokens per stream (16 + tokens <= the model's 128)")
    parser.add_argument("--ttft-calls", type=int, default=5, help="single calls per round for time to first token")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 8 streams x 24 tokens")
    parser.add_argument("--no-server", action="store_true", help="engine and hf only")
    parser.add_argument("--no-h2load", action="store_true", help="skip the h2load-driven server side")
    parser.add_argument("--h2load-waves", type=int, default=3, help="h2load sends streams x this many calls per round")
    parser.add_argument("--profile", action="store_true", help="also profile the engine's decode loop once")
    parser.add_argument("--seed", type=int, default=0, help="seeds the order of the rounds")
    parser.add_argument("--server-args", default="", help='more flags for the server, e.g. "--stream-interval 8"')
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.streams, args.tokens, args.ttft_calls = 2, 8, 24, 2
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    for line in asyncio.run(bench(args)):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
