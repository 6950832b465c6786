"""The decode step under bench.text_load's workload, in-process: where a step's time goes when prompts
arrive while others decode.

    python -m bench.text_mix [--rates 8,14,24] [--duration 20] [--threads 1] [--precision float32|int8] [--json FILE] [--quick]

One ``DecodeBatch`` (the server's defaults: 64 slots, 256 waiting) on the bundled Transformer, fed by
bench.text_load's Poisson schedule (prompts of 16-128 characters, 70% 32 / 25% 128 / 5% 512 new
tokens, temperature 0.8) in real time: before each step, every arrival whose time has come is added;
with nothing to do the loop sleeps until the next arrival. No server, no client: the decode loop's
own share of what bench.text_load measures end to end.

Each step is timed in four parts (perf_counter around the calls, one step at a time):
  decode    the batched forward of the sequences already decoding (``SlotCache.decode``)
  prefill   the forward over newly admitted prompts, padded to the longest (``SlotCache.prefill``)
  sample    ``engine.sampling.sample`` over the step's logits
  other     the rest of ``step()``: scheduling, uniforms, stop strings, events (Python)
It prints, per rate: steps and tokens a second, the shares of the four parts, step time p50/p99 for
steps without and with a prefill, the longest step and its prefill's tokens, and the engine's own
time to first token (arrival to the step that emits it) p50/p99, and the share of prefilled tokens
that were padding (prompts admitted together are padded to the longest). The longest step is
the stall a long prompt imposes on every decoding sequence (what chunked prefill would bound).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import engine.decode as decode_module
from bench.text_load import TEMPERATURE, schedule, validation_text
from engine import sampling
from engine.decode import DecodeBatch, SequenceRequest
from engine.modelfile import load_model
from engine.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "transformer.safetensors"
PARTS = ("decode", "prefill", "sample", "other")


@dataclass
class StepClock:
    """Seconds spent in each timed call during the current step; ``prefill_tokens``: its padded prefill size."""

    spent: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS[:3], 0.0))
    prefill_tokens: int = 0
    prompt_tokens: int = 0  # of which real (the rest is padding to the longest window)

    def timed(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[part] += time.perf_counter() - t0

        return wrapper


def instrument(batch: DecodeBatch, clock: StepClock) -> Callable[[], None]:
    """Time ``batch``'s forwards and the sampler into ``clock``; returns the undo."""
    cache = batch._cache
    decode, prefill, sample = cache.decode, cache.prefill, sampling.sample

    def counted_prefill(slots: Sequence[int], windows: Sequence[Sequence[int]]) -> torch.Tensor:
        clock.prefill_tokens += len(windows) * max(len(w) for w in windows)
        clock.prompt_tokens += sum(len(w) for w in windows)
        return prefill(slots, windows)

    cache.decode = clock.timed("decode", decode)  # type: ignore[method-assign]
    cache.prefill = clock.timed("prefill", counted_prefill)  # type: ignore[method-assign]
    decode_module.sample = clock.timed("sample", sample)  # type: ignore[attr-defined]  # what DecodeBatch._step calls

    def undo() -> None:
        del cache.decode, cache.prefill
        decode_module.sample = sample  # type: ignore[attr-defined]

    return undo


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_rate(batch: DecodeBatch, rate: float, duration_s: float, text: str, seed: int) -> dict[str, Any]:
    """Feed one rate's schedule to ``batch`` in real time and step it until every request has finished."""
    arrivals = schedule(rate, duration_s, text, seed)
    clock = StepClock()
    undo = instrument(batch, clock)
    steps: list[dict[str, float]] = []
    arrived_at: dict[int, float] = {}
    ttft: list[float] = []
    tokens = 0
    nxt = 0
    t0 = time.perf_counter()
    try:
        while nxt < len(arrivals) or batch.has_work:
            now = time.perf_counter() - t0
            while nxt < len(arrivals) and arrivals[nxt].at <= now:
                a = arrivals[nxt]
                params = SamplingParams(temperature=TEMPERATURE, seed=a.seed, max_new_tokens=a.max_tokens)
                arrived_at[batch.add(SequenceRequest(a.prompt, params)).id] = a.at
                nxt += 1
            if not batch.has_work:
                time.sleep(max(0.0, arrivals[nxt].at - (time.perf_counter() - t0)))
                continue
            clock.spent = dict.fromkeys(PARTS[:3], 0.0)
            clock.prefill_tokens = clock.prompt_tokens = 0
            s0 = time.perf_counter()
            events = batch.step()
            total = time.perf_counter() - s0
            done = time.perf_counter() - t0
            for e in events:
                if e.token_id is not None:
                    tokens += 1
                    if e.n_generated == 1:
                        ttft.append(done - arrived_at.pop(e.handle.id))
            row = dict(clock.spent, total=total, active=float(batch.active_count))
            row |= {"prefill_tokens": float(clock.prefill_tokens), "prompt_tokens": float(clock.prompt_tokens)}
            row["other"] = total - sum(clock.spent.values())
            steps.append(row)
    finally:
        undo()
    wall = time.perf_counter() - t0
    busy = sum(s["total"] for s in steps)
    plain = [s["total"] for s in steps if not s["prefill_tokens"]]
    mixed = [s["total"] for s in steps if s["prefill_tokens"]]
    worst = max(steps, key=lambda s: s["total"])
    return {
        "rate": rate,
        "requests": len(arrivals),
        "wall_s": wall,
        "busy": busy / wall,
        "tokens_per_s": tokens / wall,
        "steps_per_s": len(steps) / wall,
        "mean_active": float(np.mean([s["active"] for s in steps])),
        "shares": {p: sum(s[p] for s in steps) / busy for p in PARTS},
        "step_ms": {"plain_p50": pct(plain, 50) * 1e3, "plain_p99": pct(plain, 99) * 1e3},
        "prefill_step_ms": {"p50": pct(mixed, 50) * 1e3, "p99": pct(mixed, 99) * 1e3, "share_of_steps": len(mixed) / len(steps)},
        "prefill_padding": 1 - sum(s["prompt_tokens"] for s in steps) / max(1.0, sum(s["prefill_tokens"] for s in steps)),
        "longest_step": {"ms": worst["total"] * 1e3, "prefill_tokens": int(worst["prefill_tokens"]), "active": int(worst["active"])},
        "ttft_ms": {"p50": pct(ttft, 50) * 1e3, "p99": pct(ttft, 99) * 1e3},
    }


