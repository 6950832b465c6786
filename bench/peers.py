"""genserve beside the tools users already know, measured in one run: writes bench/REPORT.md and plots.

    python -m bench.peers [--quick] [--only echo,generate,stream,http,litserve,fastapi,ray] [--skip text,engine]

Serving (one side at a time on the same cores, each serving the bundled VAE decoder to one-image
requests): the bare grpc.aio echo (the ceiling), our Generate and GenerateStream, LitServe,
FastAPI + uvicorn and Ray Serve (bench/peer_apps.py says how each is set up and why it is fair).
One load generator, h2load, for every side but GenerateStream (HTTP/2 + gRPC framing for ours,
``--h1`` and JSON for the HTTP peers); GenerateStream is driven by bench.loadgen's stream client
(one message carries hundreds of requests, so a Python client is not its bottleneck). For every
side: a closed-loop sweep of calls in flight, an open loop at half its best rate, and overload at
twice its best rate (goodput, p99 of the admitted, refusals by status, resident memory).
Statuses: HTTP peers from h2load's per-call log; our gRPC sides from the server's own counters
(bench/accounting.py), since h2load cannot read grpc-status (a trailer).

Text: our server streaming over gRPC against Hugging Face ``generate`` (same weights, same torch
threads) and a nanoGPT-style sampler that recomputes the whole context for every token, at 1, 8
and 32 streams. Engine: the VAE decoder's batches against bare eager PyTorch and ONNX Runtime
(bench/engine.py). Training: the run records in docs/runs/*.json beside the reference recipes.

Peers missing (``pip install -e '.[peers]'``) are skipped and named in the report. Every number
in the report comes from this run, except the training records (read from docs/runs) and the
reference recipes' published figures, which are marked as quoted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import peers_report
from bench.figures import Calls, closed_figures, pct_ms
from bench.h2load import H2Load, Run
from bench.loadgen import MB, Clients, Job
from bench.peer_apps import BATCH, BATCH_TIMEOUT_MS
from bench.serve import Server, http_off, plain, tree_rss_bytes

ROOT = Path(__file__).resolve().parent.parent
PORT_BASE = 52000  # this benchmark's ports: 52000-52099
HTTP_BODY = b'{"seed": 1}'  # what a JSON user sends for one image; one fixed body, as for our Generate
OUR_HTTP_BODY = b'{"model": "vae", "n": 1, "seed": 1}'  # the same request to our OpenAI-compatible edge
OUR_HTTP_PATH = "/v1/images/generations"
HTTP_HEADERS = ("content-type: application/json",)
H1_CONNECTIONS_OPEN = 256  # HTTP/1.1 has one call in flight per connection: the open loop needs many


@dataclass(frozen=True)
class Side:
    """One system under test: how to start it, how to load it, what it needs installed."""

    name: str  # the report's label
    kind: str  # "grpc" (h2load over HTTP/2), "stream" (bench.loadgen's GenerateStream client), "http" (h2load --h1)
    settings: str  # the settings the report states, with why they are fair
    needs: str = ""  # a distribution that must be installed
    peer: str = ""  # bench.peer_apps name (http sides)

    @property
    def process(self) -> str:
        """The server process it runs on: our Generate and GenerateStream (and text) share one; our HTTP edge has its own."""
        if self.name == "genserve HTTP":
            return "genserve-http"
        return self.peer or ("echo" if self.name == "echo" else "genserve")


def sides(threads: int) -> list[Side]:
    from server.config import ServerConfig

    t, c = f"torch threads {threads}", ServerConfig()  # our server runs on its defaults: the settings said are those
    return [
        Side("echo", "grpc", "bench.echo: answers every call at once, no model (the ceiling of grpc.aio here)"),
        Side(
            "genserve Generate", "grpc",
            f"python -m server defaults: batch_size {c.batch_size}, batch_timeout {c.batch_timeout_ms:g} ms, {t}, admission by "
            f"queueing delay (target {c.admission_target_ms:g} ms, interval {c.admission_interval_ms:g} ms); one process",
        ),
        Side("genserve GenerateStream", "stream", "the same server; a stream client keeps the window in flight within its credit"),
        Side(
            "genserve HTTP", "http",
            f"the same defaults; POST {OUR_HTTP_PATH} (OpenAI's shape, a PNG as b64_json), uvicorn + httptools in the "
            "server's own event loop; JSON",
        ),
        Side(
            "LitServe", "http",
            f"max_batch_size {BATCH}, batch_timeout {BATCH_TIMEOUT_MS:g} ms, fast_queue (zmq), 1 worker, 1 API server, {t}; JSON",
            needs="litserve", peer="litserve",
        ),
        Side(
            "FastAPI", "http", f"uvicorn (uvloop, httptools), 1 process, async route + run_in_threadpool, no batching, {t}; JSON",
            needs="fastapi", peer="fastapi",
        ),
        Side(
            "Ray Serve", "http",
            f"@serve.batch(max_batch_size {BATCH}, batch_wait_timeout_s {BATCH_TIMEOUT_MS / 1000:g}), 1 replica, "
            f"max_ongoing_requests {2 * BATCH}, {t}; JSON",
            needs="ray", peer="ray",
        ),
    ]  # fmt: skip


def installed(dist: str) -> str | None:
    """The installed version of ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- processes ------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Ray and LitServe start helpers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def stop_tree(server: Server, grace_s: float = 15.0) -> None:
    """SIGTERM the server (its own shutdown), then SIGKILL whatever it started and left behind."""
    below = descendants(server.pid) if server.proc is not None else []
    server.stop(grace_s)
    for p in below:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


