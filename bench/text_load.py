"""Text under an open loop: genserve's HTTP edge beside Hugging Face ``generate`` behind LitServe and FastAPI.

    python -m bench.text_load [--quick] [--rates 1,2,3,4,6,8,12,16,20,24,28,32,40,48,64] [--echo-rates 8,32,64,128]
                              [--duration 20] [--drain 10]
                              [--only echo,genserve,litserve,litserve-b8,litserve-b32,fastapi] [--threads T]
                              [--json docs/runs/bench_text_load.json] [--plot bench/peers_text_load.png]
                              [--report bench/REPORT.md] [--from-json FILE]

Workload (issue 35). Requests arrive as a Poisson process at the offered rate for ``--duration``
seconds; each has a prompt of 16-128 characters cut at random from tiny shakespeare's validation
split (training/data.py), ``max_tokens`` drawn from a fixed mixture (70% 32, 25% 128, 5% 512),
temperature 0.8 and a seed of its own. The schedule comes from ``--seed`` and the rate alone, so
every side at a rate gets the same requests and a rerun repeats them.

Sides, one at a time on the same cores, each a server process of its own, all on the bundled
``models/transformer.safetensors`` with the same torch thread count (bench/peer_apps.py says how
each peer is written):
  echo            bench.peer_apps text-echo: streams ``max_tokens`` SSE messages at once, no model.
                  The load generator's own ceiling: its figures sit beside the sides' in one run.
  genserve        ``python -m server`` on its defaults; ``POST /v1/completions``, ``"stream": true``.
  LitServe        ``LitAPI(stream=True)``, HF ``generate`` + ``TextIteratorStreamer``.
  LitServe b8/b32 ``max_batch_size`` 8 / 32: one ``generate`` per batch, whole completions.
  FastAPI         ``StreamingResponse`` over a ``TextIteratorStreamer``, ``generate`` in a thread per request.
One load generator for all: this process, asyncio (uvloop when installed), one HTTP/1.1 connection
per request, the same JSON body to every side (/v1/completions' fields), reading Server-Sent Events
(or, for the batching peer, one JSON answer) as they arrive.

Figures of a point (bench/text_load.py ``point_figures``), all times from the request's scheduled
arrival, so a slow client or a full accept queue counts against the side:
  tokens/s   tokens delivered in the arrival window (all requests) / its length.
  TTFT       first token - arrival, p50/p99 over every request that did not fail; one still
             without a token at the cut counts as infinite.
  ITL        the gaps between a request's successive tokens, pooled over requests; tokens that
             arrive in one read are 0 apart (a peer that sends words or whole completions shows
             it). A request cut at the end adds its gap from the last token to the cut (a lower bound).
  goodput    tokens/s as above, counting only requests that completed with TTFT <= 250 ms and
             their own p99 gap <= 100 ms.
  cut        arrivals stop at ``--duration``; the point waits at most ``--drain`` more seconds for
             the requests still open, then closes them: they are "unfinished" (never good), and the
             side is restarted before its next point (a peer's ``generate`` thread goes on after
             its client has left). A non-200 answer, an error event or a broken stream is "failed".
A side "keeps up" at a rate when at most 1% of its requests fail or are unfinished and its TTFT
p50 is under 1 s; its sweep stops at the first rate where it does not. Its maximum rate is the
highest it kept up with; genserve gets one more point at half of that (issue 35's TTFT target).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.figures import fmt, pct_ms
from bench.peers_report import TEXT_LOAD_BEGIN as BEGIN
from bench.peers_report import TEXT_LOAD_END as END

ROOT = Path(__file__).resolve().parent.parent
MIX = ((32, 0.70), (128, 0.25), (512, 0.05))  # max_tokens and its share of requests
PROMPT_CHARS = (16, 128)
TEMPERATURE = 0.8
TTFT_SLO_S = 0.250
ITL_SLO_S = 0.100
RATES = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 20.0, 24.0, 28.0, 32.0, 40.0, 48.0, 64.0)
ECHO_RATES = (8.0, 32.0, 64.0, 128.0)  # the load generator's ceiling: up to twice the highest rate a side is offered
QUICK_RATES = (2.0, 8.0)
RUN_FILE = ROOT / "docs" / "runs" / "bench_text_load.json"
PLOT = "peers_text_load.png"


# -- the workload ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the point's start
    prompt: str
    max_tokens: int
    seed: int


def validation_text(vocab: str | None = None) -> str:
    """Tiny shakespeare's validation split as text, only characters of ``vocab`` (the model's) kept."""
    from training.data import load_shakespeare

    splits = load_shakespeare()
    text = "".join(splits.vocab[i] for i in splits.val.tolist())
    return text if vocab is None else "".join(c for c in text if c in vocab)


def schedule(rate: float, duration_s: float, text: str, seed: int = 0) -> list[Arrival]:
    """Poisson arrivals at ``rate``/s for ``duration_s``: the same list for the same (rate, duration, text, seed)."""
    if rate <= 0 or duration_s <= 0:
        return []
    rng = np.random.default_rng([seed, round(rate * 1000)])
    tokens = np.array([m for m, _ in MIX])
    shares = np.array([p for _, p in MIX])
    first_seed = int(rng.integers(0, 2**40))
    out: list[Arrival] = []
    t = 0.0
    while True:
        t += float(rng.exponential(1.0 / rate))
        if t >= duration_s:
            return out
        n = int(rng.integers(PROMPT_CHARS[0], PROMPT_CHARS[1] + 1))
        start = int(rng.integers(0, len(text) - n))
        out.append(Arrival(t, text[start : start + n], int(rng.choice(tokens, p=shares)), first_seed + len(out)))


def body(a: Arrival) -> bytes:
    """The request every side gets: /v1/completions' fields (the peers read prompt, max_tokens, temperature, seed)."""
    fields = {"model": "transformer", "prompt": a.prompt, "max_tokens": a.max_tokens, "temperature": TEMPERATURE}
    return json.dumps(fields | {"seed": a.seed, "stream": True}).encode()


