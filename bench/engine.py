"""Engine benchmark: image batches and Transformer decoding, each beside its peers, in one run.

    python -m bench.engine [--quick] [--threads N] [--device cpu|cuda] [--json FILE]

Images (VAE decoder, conditional WGAN-GP generator), batch 1, 10, 100, 1000, on the same latents:
  engine   ``ImageGenerator.run([chunk])``: one request of n = batch, prepared outside the timed
           region (as the server's processor stage does); ``prep+run`` times ``prepare`` too.
  bare     the model's own forward (``decode(z)`` / ``generator(z, labels)``) under inference_mode:
           float output only, no uint8 conversion.
  ort      ONNX Runtime, CPUExecutionProvider, intra-op threads = torch's, on the same weights
           exported by ``torch.onnx.export`` with a dynamic batch axis (outputs checked to 1e-4).
Contenders are timed in rounds (their order shuffled every round) so that machine noise hits all
of them alike; each figure is the median over rounds of the mean over a few calls.

Transformer (bundled, block_size 128): prompts of 16 characters, 100 new tokens each (16 + 100 <= 128,
so Hugging Face's learned positions suffice), temperature 1, top_k 0, distinct seeds.
  ours     ``DecodeBatch``: every sequence added before the first step; tokens counted from events.
  hf       transformers ``GPT2LMHeadModel.generate`` (KV cache, do_sample) on the same weights
           (``bench.interop.to_hf_gpt2``), equal-length prompts, batch 1, 8, 32 (64 with --full-hf).
Per-token latency = wall time / new tokens for one stream (prefill included, both sides); time to
first token = one sequence on an idle loop until its first token (HF: generate with 1 new token).

Iterative (flow, when models/flow.safetensors is there): one step of the step batch with 1, 8, 16,
32 and 64 active samples (requests of one sample, at their defaults), against the module's own
``step`` on the same rows in one call (no tiles, no bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from bench.interop import to_hf_gpt2
from engine.decode import DecodeBatch, SequenceRequest
from engine.images import ImageChunk, ImageGenerator, ImageRequest, ImageResult
from engine.limits import ImageLimits
from engine.modelfile import LoadedModel, load_model
from engine.sampling import SamplingParams

MODELS = Path(__file__).resolve().parent.parent / "models"
IMAGE_BATCHES = (1, 10, 100, 1000)
PROMPT_CHARS = 16
NEW_TOKENS = 100
SETTLE_S = 0.005  # pause between contenders (torch's OpenMP threads spin briefly after a parallel region)
TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n"
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- timing -------------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    fn: Callable[[], object]
    inner: int = 1  # calls per measurement
    samples: list[float] = field(default_factory=list)  # seconds per call, one per round

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def calibrate(fn: Callable[[], object], target_s: float, device: torch.device) -> int:
    """Calls per measurement so that one measurement takes about ``target_s``."""
    fn()  # warm-up (allocator, ORT arena, lazy init)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    dt = time.perf_counter() - t0
    return max(1, min(1000, round(target_s / max(dt, 1e-7))))


def measure_rounds(contenders: Sequence[Contender], rounds: int, device: torch.device, rng: random.Random) -> None:
    """Alternate the contenders: each round times every contender once, in a shuffled order."""
    order = list(contenders)
    for _ in range(rounds):
        rng.shuffle(order)
        for c in order:
            time.sleep(SETTLE_S)  # let the previous contender's worker threads stop spinning
            sync(device)
            t0 = time.perf_counter()
            for _ in range(c.inner):
                c.fn()
            sync(device)
            c.samples.append((time.perf_counter() - t0) / c.inner)


# -- images -------------------------------------------------------------------------------------


class _Conditional(torch.nn.Module):
    """What ONNX sees for a conditional model: (z, labels int64) -> images."""

    def __init__(self, forward: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fwd = forward

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.fwd(z, labels)


class _Unconditional(torch.nn.Module):
    """What ONNX sees for an unconditional model: z -> images."""

    def __init__(self, forward: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fwd = forward

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fwd(z)


def served_forward(loaded: LoadedModel) -> Callable[..., torch.Tensor]:
    """What the engine serves: a one-shot module's forward (the VAE's decoder, the generator itself)."""
    return cast(Callable[..., torch.Tensor], loaded.module)


def export_onnx(loaded: LoadedModel, gen: ImageGenerator, path: Path) -> Any:
    """Export the served forward with a dynamic batch axis; an ORT session on it."""
    import onnxruntime as ort  # type: ignore[import-untyped,unused-ignore]

    cpu_forward = served_forward(loaded)
    wrapper = (_Conditional(cpu_forward) if gen.conditional else _Unconditional(cpu_forward)).eval()
    z = torch.randn(4, gen.latent_dim)
    args: tuple[torch.Tensor, ...] = (z, torch.arange(4) % max(gen.num_classes, 1)) if gen.conditional else (z,)
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes: dict[str, Any] = {"z": {0: batch}}
    if gen.conditional:
        shapes["labels"] = {0: batch}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=["z", "labels"] if gen.conditional else ["z"],
            output_names=["x"],
            dynamic_shapes=shapes,
            dynamo=True,
            verbose=False,
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's pool otherwise spins after each run, and on 2 cores that steals the next contender's CPU
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def image_bench(
    name: str, device: torch.device, rounds: int, target_s: float, tmp: Path, rng: random.Random, out: dict[str, Any]
) -> list[str]:
    loaded = load_model(MODELS / f"{name}.safetensors", device=device)
    cpu_loaded = loaded if device.type == "cpu" else load_model(MODELS / f"{name}.safetensors")
    gen = ImageGenerator(loaded, ImageLimits(max_n=max(IMAGE_BATCHES), max_batch=max(IMAGE_BATCHES)))
    forward = served_forward(loaded)
    session = export_onnx(cpu_loaded, ImageGenerator(cpu_loaded), tmp / f"{name}.onnx")
    lines = [
        f"{name} ({loaded.kind}, latent {gen.latent_dim}{f', conditional on {gen.num_classes} labels' if gen.conditional else ''})",
    ]
    header = (
        f"{'batch':>6} {'engine ms':>10} {'prep+run':>10} {'bare ms':>10} {'ort ms':>10} "
        f"{'eng/bare':>9} {'overhead':>9} {'eng/ort':>8} {'eng smp/s':>11} {'bare smp/s':>11} {'ort smp/s':>11} {'max|d| ort':>11}"
    )
    lines += [header, "-" * len(header)]
    rows: list[dict[str, Any]] = []
    for b in IMAGE_BATCHES:
        request = ImageRequest(n=b, seed=1234 + b)
        chunk: ImageChunk = gen.prepare(request)
        assert chunk.z is not None  # prepare draws by default
        z_dev = chunk.z.to(device)
        labels_dev = None if chunk.labels is None else chunk.labels.to(device)
        feeds: dict[str, np.ndarray] = {"z": chunk.z.numpy()}
        if chunk.labels is not None:
            feeds["labels"] = chunk.labels.contiguous().numpy()

        def bare(z: torch.Tensor = z_dev, labels: torch.Tensor | None = labels_dev) -> torch.Tensor:
            with torch.inference_mode():
                return forward(z, labels)

        with torch.inference_mode():
            ref = served_forward(cpu_loaded)(chunk.z, chunk.labels)
        got = session.run(None, feeds)[0]
        max_diff = float(np.abs(got - ref.numpy()).max())
        if max_diff > 1e-4:
            print(f"WARNING: {name} batch {b}: ONNX Runtime differs from torch by {max_diff:.2e} (> 1e-4)")

        def prep_run(r: ImageRequest = request) -> list[ImageResult]:
            return gen.run([gen.prepare(r)])

        contenders = [Contender("engine", partial(gen.run, [chunk])), Contender("prep+run", prep_run), Contender("bare", bare)]
        if device.type == "cpu":  # ORT runs the CPU export; beside a GPU it would compare unlike with unlike
            contenders.append(Contender("ort", partial(session.run, None, feeds)))
        for c in contenders:
            c.inner = calibrate(c.fn, target_s, device)
        measure_rounds(contenders, rounds, device, rng)
        ms = {c.name: c.median * 1e3 for c in contenders}
        eng, bare_ms, ort_ms = ms["engine"], ms["bare"], ms.get("ort", float("nan"))
        row = {
            "batch": b,
            "engine_ms": eng,
            "prep_run_ms": ms["prep+run"],
            "bare_ms": bare_ms,
            "ort_ms": ort_ms,
            "engine_over_bare": eng / bare_ms,
            "engine_over_ort": eng / ort_ms,
            "ort_max_abs_diff": max_diff,
        }
        rows.append(row)
        lines.append(
            f"{b:>6} {eng:>10.3f} {ms['prep+run']:>10.3f} {bare_ms:>10.3f} {ort_ms:>10.3f} "
            f"{eng / bare_ms:>9.3f} {(eng / bare_ms - 1) * 100:>8.1f}% {eng / ort_ms:>8.3f} "
            f"{b / eng * 1e3:>11.0f} {b / bare_ms * 1e3:>11.0f} {b / ort_ms * 1e3:>11.0f} {max_diff:>11.1e}"
        )
    out[name] = rows
    r100 = next(r for r in rows if r["batch"] == 100)
    big = [r for r in rows if r["batch"] >= 10]
    worst = max(big, key=lambda r: r["engine_over_ort"])
    lines.append(
        f"targets: overhead at batch 100 {(r100['engine_over_bare'] - 1) * 100:+.1f}% (<= 10%: "
        f"{'met' if r100['engine_over_bare'] <= 1.10 else 'MISSED'}); engine/ORT at batch >= 10 worst "
        f"{worst['engine_over_ort']:.3f}x at batch {worst['batch']} (<= 1.2x: {'met' if worst['engine_over_ort'] <= 1.2 else 'MISSED'})"
    )
    return lines


# -- Transformer --------------------------------------------------------------------------------


def prompts(vocab: str, count: int) -> list[str]:
    """``count`` distinct prompts of PROMPT_CHARS characters, all inside the vocabulary."""
    text = "".join(ch for ch in TEXT if ch in vocab)
    return [(text * 2)[(7 * i) % len(text) :][:PROMPT_CHARS] for i in range(count)]


def ours_run(loop: DecodeBatch, texts: Sequence[str], new_tokens: int, seed0: int) -> tuple[int, float, list[float]]:
    """(tokens generated, wall seconds, seconds per step) for ``texts`` decoded together."""
    for i, p in enumerate(texts):
        loop.add(SequenceRequest(p, SamplingParams(temperature=1.0, top_k=0, seed=seed0 + i, max_new_tokens=new_tokens)))
    tokens = 0
    steps: list[float] = []
    t0 = time.perf_counter()
    while loop.has_work:
        s0 = time.perf_counter()
        events = loop.step()
        steps.append(time.perf_counter() - s0)
        tokens += sum(1 for e in events if e.token_id is not None)
    return tokens, time.perf_counter() - t0, steps


def ours_ttft(loop: DecodeBatch, text: str, seed: int) -> float:
    t0 = time.perf_counter()
    handle = loop.add(SequenceRequest(text, SamplingParams(temperature=1.0, top_k=0, seed=seed, max_new_tokens=NEW_TOKENS)))
    while True:
        events = loop.step()
        if any(e.handle.id == handle.id and e.token_id is not None for e in events):
            dt = time.perf_counter() - t0
            break
    loop.cancel(handle)
    loop.run_until_idle()
    return dt


def hf_run(hf: Any, ids: torch.Tensor, new_tokens: int, seed: int, device: torch.device) -> tuple[int, float]:
    torch.manual_seed(seed)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=0,
            use_cache=True,
        )
    sync(device)
    return int(out.shape[0] * (out.shape[1] - ids.shape[1])), time.perf_counter() - t0


def text_bench(
    device: torch.device, rounds: int, new_tokens: int, hf_batches: Sequence[int], rng: random.Random, out: dict[str, Any]
) -> list[str]:
    import transformers

    transformers.logging.set_verbosity_error()
    loaded = load_model(MODELS / "transformer.safetensors", device=device)
    assert loaded.vocab is not None
    vocab = loaded.vocab
    hf = to_hf_gpt2(loaded.module).to(device)  # type: ignore[arg-type]
    hf.generation_config.eos_token_id = None  # no end-of-text token in a character vocabulary
    ours_batches = (1, 8, 32, 64)
    loop = DecodeBatch.from_loaded(loaded, max_batch=max(ours_batches), max_pending=0)
    texts = prompts(vocab, max(ours_batches))
    stoi = {c: i for i, c in enumerate(vocab)}

    # warm-up both (first calls pay lazy initialisation)
    ours_run(loop, texts[:8], 8, 0)
    hf_run(hf, torch.tensor([[stoi[c] for c in texts[0]]], device=device), 8, 0, device)

    ours_res: dict[int, list[tuple[int, float]]] = {b: [] for b in ours_batches}
    hf_res: dict[int, list[tuple[int, float]]] = {b: [] for b in hf_batches}
    step_lat: list[float] = []
    ttft_ours: list[float] = []
    ttft_hf: list[float] = []
    jobs: list[tuple[str, int]] = [("ours", b) for b in ours_batches] + [("hf", b) for b in hf_batches]
    jobs += [("ttft-ours", 1), ("ttft-hf", 1)]
    seed = 1000
    for _ in range(rounds):
        rng.shuffle(jobs)
        for who, b in jobs:
            seed += 100
            if who == "ours":
                n, dt, steps = ours_run(loop, texts[:b], new_tokens, seed)
                ours_res[b].append((n, dt))
                if b == 1:
                    step_lat.extend(steps[1:])  # decode steps; the first one is the prefill
            elif who == "hf":
                ids = torch.tensor([[stoi[c] for c in t] for t in texts[:b]], device=device)
                hf_res[b].append(hf_run(hf, ids, new_tokens, seed, device))
            elif who == "ttft-ours":
                for k in range(3):
                    ttft_ours.append(ours_ttft(loop, texts[k], seed + k))
            else:
                for k in range(3):
                    ids = torch.tensor([[stoi[c] for c in texts[k]]], device=device)
                    ttft_hf.append(hf_run(hf, ids, 1, seed + k, device)[1])

    def rate(res: list[tuple[int, float]]) -> float:
        return statistics.median(n / dt for n, dt in res)

    def per_token_ms(res: list[tuple[int, float]]) -> float:
        return statistics.median(dt / n for n, dt in res) * 1e3

    single = rate(ours_res[1])
    lines = [
        f"transformer (char, {loaded.config.n_layer} layers, d_model {loaded.config.d_model}, block {loaded.config.block_size}): "
        f"prompts of {PROMPT_CHARS} chars + {new_tokens} new tokens, temperature 1, top_k 0"
    ]
    header = f"{'sequences':>9} {'ours tok/s':>11} {'hf tok/s':>10} {'ours/hf':>8} {'ours vs 1 stream':>17}"
    lines += [header, "-" * len(header)]
    rows: list[dict[str, Any]] = []
    for b in ours_batches:
        o = rate(ours_res[b])
        h = rate(hf_res[b]) if hf_res.get(b) else float("nan")
        rows.append({"sequences": b, "ours_tok_s": o, "hf_tok_s": h, "ours_over_hf": o / h, "ours_over_single": o / single})
        h_txt = f"{h:>10.0f} {o / h:>8.2f}" if b in hf_res else f"{'-':>10} {'-':>8}"
        lines.append(f"{b:>9} {o:>11.0f} {h_txt} {o / single:>16.1f}x")
    ours_tok_ms = per_token_ms(ours_res[1])
    hf_tok_ms = per_token_ms(hf_res[1])
    step_ms = statistics.median(step_lat) * 1e3
    t_ours = statistics.median(ttft_ours) * 1e3
    t_hf = statistics.median(ttft_hf) * 1e3
    lines += [
        f"one stream, per token (wall / tokens): ours {ours_tok_ms:.3f} ms, hf {hf_tok_ms:.3f} ms, ours/hf {ours_tok_ms / hf_tok_ms:.3f}"
        f"  (ours, median decode step: {step_ms:.3f} ms)",
        f"time to first token: ours {t_ours:.3f} ms, hf {t_hf:.3f} ms (generate with 1 new token), ours/hf {t_ours / t_hf:.3f}",
    ]
    agg32 = next(r for r in rows if r["sequences"] == 32)["ours_over_single"]
    lat = ours_tok_ms / hf_tok_ms
    lines.append(
        f"targets: per-token latency ours/hf {lat:.3f} (<= 0.5: {'met' if lat <= 0.5 else 'MISSED'}); "
        f"aggregate at 32 sequences {agg32:.1f}x one stream (>= 10x: {'met' if agg32 >= 10 else 'MISSED'})"
    )
    out["transformer"] = {
        "rows": rows,
        "new_tokens": new_tokens,
        "ours_per_token_ms": ours_tok_ms,
        "hf_per_token_ms": hf_tok_ms,
        "ours_decode_step_ms": step_ms,
        "ttft_ours_ms": t_ours,
        "ttft_hf_ms": t_hf,
    }
    return lines


# -- main ---------------------------------------------------------------------------------------


def step_bench(path: Path, rounds: int, target_s: float, device: torch.device, rng: random.Random, out: dict[str, Any]) -> list[str]:
    """One step of an iterative model's step batch at several numbers of active samples, beside the bare step."""
    from engine.images import ImageRequest
    from engine.limits import ImageLimits
    from engine.steps import IterativeImages, StepBatch

    loaded = load_model(path, device)
    images = IterativeImages(loaded, ImageLimits(step_rows=64))
    lines = [f"{loaded.name} ({loaded.kind}): one step, ms (median of {rounds} rounds)", f"{'samples':>8} {'engine':>9} {'bare':>9}"]
    rows: list[dict[str, Any]] = []
    for n in (1, 8, 16, 32, 64):
        batch = StepBatch(images, max_pending=n)
        fresh = [
            ImageRequest(n=1, seed=i, steps=images.steps.high, labels=[i % images.num_classes] if images.conditional else None)
            for i in range(n)
        ]

        def engine_step(batch: StepBatch = batch, fresh: list[ImageRequest] = fresh) -> None:
            if not batch.has_work:  # every few dozen calls: fresh requests (admission amortised over their steps)
                for r in fresh:
                    batch.add(r)
            batch.step()

        x = torch.randn(n, images.latent_dim)
        t, dt = torch.full((n,), 0.5), torch.full((n,), 1.0 / images.steps.default)
        labels = torch.arange(n) % images.num_classes if images.conditional else None
        g = torch.full((n,), images.steps.guidance)

        def bare(
            x: torch.Tensor = x, t: torch.Tensor = t, dt: torch.Tensor = dt, labels: torch.Tensor | None = labels, g: torch.Tensor = g
        ) -> None:
            with torch.inference_mode():
                images.module.step(x, t, dt, labels, g)

        contenders = [Contender("engine", engine_step), Contender("bare", bare)]
        for c in contenders:
            c.inner = calibrate(c.fn, target_s, device)
        measure_rounds(contenders, rounds, device, rng)
        engine_ms, bare_ms = (c.median * 1000 for c in contenders)
        rows.append({"samples": n, "engine_ms": engine_ms, "bare_ms": bare_ms})
        lines.append(f"{n:>8} {engine_ms:9.3f} {bare_ms:9.3f}")
    out["steps"] = {"model": loaded.name, "rows": rows}
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few rounds and short sequences (well under a minute)")
    parser.add_argument("--threads", type=int, default=None, help="torch (and ORT) intra-op threads; default: torch's default")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--full-hf", action="store_true", help="also run HF generate at batch 64")
    parser.add_argument("--seed", type=int, default=0, help="seeds the order of the timing rounds")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    rng = random.Random(args.seed)
    img_rounds, target_s = (3, 0.01) if args.quick else (9, 0.04)
    text_rounds, new_tokens = (1, 24) if args.quick else (3, NEW_TOKENS)
    hf_batches = (1, 8) if args.quick else ((1, 8, 32, 64) if args.full_hf else (1, 8, 32))

    import onnxruntime as ort  # type: ignore[import-untyped,unused-ignore]
    import transformers

    gpu = f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    out: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device) + gpu,
            "quick": args.quick,
        }
    }
    m = out["machine"]
    print(
        f"genserve engine benchmark{' (--quick)' if args.quick else ''}: {m['cpu_count']} CPUs ({m['affinity']} usable, {m['processor']}), "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}, transformers {m['transformers']}, "
        f"{m['threads']} torch threads, device {m['device']}"
    )
    print(f"images: median of {img_rounds} rounds (contenders alternated); text: median of {text_rounds} rounds\n")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for name in ("vae", "gan"):
            for line in image_bench(name, device, img_rounds, target_s, Path(d), rng, out):
                print(line, flush=True)
            print()
    for line in text_bench(device, text_rounds, new_tokens, hf_batches, rng, out):
        print(line, flush=True)
    flow = Path(__file__).resolve().parent.parent / "models" / "flow.safetensors"
    if flow.is_file():
        print()
        for line in step_bench(flow, img_rounds, target_s, device, rng, out):
            print(line, flush=True)
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