def wait_http(port: int, server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        server.check_alive()
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2.0) as r:
            if r.status == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{server.name} not serving on {port} after {timeout_s:.0f} s; its log ends:\n{server.tail()}")


# -- figures of one h2load run (pure: tests feed them fake runs) ----------------------------------


def admitted_pct_ms(durations: np.ndarray, admitted: int, q: float) -> float:
    """The q-th percentile of the admitted calls' latency, taking them to be the slowest ``admitted``
    answers. Exact when nothing was refused; otherwise it holds while every refusal came back faster
    than the admitted calls it is ranked below (refusals are turned away at admission, in about a ms)."""
    if admitted <= 0 or durations.size == 0:
        return math.nan
    slowest = np.sort(durations)[-min(admitted, durations.size) :]
    return pct_ms(slowest, q)


def h2load_figures(run: Run, by_status: dict[str, int] | None, offered: float | None = None) -> dict[str, Any]:
    """Goodput, latency of the admitted and refusals of one h2load run.

    ``by_status``: the side's own count of statuses (gRPC sides, from their metrics), or None for
    HTTP sides, whose per-call HTTP statuses h2load logged. A refusal is RESOURCE_EXHAUSTED (gRPC)
    or 429/503 (HTTP); everything else that is not OK is listed by status."""
    wall = max(run.wall_s, 1e-9)
    if by_status is None:
        codes = run.statuses
        ok = codes == 200
        refused_mask = np.isin(codes, (429, 503))
        values, counts = np.unique(codes[~ok], return_counts=True)
        statuses = {f"HTTP {int(v)}": int(c) for v, c in zip(values, counts, strict=True)}
        n_ok, refused = int(ok.sum()), int(refused_mask.sum())
        lat = run.durations[ok] if run.durations.size == codes.size else run.durations
        p50, p99 = pct_ms(lat, 50), pct_ms(lat, 99)
        exact = True
    else:
        n_ok, refused = by_status.get("OK", 0), by_status.get("RESOURCE_EXHAUSTED", 0)
        statuses = {k: v for k, v in by_status.items() if k != "OK" and v}
        admitted = max(0, run.done - refused)
        p50 = pct_ms(run.durations, 50) if refused == 0 else math.nan
        p99 = admitted_pct_ms(run.durations, admitted, 99)
        exact = refused == 0
    cut = run.started - run.done
    if by_status is not None and statuses.get("CANCELLED"):  # the cut calls the side had picked up: the same calls
        statuses["CANCELLED"] -= min(cut, statuses["CANCELLED"])
        statuses = {k: v for k, v in statuses.items() if v}
    if cut and offered is not None:  # closed loop: the calls in flight when h2load stopped, by design
        statuses["unanswered at the end"] = cut
    return {
        "offered_req_s": offered,
        "sent_req_s": run.started / wall,
        "req_s": n_ok / wall,
        "p50_ms": p50,
        "p99_ms": p99,
        "p99_exact": exact,
        "refused": refused,
        "not_ok": statuses,
        "calls": run.started,
    }