# -- one request's record and the figures of a point (pure: tests feed them synthetic records) -----


@dataclass
class Record:
    arrival: float  # scheduled, seconds from the point's start
    max_tokens: int
    sent: float = math.nan  # when the client began to connect
    times: list[float] = field(default_factory=list)  # each token's delivery time
    end: float = math.nan
    status: str = "unfinished"  # "ok", "failed", or still "unfinished" at the cut
    error: str = ""


def gaps(times: Sequence[float]) -> np.ndarray:
    return np.diff(np.asarray(times, dtype=np.float64))


def good(r: Record) -> bool:
    """Completed, first token within TTFT_SLO_S of arrival, its own p99 gap within ITL_SLO_S."""
    if r.status != "ok" or not r.times or r.times[0] - r.arrival > TTFT_SLO_S:
        return False
    g = gaps(r.times)
    return g.size == 0 or float(np.percentile(g, 99, method="inverted_cdf")) <= ITL_SLO_S


def keeps_up(f: dict[str, Any]) -> bool:
    """At most 1% failed or unfinished, and TTFT p50 under 1 s."""
    return f["failed"] + f["unfinished"] <= 0.01 * max(f["requests"], 1) and f["ttft_p50_ms"] < 1000.0


def point_figures(records: Sequence[Record], duration_s: float, cut_s: float) -> dict[str, Any]:
    """Tokens/s, goodput, TTFT and ITL percentiles, counts, of the records of one point (see the module's doc)."""
    live = [r for r in records if r.status != "failed"]
    ttft = np.array([(r.times[0] - r.arrival) if r.times else math.inf for r in live])
    pooled = [gaps(r.times) for r in live]
    pooled += [np.array([cut_s - r.times[-1]]) for r in live if r.status == "unfinished" and r.times]
    itl = np.concatenate(pooled) if pooled else np.zeros(0)
    in_window = np.array([sum(1 for t in r.times if t < duration_s) for r in records], dtype=np.int64)
    is_good = np.array([good(r) for r in records], dtype=bool)
    lag = np.array([r.sent - r.arrival for r in records if not math.isnan(r.sent)])
    errors: dict[str, int] = {}
    for r in records:
        if r.status == "failed":
            errors[r.error] = errors.get(r.error, 0) + 1
    short = sum(1 for r in records if r.status == "ok" and len(r.times) != r.max_tokens)
    return {
        "requests": len(records),
        "completed": sum(1 for r in records if r.status == "ok"),
        "failed": sum(1 for r in records if r.status == "failed"),
        "unfinished": sum(1 for r in records if r.status == "unfinished"),
        "good": int(is_good.sum()),
        "short": short,  # completed with another number of tokens than asked
        "errors": errors,
        "tokens_s": float(in_window.sum()) / duration_s,
        "goodput_tokens_s": float(in_window[is_good].sum()) / duration_s if records else 0.0,
        "ttft_p50_ms": pct_ms(ttft, 50),
        "ttft_p99_ms": pct_ms(ttft, 99),
        "itl_p50_ms": pct_ms(itl, 50),
        "itl_p99_ms": pct_ms(itl, 99),
        "client_lag_p99_ms": pct_ms(lag, 99),
        "cut_s": cut_s,
    }