def lines(rows: Sequence[dict[str, Any]], threads: int, precision: str) -> list[str]:
    out = [
        f"decode step under bench.text_load's mix, in-process, {threads} torch thread(s), {precision}; shares of busy time",
        f"{'rate':>5} {'busy':>5} {'tok/s':>6} {'active':>6} {'decode':>7} {'prefill':>7} {'sample':>7} {'other':>6}"
        f" {'step p50/p99 ms':>15} {'w/ prefill p50/p99':>18} {'padding':>7} {'longest ms (prefill tok)':>24} {'TTFT p50/p99 ms':>15}",
    ]
    for r in rows:
        s, st, pf, lg, tt = r["shares"], r["step_ms"], r["prefill_step_ms"], r["longest_step"], r["ttft_ms"]
        out.append(
            f"{r['rate']:>5g} {r['busy']:>5.0%} {r['tokens_per_s']:>6.0f} {r['mean_active']:>6.1f}"
            f" {s['decode']:>7.0%} {s['prefill']:>7.0%} {s['sample']:>7.0%} {s['other']:>6.0%}"
            f" {st['plain_p50']:>7.2f}/{st['plain_p99']:<7.2f} {pf['p50']:>9.2f}/{pf['p99']:<8.2f} {r['prefill_padding']:>7.0%}"
            f" {lg['ms']:>15.1f} ({lg['prefill_tokens']:>4})  {tt['p50']:>7.1f}/{tt['p99']:<7.1f}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.text_mix", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="8,14,24", help="offered requests/s, comma-separated")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per rate")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the server's default on 2 cores)")
    parser.add_argument("--seed", type=int, default=0, help="the schedule's seed (bench.text_load's)")
    parser.add_argument("--model", default=str(MODEL), help="a char-transformer model file")
    parser.add_argument("--precision", default="float32", choices=("float32", "int8"), help="the server's --decode-precision")
    parser.add_argument("--quick", action="store_true", help="2 s per rate (a smoke run)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates takes numbers separated by commas, got {args.rates!r}")
    if not rates or any(r <= 0 for r in rates):
        parser.error(f"--rates needs at least one rate above 0, got {args.rates!r}")
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    assert loaded.vocab is not None
    text = validation_text(loaded.vocab)
    batch = DecodeBatch.from_loaded(loaded, max_batch=64, max_pending=256, precision=args.precision)
    run_rate(batch, 4.0, 1.0, text, args.seed + 1)  # warm-up: first calls pay lazy initialisation
    rows = [run_rate(batch, r, 2.0 if args.quick else args.duration, text, args.seed) for r in rates]
    print("\n".join(lines(rows, args.threads, args.precision)))
    if args.json:
        figures = {"threads": args.threads, "precision": args.precision, "duration_s": args.duration, "rows": rows}
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