def open_load(side: Side, rate: float) -> dict[str, Any]:
    """h2load's connections for an open loop at ``rate``: 4 HTTP/2 connections, or for HTTP/1.1 (one call in
    flight per connection) up to H1_CONNECTIONS_OPEN, each sending at least 2 calls/s (h2load's --rps is per
    connection, in whole tenths)."""
    if side.kind == "grpc":
        return {"connections": 4, "streams": 100_000}
    return {"connections": max(1, min(H1_CONNECTIONS_OPEN, int(rate / 2)))}


# -- one side -------------------------------------------------------------------------------------


@dataclass
class Plan:
    in_flight: tuple[int, ...]  # closed loop: calls in flight
    stream_windows: tuple[int, ...]  # GenerateStream: requests in flight
    open_fractions: tuple[float, ...]  # open loop: fractions of the best closed-loop rate
    warm_s: float
    dur_s: float
    overload_s: float
    text_streams: tuple[int, ...]
    text_tokens: int
    engine_rounds: int


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Runner:
    """Starts each side in turn on the same cores, loads it, stops it."""

    def __init__(self, plan: Plan, threads: int, models_dir: Path, logs: Path) -> None:
        self.plan, self.threads, self.models_dir, self.logs = plan, threads, models_dir, logs
        self.ports = iter(range(PORT_BASE, PORT_BASE + 100))
        self.clients: Clients | None = None
        self.current: tuple[str, Server, int, float] | None = None  # process key, server, metrics port, idle RSS MB

    def acquire(self, side: Side) -> tuple[Server, int, float]:
        """The server ``side`` runs on, started (and the previous one stopped) unless it is already up."""
        if self.current is not None and self.current[0] == side.process:
            return self.current[1:]
        self.release()
        for attempt in (1, 2):
            server, metrics = self.start(side)
            try:
                t0 = time.monotonic()
                self.ready(side, server)
                break
            except BaseException as e:
                stop_tree(server)
                server.log.close()
                # Our range lies inside Linux's ephemeral ports: a client socket (Ray opens hundreds) can hold one for a moment.
                if attempt == 2 or "bind" not in str(e).lower():
                    raise
                progress(f"{side.process}: its port was taken ({str(e).splitlines()[-1][:100]}); once more on the next one")
        progress(f"{side.process}: serving after {time.monotonic() - t0:.1f} s")
        self.current = (side.process, server, metrics, tree_rss_bytes(server.pid) / MB)
        return self.current[1:]

    def release(self) -> None:
        if self.current is not None:
            _, server, _, _ = self.current
            self.current = None
            stop_tree(server)
            server.log.close()

    def start(self, side: Side) -> tuple[Server, int]:
        port, metrics = next(self.ports), next(self.ports)
        py = sys.executable
        if side.process == "genserve-http":  # h2load talks to its HTTP port; the gRPC one is elsewhere
            cmd = [py, "-m", "server", "--http-port", str(port), "--port", str(next(self.ports)), "--metrics-port", str(metrics)]
            cmd += ["--models-dir", str(self.models_dir), "--log-level", "warning", "--threads", str(self.threads)]
        elif side.kind == "http":
            cmd = [py, "-m", "bench.peer_apps", side.peer, "--port", str(port), "--threads", str(self.threads)]
            cmd += ["--models-dir", str(self.models_dir)]
            metrics = 0
        elif side.name == "echo":
            cmd, metrics = [py, "-m", "bench.echo", "--port", str(port)], 0
        else:
            cmd = [
                py,
                "-m",
                "server",
                "--port",
                str(port),
                "--metrics-port",
                str(metrics),
                *http_off(),
                "--models-dir",
                str(self.models_dir),
            ]
            cmd += ["--log-level", "warning", "--threads", str(self.threads)]
        log = open(self.logs / f"{side.name.replace(' ', '_')}.log", "wb")  # noqa: SIM115 (closed by stop)
        server = Server(side.name, cmd, port, log)
        server.start()
        return server, metrics

    def ready(self, side: Side, server: Server) -> None:
        if side.kind == "http":
            wait_http(server.port, server, 180.0)
            return
        assert self.clients is not None
        [r] = self.clients.run([Job("ready", server.port, timeout_s=120.0)], [server])
        if "error" in r:
            raise RuntimeError(f"{side.name}: {r['error']}")

    def h2load(self, side: Side) -> H2Load:
        if side.process == "genserve-http":
            return H2Load(http_body=OUR_HTTP_BODY, path=OUR_HTTP_PATH, headers=HTTP_HEADERS, h1=True)
        if side.kind == "http":
            return H2Load(http_body=HTTP_BODY, path="/predict", headers=HTTP_HEADERS, h1=True)
        return H2Load()

    def h2_point(self, side: Side, h2: H2Load, server: Server, metrics: int, offered: float | None = None, **load: Any) -> dict[str, Any]:
        """One h2load run (warm-up first when closed loop), statuses counted by the side where h2load cannot."""
        from bench.accounting import settled, statuses

        before = settled(metrics) if metrics else None
        r = h2.run(server.port, timeout_s=120.0, **load)
        by_status: dict[str, int] | None = None
        if side.kind == "grpc":
            if before is not None:
                delta = statuses(settled(metrics))
                delta.subtract(statuses(before))
                by_status = {k: v for k, v in delta.items() if v}
            else:  # the echo answers every call OK
                by_status = {"OK": r.done}
        return h2load_figures(r, by_status, offered)

    def serve_side(self, side: Side, out: list[dict[str, Any]]) -> None:
        server, metrics, rss_idle = self.acquire(side)
        rows = self.stream_points(side, server) if side.kind == "stream" else self.h2_points(side, server, metrics)
        out += [{"side": side.name, "rss_idle_mb": rss_idle} | r for r in rows]

    def stream_points(self, side: Side, server: Server) -> list[dict[str, Any]]:
        """GenerateStream, closed loop: each window of requests in flight (the credit bounds what a client may send,
        so there is no overload point: a client cannot offer more than the server grants)."""
        assert self.clients is not None
        p, rows = self.plan, []
        for w in p.stream_windows:
            job = Job("stream", server.port, time.monotonic() + 0.5, p.warm_s, p.dur_s, window=w, drain_s=3.0)
            f = closed_figures(Calls.merge(self.clients.run([job], [server])), job)
            not_ok = {k: v for k, v in f["not_ok"].items() if k != "UNFINISHED"}  # in flight when the window closed
            rows.append({"mode": "closed", "in_flight": w, "req_s": f["req_s"], "p50_ms": f["p50_ms"], "p99_ms": f["p99_ms"]})
            rows[-1] |= {"not_ok": not_ok, "p99_exact": True, "refused": not_ok.get("RESOURCE_EXHAUSTED", 0)}
            progress(f"{side.name}: window {w}: {f['req_s']:,.0f} req/s, p99 {f['p99_ms']:.1f} ms")
        return rows

    def h2_points(self, side: Side, server: Server, metrics: int) -> list[dict[str, Any]]:
        """h2load: the closed-loop sweep, the open loop at fractions of the best rate, then overload at twice the best."""
        p, rows = self.plan, []
        h2 = self.h2load(side)
        try:
            for c in p.in_flight:
                load = {"streams": c, "connections": 1} if side.kind == "grpc" else {"connections": c}
                h2.run(server.port, timeout_s=120.0, duration_s=p.warm_s, **load)
                f = self.h2_point(side, h2, server, metrics, duration_s=p.dur_s, **load)
                rows.append({"mode": "closed", "in_flight": c, **f})
                progress(f"{side.name}: {c} in flight: {f['req_s']:,.0f} req/s, p99 {f['p99_ms']:.1f} ms")
            best = max(r["req_s"] for r in rows)
            for frac in p.open_fractions:
                rate = max(1.0, frac * best)
                f = self.h2_point(side, h2, server, metrics, offered=rate, duration_s=p.dur_s, rps=rate, **open_load(side, rate))
                rows.append({"mode": "open", "fraction": frac, **f})
                progress(f"{side.name}: open loop at {rate:,.0f}/s: goodput {f['req_s']:,.0f}/s, p99 {f['p99_ms']:.1f} ms")
            best = max(r["req_s"] for r in rows)  # the most it sustained, closed or open
            o = self.overload(side, h2, server, metrics, 2 * best, open_load(side, 2 * best))
            rows.append(o)
            progress(
                f"{side.name}: overload at {2 * best:,.0f}/s: goodput {o['req_s']:,.0f}/s, p99 of admitted "
                f"{o['p99_ms']:.0f} ms, refused {o['refused']}, RSS peak {o['rss_peak_mb']:.0f} MB"
            )
        finally:
            h2.close()
        return rows

    def overload(self, side: Side, h2: H2Load, server: Server, metrics: int, rate: float, load: dict[str, Any]) -> dict[str, Any]:
        """Twice the best rate for overload_s; the side's resident memory sampled while it runs."""
        before = tree_rss_bytes(server.pid)
        samples: list[int] = []
        done = False

        def sample() -> None:
            while not done:
                samples.append(tree_rss_bytes(server.pid))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            f = self.h2_point(side, h2, server, metrics, offered=rate, duration_s=self.plan.overload_s, rps=rate, **load)
        finally:
            done = True
            sampler.join()
        peak = max(samples or [before])
        return {"mode": "overload", **f, "rss_before_mb": before / MB, "rss_peak_mb": peak / MB, "rss_growth_mb": (peak - before) / MB}