# -- the load generator ---------------------------------------------------------------------------


class Dechunk:
    """HTTP/1.1 chunked transfer coding, undone incrementally."""

    def __init__(self) -> None:
        self.buf = b""
        self.left = 0  # data bytes of the current chunk still to come
        self.crlf = False  # the CRLF after a chunk's data is next
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = []
        while not self.done:
            if self.left:
                take = self.buf[: self.left]
                out.append(take)
                self.buf, self.left = self.buf[len(take) :], self.left - len(take)
                if self.left:
                    break
                self.crlf = True
            if self.crlf:
                if len(self.buf) < 2:
                    break
                self.buf, self.crlf = self.buf[2:], False
            i = self.buf.find(b"\r\n")
            if i < 0:
                break
            size = int(self.buf[:i].split(b";")[0], 16)
            self.buf = self.buf[i + 2 :]
            if size == 0:
                self.done = True
            self.left = size
        return b"".join(out)


class Events:
    """Server-Sent Events of text: tokens (characters: the model is character-level) of each ``data:`` message,
    from /v1/completions' ``choices[0].text`` or the peers' ``text``; ``[DONE]`` ends; an ``error`` object fails."""

    def __init__(self) -> None:
        self.buf = b""
        self.done = False
        self.error = ""

    def feed(self, data: bytes) -> int:
        self.buf += data.replace(b"\r\n", b"\n")
        n = 0
        while (i := self.buf.find(b"\n\n")) >= 0:
            event, self.buf = self.buf[:i], self.buf[i + 2 :]
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self.done = True
                    continue
                obj = json.loads(payload)
                if "error" in obj:
                    self.error = "error event: " + str(obj["error"].get("code", "") if isinstance(obj["error"], dict) else obj["error"])
                    continue
                choices = obj.get("choices")
                n += len(choices[0].get("text") or "" if choices else obj.get("text") or "")
        return n


async def call(port: int, path: str, arrival: Arrival, rec: Record, t0: float) -> None:
    """One request: connect, POST, read the answer as it comes; ``rec`` says what became of it."""
    writer = None
    try:
        rec.sent = time.perf_counter() - t0
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = body(arrival)
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        answer = await reader.readuntil(b"\r\n\r\n")
        status = int(answer.split(b" ", 2)[1])
        if status != 200:
            rec.status, rec.error, rec.end = "failed", f"HTTP {status}", time.perf_counter() - t0
            return
        lower = answer.lower()
        dechunk = Dechunk() if b"transfer-encoding: chunked" in lower else None
        sse = b"text/event-stream" in lower or b"content-type" not in lower or b"application/json" not in lower
        events, whole = Events(), []
        while True:
            data = await reader.read(65536)
            if not data:
                break
            now = time.perf_counter() - t0
            data = dechunk.feed(data) if dechunk is not None else data
            if sse:
                rec.times.extend([now] * events.feed(data))
            else:
                whole.append(data)
            if dechunk is not None and dechunk.done:
                break
        now = time.perf_counter() - t0
        if not sse:  # one JSON answer: every token arrives with the last byte
            rec.times.extend([now] * len(json.loads(b"".join(whole)).get("text", "")))
        rec.end = now
        if sse and (events.error or not events.done):
            rec.status, rec.error = "failed", events.error or "stream ended without [DONE]"
        else:
            rec.status = "ok"
    except asyncio.CancelledError:
        rec.status = "unfinished"
        raise
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as e:
        rec.status, rec.error, rec.end = "failed", type(e).__name__, time.perf_counter() - t0
    finally:
        if writer is not None:
            writer.close()


async def run_point(port: int, path: str, arrivals: Sequence[Arrival], duration_s: float, drain_s: float) -> tuple[list[Record], float]:
    """Send ``arrivals`` on time, wait at most ``drain_s`` after ``duration_s`` for the last, close what is left open."""
    t0 = time.perf_counter() + 0.05
    records: list[Record] = []
    tasks: list[asyncio.Task[None]] = []
    for a in arrivals:
        delay = t0 + a.at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        rec = Record(a.at, a.max_tokens)
        records.append(rec)
        tasks.append(asyncio.create_task(call(port, path, a, rec, t0)))
    open_ = [t for t in tasks if not t.done()]
    if open_:
        await asyncio.wait(open_, timeout=max(0.0, t0 + duration_s + drain_s - time.perf_counter()))
    cut = time.perf_counter() - t0
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return records, cut


def measure(port: int, path: str, arrivals: Sequence[Arrival], duration_s: float, drain_s: float) -> tuple[list[Record], float]:
    """run_point on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_point(port, path, arrivals, duration_s, drain_s))
    return uvloop.run(run_point(port, path, arrivals, duration_s, drain_s))


# -- the sides ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    name: str  # the report's label
    key: str  # --only's name
    peer: str  # bench.peer_apps name, or "genserve"
    path: str
    settings: str
    needs: str = ""
    extra: tuple[str, ...] = ()


def sides(threads: int) -> list[Side]:
    from bench.peer_apps import BATCH_TIMEOUT_MS
    from server.config import ServerConfig

    c, t = ServerConfig(), f"torch threads {threads}"
    hf = "HF GPT2LMHeadModel.generate (bench/interop.py), windows of 128 cropped to 64"
    return [
        Side("echo", "echo", "text-echo", "/v1/completions", "bare asyncio HTTP/1.1: max_tokens SSE messages at once, no model"),
        Side(
            "genserve", "genserve", "genserve", "/v1/completions",
            f"python -m server defaults (decode_batch {c.decode_batch}, decode_pending {c.decode_pending}), {t}; "
            "POST /v1/completions stream=true (HTTP edge, SSE)",
        ),
        Side(
            "LitServe", "litserve", "litserve-text", "/predict",
            f"LitAPI(stream=True), predict yields a TextIteratorStreamer's text, {hf}; 1 worker, fast_queue, {t}",
            needs="litserve",
        ),
        Side(
            "LitServe b8", "litserve-b8", "litserve-text-batch", "/predict",
            f"max_batch_size 8, batch_timeout {BATCH_TIMEOUT_MS:g} ms, one generate per batch (its first request's "
            f"temperature and seed, its largest max_tokens), whole completions as JSON; {hf}; 1 worker, {t}",
            needs="litserve", extra=("--batch", "8"),
        ),
        Side(
            "LitServe b32", "litserve-b32", "litserve-text-batch", "/predict",
            f"max_batch_size 32, otherwise as b8; {t}", needs="litserve", extra=("--batch", "32"),
        ),
        Side(
            "FastAPI", "fastapi", "fastapi-text", "/predict",
            f"async route, generate in a thread per request + TextIteratorStreamer -> StreamingResponse (SSE), no batching; "
            f"uvicorn (uvloop, httptools), 1 process; {hf}; {t}",
            needs="fastapi",
        ),
    ]  # fmt: skip


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Sweep:
    """Starts a side, warms it, runs its points; restarts it after a point that left requests open."""

    def __init__(self, args: argparse.Namespace, logs: Path, text: str) -> None:
        self.args, self.logs, self.text = args, logs, text
        self.server: Any = None
        self.port = 0

    def start(self, side: Side) -> None:
        from bench.peers import wait_http
        from bench.serve import Server, free_ports

        self.stop()
        port, grpc_port = free_ports(2)
        py, a = sys.executable, self.args
        if side.peer == "genserve":
            cmd = [py, "-m", "server", "--http-port", str(port), "--port", str(grpc_port), "--metrics-port", "0"]
            cmd += ["--models-dir", str(a.models_dir), "--log-level", "warning", "--threads", str(a.threads)]
        else:
            cmd = [py, "-m", "bench.peer_apps", side.peer, "--port", str(port), "--threads", str(a.threads)]
            cmd += ["--models-dir", str(a.models_dir), "--request-timeout-s", "600", *side.extra]
        log = open(self.logs / f"{side.key}.log", "ab")  # noqa: SIM115 (closed by stop)
        self.server = Server(side.name, cmd, port, log)
        t0 = time.monotonic()
        self.server.start()
        self.port = port
        wait_http(port, self.server, 180.0)
        for i, n in enumerate((8, 8, 200)):  # warm: the first generate, and a second window
            recs, _ = measure(port, side.path, [Arrival(0.0, self.text[i * 100 : i * 100 + 64], n, i)], 0.0, 120.0)
            if recs[0].status != "ok":
                raise RuntimeError(f"{side.name}: warm-up request {recs[0].status} {recs[0].error}; log:\n{self.server.tail()}")
        progress(f"{side.name}: serving on {port} after {time.monotonic() - t0:.1f} s")

    def stop(self) -> None:
        if self.server is not None:
            from bench.peers import stop_tree

            stop_tree(self.server)
            self.server.log.close()
            self.server = None

    def point(self, side: Side, rate: float, text: str) -> dict[str, Any]:
        a = self.args
        if self.server is None:
            self.start(side)
        arrivals = schedule(rate, a.duration, text, a.seed)
        records, cut = measure(self.port, side.path, arrivals, a.duration, a.drain)
        f = {"side": side.name, "offered_req_s": rate, **point_figures(records, a.duration, cut)}
        f["kept_up"] = keeps_up(f)
        f["load_avg_1m"] = os.getloadavg()[0]  # the machine's other work, which shares the cores (and ours)
        progress(
            f"{side.name} @ {rate:g}/s: {fmt(f['tokens_s'])} tokens/s, goodput {fmt(f['goodput_tokens_s'])}, TTFT p50/p99 "
            f"{fmt(f['ttft_p50_ms'])}/{fmt(f['ttft_p99_ms'])} ms, ITL p50/p99 {fmt(f['itl_p50_ms'])}/{fmt(f['itl_p99_ms'])} ms, "
            f"{f['completed']}/{f['requests']} completed, {f['failed']} failed{' ' + str(f['errors']) if f['errors'] else ''}, "
            f"{f['unfinished']} unfinished, "
            f"client lag p99 {fmt(f['client_lag_p99_ms'])} ms, load average {f['load_avg_1m']:.1f}"
        )
        if f["unfinished"]:  # its server may still be busy with them: a fresh one for the next point
            self.stop()
        return f


# -- the run --------------------------------------------------------------------------------------


def model_vocab(path: Path) -> str:
    """The vocabulary a model file's metadata names (safetensors' JSON header), without loading it."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n)).get("__metadata__", {})
    vocab = json.loads(meta["vocab"]) if "vocab" in meta else None
    if not isinstance(vocab, str) or not vocab:
        raise ValueError(f"{path}: no vocabulary in its metadata")
    return vocab