# -- text: our streaming beside HF generate and a recompute-everything sampler ---------------------


def nanogpt_run(model: Any, ids: Any, new_tokens: int, seed: int) -> tuple[int, float, float]:
    """nanoGPT's ``generate``: the whole (cropped) context through the model for every new token, no cache.
    (tokens, wall seconds, seconds to the first token)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    block = model.config.block_size
    t0 = time.perf_counter()
    first = 0.0
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = model(ids[:, -block:])[:, -1, :]  # (B, vocab)
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)  # (B, 1)
            ids = torch.cat([ids, nxt], dim=1)
            first = first or time.perf_counter() - t0
    return ids.shape[0] * new_tokens, time.perf_counter() - t0, first


def text_section(plan: Plan, threads: int, models_dir: Path, server_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """HF generate and the nanoGPT-style sampler in this process, beside the server rows measured while it ran."""
    import torch

    from bench.engine import hf_run, prompts
    from bench.interop import to_hf_gpt2
    from engine.modelfile import load_model

    torch.set_num_threads(threads)
    loaded = load_model(models_dir / "transformer.safetensors")
    model = loaded.module.eval()
    vocab = loaded.vocab or ""
    hf = to_hf_gpt2(model)  # type: ignore[arg-type]  # a CharTransformer: the file says so
    rows = list(server_rows)
    for n in plan.text_streams:
        texts = prompts(vocab, n)
        ids = torch.tensor([[vocab.index(ch) for ch in t] for t in texts], dtype=torch.long)  # (n, 16)
        hf_run(hf, ids, 2, 0, torch.device("cpu"))  # warm-up
        _, ttft_s = hf_run(hf, ids, 1, 1, torch.device("cpu"))
        tokens, wall = hf_run(hf, ids, plan.text_tokens, 2, torch.device("cpu"))
        rows.append({"system": "HF generate", "streams": n, "tokens_s": tokens / wall, "ttft_ms": ttft_s * 1000.0})
        progress(f"text: HF generate, {n} streams: {tokens / wall:,.0f} tokens/s")
        tokens, wall, first = nanogpt_run(model, ids, plan.text_tokens, 3)
        rows.append({"system": "nanoGPT-style (no cache)", "streams": n, "tokens_s": tokens / wall, "ttft_ms": first * 1000.0})
        progress(f"text: nanoGPT-style, {n} streams: {tokens / wall:,.0f} tokens/s")
    return rows


def server_text(runner: Runner) -> list[dict[str, Any]]:
    """Our server streaming text over gRPC (bench.loadgen's text client), ``streams`` calls at once."""
    from bench.figures import text_figures

    p = runner.plan
    server, _, _ = runner.acquire(Side("genserve", "grpc", ""))
    rows = []
    assert runner.clients is not None
    for n in p.text_streams:
        job = Job("text", server.port, time.monotonic() + 0.5, p.warm_s, max(p.dur_s, 2.0), concurrency=n, max_tokens=p.text_tokens)
        f = text_figures(Calls.merge(runner.clients.run([job], [server])), job)
        rows.append({"system": "genserve streaming (gRPC)", "streams": n, "tokens_s": f["tokens_s"], "ttft_ms": f["ttft_p50_ms"]})
        progress(f"text: genserve, {n} streams: {f['tokens_s']:,.0f} tokens/s, TTFT p50 {f['ttft_p50_ms']:.1f} ms")
    return rows


# -- engine and training ---------------------------------------------------------------------------


def engine_section(plan: Plan, threads: int) -> list[dict[str, Any]]:
    """bench.engine's image figures for the VAE decoder: ours, bare eager PyTorch, ONNX Runtime."""
    import torch

    from bench.engine import image_bench

    torch.set_num_threads(threads)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-peers-onnx-") as tmp:
        image_bench("vae", torch.device("cpu"), plan.engine_rounds, 0.02, Path(tmp), random.Random(0), out)
    return [dict(r) for r in out["vae"]]


REFERENCES = {  # the reference recipes' figures: quoted (from docs/training.md's bench.vae_baseline run, nanoGPT's README)
    "vae": (
        "pytorch/examples VAE (ReLU, Adam 1e-3, batch 128), 100 epochs; docs/training.md, bench.vae_baseline on 2 cores",
        "held-out -ELBO 109.86 (ours 104.20, same judge)",
    ),
    "char-transformer": (
        "nanoGPT shakespeare_char on a CPU (4 layers, 4 heads, 128 wide, context 64); its README, its own split",
        "val 1.88 after ~3 min",
    ),
}
QUALITY = {  # the record's figure that says how good the model is, and its name
    "vae": ("best_val_loss", "-ELBO nats (val)"),
    "char-transformer": ("best_val_loss", "nats/char (val)"),
    "wgan-gp": ("best_val_loss", "critic loss (val)"),
    "mnist-classifier": ("val_accuracy", "accuracy (val)"),
}


def training_section(runs_dir: Path) -> list[dict[str, Any]]:
    """One row per docs/runs/*_metrics.json: seconds per epoch, the best validation figure, the reference beside it."""
    rows = []
    for path in sorted(runs_dir.glob("*_metrics.json")):
        d = json.loads(path.read_text())
        hist = d.get("history") or []
        secs = [h["seconds"] for h in hist if isinstance(h.get("seconds"), (int, float))]
        kind = d.get("kind", path.stem.removesuffix("_metrics"))
        ref, ref_figure = REFERENCES.get(kind, ("-", "-"))
        key, label = QUALITY.get(kind, ("best_val_loss", "val loss"))
        value = d.get(key, hist[-1].get(key) if hist else None)
        rows.append({
            "model": kind,
            "epochs": d.get("epochs_run"),
            "s_per_epoch": float(np.median(secs)) if secs else math.nan,
            "train_s": d.get("train_seconds"),
            "quality": value,
            "quality_name": label,
            "best_epoch": d.get("best_epoch"),
            "record": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
            "reference": ref,
            "reference_figure": ref_figure,
        })  # fmt: skip
    return rows


# -- the run --------------------------------------------------------------------------------------


def machine(threads: int, quick: bool) -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    dists = ["torch", "grpcio", "transformers", "onnxruntime", "litserve", "fastapi", "uvicorn", "ray", "numpy"]
    h2 = shutil.which("h2load")
    h2v = subprocess.run([h2, "--version"], capture_output=True, text=True).stdout.strip() if h2 else None
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "versions": {d: installed(d) for d in dists} | {"h2load": h2v},
        "threads": threads,
        "quick": quick,
        "load_avg_at_start": os.getloadavg()[0],
    }