def machine(threads: int, quick: bool) -> dict[str, Any]:
    from bench.peers import installed
    from bench.peers import machine as peers_machine

    m = peers_machine(threads, quick)
    dists = ("torch", "transformers", "litserve", "fastapi", "uvicorn", "starlette", "uvloop", "numpy")
    m["versions"] = {d: installed(d) for d in dists}
    return m


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.peers import installed

    plan = {
        "rates": list(args.rates),
        "echo_rates": list(args.echo_rates),
        "duration_s": args.duration,
        "drain_s": args.drain,
        "seed": args.seed,
    }
    plan |= {"mix": [list(m) for m in MIX], "prompt_chars": list(PROMPT_CHARS), "temperature": TEMPERATURE}
    plan |= {"ttft_slo_ms": TTFT_SLO_S * 1000, "itl_slo_ms": ITL_SLO_S * 1000}
    out: dict[str, Any] = {"machine": machine(args.threads, args.quick), "plan": plan, "settings": {}, "skipped": {}, "points": []}
    m = out["machine"]
    progress(f"{m['cpu_model']}, {m['usable_cores']} cores, {args.threads} torch threads, load average {m['load_avg_at_start']:.1f}")
    text = validation_text(model_vocab(args.models_dir / "transformer.safetensors"))
    wanted = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory(prefix="bench-text-load-") as logs:
        sweep = Sweep(args, Path(logs), text)
        try:
            for side in sides(args.threads):
                if wanted is not None and side.key not in wanted:
                    continue
                if side.needs and installed(side.needs) is None:
                    out["skipped"][side.name] = f"{side.needs} is not installed (pip install -e '.[peers]')"
                    progress(f"{side.name}: skipped ({out['skipped'][side.name]})")
                    continue
                out["settings"][side.name] = side.settings
                points: list[dict[str, Any]] = []
                try:
                    for rate in args.echo_rates if side.key == "echo" else args.rates:
                        points.append(sweep.point(side, rate, text))
                        if not points[-1]["kept_up"] and side.key != "echo":
                            break
                    kept = [p["offered_req_s"] for p in points if p["kept_up"]]
                    if side.key == "genserve" and kept and max(kept) / 2 not in [p["offered_req_s"] for p in points]:
                        points.append(sweep.point(side, max(kept) / 2, text) | {"half_of_max": True})
                except RuntimeError as e:
                    lines = str(e).strip().splitlines()
                    out["skipped"][side.name] = "failed: " + (lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}")
                    progress(f"{side.name}: FAILED: {e}")
                finally:
                    sweep.stop()
                    out["points"] += points
        finally:
            sweep.stop()
    return out


# -- summary, targets, report, plot ----------------------------------------------------------------

PEERS = ("LitServe", "LitServe b8", "LitServe b32", "FastAPI")


def num(x: Any) -> float:
    """A figure back from JSON (null: no sample; "inf": unbounded) as a float."""
    if x is None:
        return math.nan
    if x == "inf":
        return math.inf
    return float(x)


def summary(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Per side: the highest rate it kept up with, its best goodput (and where), TTFT p99 at half its maximum rate."""
    by: dict[str, list[dict[str, Any]]] = {}
    for p in out["points"]:
        by.setdefault(p["side"], []).append(p)
    rows = []
    for side, pts in by.items():
        pts = sorted(pts, key=lambda p: p["offered_req_s"])
        kept = [p["offered_req_s"] for p in pts if p["kept_up"]]
        top = max(kept) if kept else math.nan
        best = max(pts, key=lambda p: num(p["goodput_tokens_s"]))
        below = [p for p in pts if not math.isnan(top) and p["offered_req_s"] <= top / 2]
        half = max(below, key=lambda p: p["offered_req_s"]) if below else None
        rows.append({
            "side": side,
            "max_rate": top,
            "best_goodput": num(best["goodput_tokens_s"]),
            "best_goodput_rate": best["offered_req_s"],
            "best_tokens_s": max(num(p["tokens_s"]) for p in pts),
            "half_rate": half["offered_req_s"] if half else math.nan,
            "half_ttft_p99_ms": num(half["ttft_p99_ms"]) if half else math.nan,
        })  # fmt: skip
    return rows


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, float, str, bool | None]]:
    """Issue 35's: genserve's best goodput >= 3x the best peer's; its TTFT p99 at half its maximum rate < 100 ms."""
    by = {r["side"]: r for r in rows}
    gen = by.get("genserve")
    peers = [by[p]["best_goodput"] for p in PEERS if p in by]
    out: list[tuple[str, float, str, bool | None]] = []
    ratio = gen["best_goodput"] / max(peers) if gen and peers and max(peers) > 0 else math.inf if gen and peers else math.nan
    out.append(("genserve best goodput / the best peer's", ratio, ">= 3", None if math.isnan(ratio) else ratio >= 3))
    ttft = gen["half_ttft_p99_ms"] if gen else math.nan
    out.append(("genserve TTFT p99 at half its maximum rate (ms)", ttft, "< 100", None if math.isnan(ttft) else ttft < 100))
    return out


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def f(x: Any) -> str:
    return fmt(num(x))


def point_rows(out: dict[str, Any]) -> list[list[str]]:
    rows = []
    for p in out["points"]:
        rate = f"{p['offered_req_s']:g}" + (" (half)" if p.get("half_of_max") else "") + ("" if p["kept_up"] else " ✗")
        errs = ", ".join(f"{k} {v}" for k, v in p["errors"].items())
        rows.append([
            p["side"], rate, f(p["tokens_s"]), f(p["goodput_tokens_s"]), f(p["ttft_p50_ms"]), f(p["ttft_p99_ms"]),
            f(p["itl_p50_ms"]), f(p["itl_p99_ms"]), f"{p['completed']}/{p['requests']}",
            str(p["failed"]) + (f" ({errs})" if errs else ""), str(p["unfinished"]), f(p["client_lag_p99_ms"]),
            f"{num(p.get('load_avg_1m')):.1f}",
        ])  # fmt: skip
    return rows


HEAD = ("side", "offered req/s", "tokens/s", "goodput tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
        "completed", "failed", "unfinished", "client lag p99 ms", "load avg")  # fmt: skip


def render(out: dict[str, Any], plot: str | None, run_file: str) -> str:
    m, p = out["machine"], out["plan"]
    mix = ", ".join(f"{int(s * 100)}% {t}" for t, s in p["mix"])
    lines = [BEGIN, "## Text under an open loop (bench.text_load)", ""]
    lines.append(
        f"Measured by `python -m bench.text_load{' --quick' if m.get('quick') else ''}` on {m['date']}: {m['cpu_model']}, "
        f"{m['usable_cores']} usable cores, torch threads {m['threads']} on every side, load average "
        f"{m['load_avg_at_start']:.1f} at the start" + (f", {out['total_s']:.0f} s in all" if "total_s" in out else "")
        + f"; figures in `{run_file}`."
    )  # fmt: skip
    lines.append(
        f"Poisson arrivals for {p['duration_s']:g} s a point (then at most {p['drain_s']:g} s to finish), prompts of "
        f"{p['prompt_chars'][0]}-{p['prompt_chars'][1]} characters from tiny shakespeare's validation split, max_tokens "
        f"{mix}, temperature {p['temperature']:g}, a seed per request (schedule seed {p['seed']}). Goodput: tokens/s of "
        f"requests that completed with TTFT <= {p['ttft_slo_ms']:g} ms and their own p99 inter-token gap <= "
        f"{p['itl_slo_ms']:g} ms. Times from the scheduled arrival; the load generator and the server share the cores."
    )
    if m.get("quick"):
        lines.append("**--quick**: short points, for development; noisy.")
    lines.append("")
    rows = summary(out)
    if rows:
        lines += table(
            ["side", "max rate kept up (req/s)", "best goodput tokens/s (at req/s)", "best tokens/s",
             "TTFT p99 ms at half the max (req/s)"],
            [[r["side"], f"{r['max_rate']:g}", f"{fmt(r['best_goodput'])} ({r['best_goodput_rate']:g})", fmt(r["best_tokens_s"]),
              f"{fmt(r['half_ttft_p99_ms'])} ({r['half_rate']:g})"] for r in rows],
        )  # fmt: skip
        lines.append("")
        verdicts = [[n, fmt(v), b, "n/a" if met is None else "met" if met else "MISSED"] for n, v, b, met in targets(rows)]
        lines += ["Targets (issue 35):", "", *table(["figure", "value", "target", ""], verdicts), ""]
    if plot:
        lines += [f"![{plot}]({plot})", ""]
    lines += ["All points (✗: the side did not keep up: > 1% failed or unfinished, or TTFT p50 >= 1 s; its sweep stops there):", ""]
    lines += table(HEAD, point_rows(out))
    lines += [
        "",
        "TTFT p99 `inf`: more than 1% of the requests had no token when the point was cut. ITL: gaps between a request's "
        "tokens, pooled; tokens that arrive in one read are 0 apart (the batching peer answers whole completions: its ITL is 0 "
        "and its TTFT is its whole latency). Unfinished requests are never good; their last gap runs to the cut. client lag: how late the "
        "load generator sent (its connect began after the scheduled arrival; it counts against the side). load avg: the "
        "machine's 1-minute load average after the point (2 cores; other work on the machine shows in both).",
        "",
        "Settings:",
        "",
    ]
    lines += [f"- **{k}**: {v}" for k, v in out["settings"].items()]
    lines += [f"- **{k}**: not measured: {v}" for k, v in out["skipped"].items()]
    vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines += ["", f"Versions: python {m['python']}, {vers}.", END]
    return "\n".join(lines) + "\n"


def splice(report: str, section: str) -> str:
    """``report`` with its bench.text_load section replaced by ``section`` (appended when it has none)."""
    if BEGIN in report and END in report:
        return report[: report.index(BEGIN)] + section.rstrip("\n") + report[report.index(END) + len(END) :]
    return report.rstrip("\n") + "\n\n" + section


def plot(out: dict[str, Any], path: Path) -> bool:
    """Goodput and TTFT p99 against the offered rate, one line per side; False when there is nothing to plot."""
    if not out["points"]:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, list[dict[str, Any]]] = {}
    for p in out["points"]:
        by.setdefault(p["side"], []).append(p)
    ceiling = (out["plan"]["duration_s"] + out["plan"]["drain_s"]) * 1000.0
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for side, pts in by.items():
        pts.sort(key=lambda p: p["offered_req_s"])
        x = [p["offered_req_s"] for p in pts]
        style = {"linestyle": ":" if side == "echo" else "-", "marker": "o", "label": side}
        goodput = [num(p["goodput_tokens_s"]) or math.nan for p in pts]  # none: off the log scale
        (line,) = ax1.plot(x, goodput, **style)
        ttft = [min(num(p["ttft_p99_ms"]), ceiling) for p in pts]
        ax2.plot(x, ttft, **style, color=line.get_color())
        capped = [(xi, ceiling) for xi, p in zip(x, pts, strict=True) if num(p["ttft_p99_ms"]) >= ceiling]
        if capped:
            ax2.scatter(*zip(*capped, strict=True), marker="^", s=60, color=line.get_color())
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="offered requests/s",
        ylabel="goodput tokens/s",
        title="Goodput (TTFT <= 250 ms, p99 ITL <= 100 ms)",
    )
    ax2.set(xscale="log", yscale="log", xlabel="offered requests/s", ylabel="TTFT p99 ms", title="TTFT p99 (▲: unbounded, cut)")
    ax2.axhline(TTFT_SLO_S * 1000, color="#999", linewidth=0.8, linestyle="--")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(
    out: dict[str, Any], json_path: Path | None, plot_path: Path | None, report: Path | None, source: Path | None = None
) -> list[Path]:
    """The run file, the plot and the report's section (each when its path is given); the paths written.
    ``source``: the run file the report names, when it is not ``json_path`` (--from-json)."""
    from bench.serve import plain

    out = plain(out)
    written = []
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(out, indent=2) + "\n")
        written.append(json_path)
    has_plot = plot_path is not None and plot(out, plot_path)
    if has_plot:
        assert plot_path is not None
        written.append(plot_path)
    if report is not None:
        named = source or json_path
        where = str(named.resolve().relative_to(ROOT)) if named is not None and named.resolve().is_relative_to(ROOT) else str(named)
        rel = os.path.relpath(plot_path, report.parent) if has_plot and plot_path is not None else None
        old = report.read_text() if report.exists() else ""
        report.write_text(splice(old, render(out, rel, where)))
        written.append(report)
    return written