def plan_for(quick: bool) -> Plan:
    if quick:
        return Plan((1, 64), (512,), (0.5,), 0.5, 1.5, 3.0, (1, 8, 32), 16, 2)
    return Plan((1, 16, 64, 256), (64, 512, 2048), (0.5, 0.8), 1.0, 4.0, 10.0, (1, 8, 32), 64, 5)


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = plan_for(args.quick)
    threads = args.threads
    out: dict[str, Any] = {"machine": machine(threads, args.quick), "plan": plan.__dict__, "settings": {}, "skipped": {}}
    out |= {"serving": [], "text": [], "engine": [], "training": []}
    m = out["machine"]
    progress(f"{m['cpu_model']}, {m['usable_cores']} cores, {threads} torch threads, load average {m['load_avg_at_start']:.1f}")
    wanted = set(args.only.split(",")) if args.only else None
    keys = {"echo": "echo", "genserve Generate": "generate", "genserve GenerateStream": "stream", "genserve HTTP": "http"}
    keys |= {"LitServe": "litserve", "FastAPI": "fastapi", "Ray Serve": "ray"}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as logs:
        runner = Runner(plan, threads, args.models_dir, Path(logs))
        runner.clients = Clients(1)
        server_text_rows: list[dict[str, Any]] = []
        try:
            for side in sides(threads):
                if side.process != "genserve" and runner.current is not None and runner.current[0] == "genserve":
                    if "text" not in args.skip:  # while our server is up
                        server_text_rows = server_text(runner)
                    runner.release()
                if wanted is not None and keys[side.name] not in wanted:
                    continue
                if side.needs and installed(side.needs) is None:
                    out["skipped"][side.name] = f"{side.needs} is not installed (pip install -e '.[peers]')"
                    progress(f"{side.name}: skipped ({out['skipped'][side.name]})")
                    continue
                out["settings"][side.name] = side.settings
                try:
                    runner.serve_side(side, out["serving"])
                except RuntimeError as e:
                    lines = str(e).strip().splitlines()
                    out["settings"].pop(side.name)
                    out["skipped"][side.name] = "failed: " + (lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}")
                    progress(f"{side.name}: FAILED: {e}")
            if "text" not in args.skip:
                if not server_text_rows:
                    server_text_rows = server_text(runner)
                runner.release()
                out["text"] = text_section(plan, threads, args.models_dir, server_text_rows)
        finally:
            runner.release()
            runner.clients.close()
    if "engine" not in args.skip:
        progress("engine: VAE decoder batches, ours vs bare PyTorch vs ONNX Runtime")
        out["engine"] = engine_section(plan, threads)
    out["training"] = training_section(ROOT / "docs" / "runs")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short points (a couple of minutes; Ray's start is most of it)")
    parser.add_argument("--only", default="", help="comma-separated sides: echo,generate,stream,http,litserve,fastapi,ray")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out: text,engine")
    parser.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1), help="torch threads everywhere")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "REPORT.md", help="the report; its plots go beside it")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    parser.add_argument("--from-json", type=Path, default=None, help="write the report from a saved --json run (no measuring)")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        out = json.loads(args.from_json.read_text())
    else:
        if shutil.which("h2load") is None:
            parser.error("h2load not found: run scripts/bench_setup.sh or apt-get install -y nghttp2-client")
        t0 = time.perf_counter()
        signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(SystemExit(128 + s)))
        out = run(args)
        out["total_s"] = time.perf_counter() - t0
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(plain(out), indent=2) + "\n")
    written = peers_report.write(out, args.out)
    progress("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