def print_table(out: dict[str, Any]) -> None:
    rows = [list(HEAD), *point_rows(plain_out(out))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    for name, value, bound, met in targets(summary(plain_out(out))):
        print(f"{name}: {fmt(value)} (target {bound}): {'n/a' if met is None else 'met' if met else 'MISSED'}")


def plain_out(out: dict[str, Any]) -> dict[str, Any]:
    from bench.serve import plain

    result: dict[str, Any] = plain(out)
    return result


def rates(text: str) -> tuple[float, ...]:
    values = tuple(float(x) for x in text.split(",") if x.strip())
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("rates must be positive numbers, comma-separated")
    return tuple(sorted(values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.text_load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"rates {QUICK_RATES}, 4 s points, 3 s drain; writes nothing unless asked")
    parser.add_argument(
        "--rates", type=rates, default=None, help=f"offered requests/s, comma-separated (default {','.join(f'{r:g}' for r in RATES)})"
    )
    parser.add_argument(
        "--echo-rates", type=rates, default=None, help=f"the echo's (default {','.join(f'{r:g}' for r in ECHO_RATES)}; --quick: --rates)"
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds of arrivals per point (default 20; --quick 4)")
    parser.add_argument("--drain", type=float, default=None, help="seconds more for open requests before the cut (default 10; --quick 3)")
    parser.add_argument("--only", default="", help="comma-separated sides: echo,genserve,litserve,litserve-b8,litserve-b32,fastapi")
    parser.add_argument("--seed", type=int, default=0, help="the schedule's seed (default 0)")
    parser.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1), help="torch threads everywhere")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--json", type=Path, default=None, help=f"the run file (default {RUN_FILE.relative_to(ROOT)}; --quick: none)")
    parser.add_argument("--plot", type=Path, default=None, help=f"the plot (default bench/{PLOT}; --quick: none)")
    parser.add_argument(
        "--report", type=Path, default=None, help="the report whose section this writes (default bench/REPORT.md; --quick: none)"
    )
    parser.add_argument("--from-json", type=Path, default=None, help="write the plot and report from a saved run (no measuring)")
    args = parser.parse_args(argv)
    full = not args.quick
    args.rates = args.rates or (RATES if full else QUICK_RATES)
    args.echo_rates = args.echo_rates or (ECHO_RATES if full else args.rates)
    args.duration = args.duration if args.duration is not None else 20.0 if full else 4.0
    args.drain = args.drain if args.drain is not None else 10.0 if full else 3.0
    if full or args.from_json is not None:
        args.json = args.json or (RUN_FILE if args.from_json is None else None)
        args.plot = args.plot or ROOT / "bench" / PLOT
        args.report = args.report or ROOT / "bench" / "REPORT.md"
    if args.from_json is not None:
        out = json.loads(args.from_json.read_text())
        written = write(out, args.json, args.plot, args.report, source=args.from_json)
    else:
        t0 = time.perf_counter()
        out = run(args)
        out["total_s"] = time.perf_counter() - t0
        written = write(out, args.json, args.plot, args.report)
    print_table(out)
    if written:
        progress("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
