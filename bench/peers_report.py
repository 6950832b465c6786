"""bench.peers' report: bench/REPORT.md and its plots, from the figures of one run (nothing typed by hand)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.figures import fmt
from bench.serve import plain

PLOTS = ("peers_latency_throughput.png", "peers_overload.png", "peers_text.png")
# bench.text_load writes its own section of the report between these: a rewrite here keeps it
TEXT_LOAD_BEGIN, TEXT_LOAD_END = "<!-- bench.text_load: begin -->", "<!-- bench.text_load: end -->"


def num(x: Any) -> float:
    """A figure back from JSON (null: no sample) as a float."""
    if x is None:
        return math.nan
    if x == "inf":
        return math.inf
    return float(x)


def f(x: Any, unit: str = "") -> str:
    return fmt(num(x), unit)


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def statuses(d: dict[str, int] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (d or {}).items()) or "-"


def headline(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Per side: its best closed-loop rate (and p99 there), p99 at half that rate, overload figures, x LitServe."""
    rows = []
    by_side: dict[str, list[dict[str, Any]]] = {}
    for r in out["serving"]:
        by_side.setdefault(r["side"], []).append(r)
    lit = None
    for side, rs in by_side.items():
        closed = [r for r in rs if r["mode"] == "closed"]
        if not closed:
            continue
        best = max(closed, key=lambda r: num(r["req_s"]))
        half = next((r for r in rs if r["mode"] == "open" and r.get("fraction") == 0.5), None)
        over = next((r for r in rs if r["mode"] == "overload"), None)
        row = {
            "side": side,
            "best_req_s": num(best["req_s"]),
            "best_in_flight": best["in_flight"],
            "best_p99_ms": num(best["p99_ms"]),
            "half_p99_ms": num(half["p99_ms"]) if half else math.nan,
            "over_goodput": num(over["req_s"]) if over else math.nan,
            "over_offered": num(over["offered_req_s"]) if over else math.nan,
            "over_p99_ms": num(over["p99_ms"]) if over else math.nan,
            "over_refused": over["refused"] if over else 0,
            "over_not_ok": over["not_ok"] if over else {},
            "over_rss_peak_mb": num(over["rss_peak_mb"]) if over else math.nan,
        }
        if side == "LitServe":
            lit = row["best_req_s"]
        rows.append(row)
    for row in rows:
        row["x_litserve"] = row["best_req_s"] / lit if lit else math.nan
    return rows


PEERS = ("LitServe", "FastAPI", "Ray Serve")


def targets(head: list[dict[str, Any]]) -> list[tuple[str, float, str, bool | None]]:
    """Issue 15's targets on the headline: (figure, value, bound, met); met is None when a side is missing."""
    by = {h["side"]: h for h in head}
    gen, stream = by.get("genserve Generate"), by.get("genserve GenerateStream")
    peers = [by[p] for p in PEERS if p in by]
    rows: list[tuple[str, float, str, bool | None]] = []

    def ratio(side: dict[str, Any] | None, bound: float, name: str) -> None:
        value = side["x_litserve"] if side else math.nan
        rows.append((name, value, f">= {bound:g}", None if math.isnan(value) else value >= bound))

    ratio(stream, 10, "GenerateStream best req/s / LitServe's")
    ratio(gen, 5, "Generate best req/s / LitServe's")
    if gen:
        for name, key, better in (
            ("Generate best req/s / the best peer's", "best_req_s", "> 1"),
            ("Generate p99 at half load / the best peer's", "half_p99_ms", "< 1"),
            ("Generate overload goodput / the best peer's", "over_goodput", "> 1"),
        ):
            values = [p[key] for p in peers if not math.isnan(p[key])]
            if not values or math.isnan(gen[key]):
                rows.append((name, math.nan, better, None))
                continue
            best = min(values) if better == "< 1" else max(values)
            value = gen[key] / best
            rows.append((name, value, better, value < 1 if better == "< 1" else value > 1))
    return rows


def render(out: dict[str, Any], plots: Sequence[str]) -> str:
    m = out["machine"]
    lines = ["# genserve beside its peers", ""]
    lines.append(
        f"Measured by `python -m bench.peers{' --quick' if m.get('quick') else ''}` on {m['date']}: {m['cpu_model']}, "
        f"{m['usable_cores']} usable cores of {m['cpu_count']}, {m['threads']} torch threads on every side, "
        f"load average {m['load_avg_at_start']:.1f} at the start" + (f", {out['total_s']:.0f} s in all." if "total_s" in out else ".")
    )
    lines.append("Servers and the load generator share the same cores; sides run one at a time.")
    if m.get("quick"):
        lines.append("**--quick**: short points, for development; noisy.")
    vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines += ["", f"Versions: python {m['python']}, {vers}.", ""]

    lines += ["## Serving one-image VAE requests", ""]
    head = headline(out)
    if head:
        lines += table(
            ["side", "best req/s (in flight)", "p99 ms there", "p99 ms at half that rate", "x LitServe",
             "overload goodput/s (offered)", "p99 ms admitted", "refused", "peak RSS MB"],
            [[h["side"], f"{fmt(h['best_req_s'])} ({h['best_in_flight']})", fmt(h["best_p99_ms"]), fmt(h["half_p99_ms"]),
              fmt(h["x_litserve"]), f"{fmt(h['over_goodput'])} ({fmt(h['over_offered'])})", fmt(h["over_p99_ms"]),
              str(h["over_refused"]), fmt(h["over_rss_peak_mb"])] for h in head],
        )  # fmt: skip
        lines.append("")
        verdicts = [[n, fmt(v), b, "n/a" if met is None else "met" if met else "MISSED"] for n, v, b, met in targets(head)]
        if verdicts:
            lines += ["Targets (issue 15):", "", *table(["figure", "value", "target", ""], verdicts), ""]
    for p in plots[:2]:
        lines += [f"![{p}]({p})", ""]
    lines += ["Settings (why each is fair):", ""]
    lines += [f"- **{k}**: {v}" for k, v in out["settings"].items()]
    lines += [f"- **{k}**: not measured: {v}" for k, v in out["skipped"].items()]
    lines += ["", "All points (closed: calls in flight; open/overload: offered calls/s):", ""]
    rows = []
    for r in out["serving"]:
        load = str(r["in_flight"]) if r["mode"] == "closed" else f"{f(r['offered_req_s'])}/s"
        p99 = f(r["p99_ms"]) + ("" if r.get("p99_exact", True) else "*")
        rows.append([r["side"], r["mode"], load, f(r["req_s"]), f(r["p50_ms"]), p99, statuses(r["not_ok"])])
    lines += table(["side", "mode", "load", "OK req/s", "p50 ms", "p99 ms", "not OK"], rows)
    lines += [
        "",
        "Latency is from the send. Goodput counts OK answers per second of the run. `*`: p99 of the admitted taken as the "
        "slowest answers (h2load cannot read grpc-status; refusals come back at admission, faster than admitted calls). "
        "A refusal is RESOURCE_EXHAUSTED (gRPC) or 429/503 (HTTP). HTTP/1.1 peers get one call per connection "
        "(closed loop: as many connections as calls in flight; open loop and overload: up to 256 connections, so a peer that "
        "slows down is sent less than offered: `sent_req_s` in the JSON).",
        "",
    ]

    if out["text"]:
        lines += ["## Text: tokens/s and time to first token", ""]
        lines += table(
            ["system", "streams", "tokens/s", "TTFT ms"],
            [[r["system"], str(r["streams"]), f(r["tokens_s"]), f(r["ttft_ms"])] for r in out["text"]],
        )
        lines += [
            "",
            f"{out['plan']['text_tokens']} new tokens per stream after a 16-character prompt, temperature 1. genserve: the server over "
            "gRPC (bench.loadgen's text client, TTFT p50 from the call's start); HF: `GPT2LMHeadModel.generate` on the same weights "
            "(TTFT: generate of 1 token for the batch); nanoGPT-style: the whole context through the model for every token. "
            "The server's rows include its Python client's cost on the same cores (it decodes every chunk); `python -m bench.text` "
            "drives the server with h2load too, and times the decode loop alone, beside HF on the same weights and threads.",
            "",
        ]
        if len(plots) > 2:
            lines += [f"![{plots[2]}]({plots[2]})", ""]

    if out["engine"]:
        lines += ["## Engine: VAE decoder batches (bench/engine.py)", ""]
        lines += table(
            ["batch", "genserve ms", "bare PyTorch ms", "ONNX Runtime ms", "genserve / bare", "genserve / ORT"],
            [[str(r["batch"]), f(r["engine_ms"]), f(r["bare_ms"]), f(r["ort_ms"]), f"{num(r['engine_over_bare']):.2f}",
              f"{num(r['engine_over_ort']):.2f}"] for r in out["engine"]],
        )  # fmt: skip
        lines.append("")

    if out["training"]:
        lines += ["## Training (run records in docs/runs, not retrained)", ""]
        lines += table(
            ["model", "epochs", "s/epoch (median)", "train s", "quality (best epoch)", "reference recipe (quoted)", "its figure"],
            [[r["model"], str(r["epochs"]), f(r["s_per_epoch"]), f(r["train_s"]),
              f"{num(r['quality']):.4g} {r['quality_name']} ({r['best_epoch']})", r["reference"], r["reference_figure"]]
             for r in out["training"]],
        )  # fmt: skip
        lines += [
            "",
            "s/epoch: the median epoch of the record's history. The VAE's record scores the 500 validation digits; "
            "the judge of docs/training.md uses the 1000 held-out ones (harder writers), as the reference's figure does.",
            "",
        ]
    return "\n".join(lines) + "\n"


def plot(out: dict[str, Any], folder: Path) -> list[str]:
    """The three PNGs; names of those written (a section without figures gets none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sweep: dict[str, list[tuple[float, float, float]]] = {}  # side -> (in flight, req/s, p99): the closed-loop curve
    opened: dict[str, list[tuple[float, float]]] = {}  # side -> (goodput, p99) at the open-loop rates
    for r in out["serving"]:
        if math.isnan(num(r["p99_ms"])):
            continue
        if r["mode"] == "closed":
            sweep.setdefault(r["side"], []).append((r["in_flight"], num(r["req_s"]), num(r["p99_ms"])))
        elif r["mode"] == "open":
            opened.setdefault(r["side"], []).append((num(r["req_s"]), num(r["p99_ms"])))
    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for side, pts in sweep.items():
            pts.sort()
            (line,) = ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=side)
            if side in opened:
                xs, ys = zip(*opened[side], strict=True)
                ax.scatter(xs, ys, marker="x", color=line.get_color())
        ax.set(xscale="log", yscale="log", xlabel="OK requests/s", ylabel="p99 latency ms")
        ax.set_title("One-image VAE requests: p99 vs throughput (o closed loop, x open loop)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / PLOTS[0], dpi=110)
        plt.close(fig)
        written.append(PLOTS[0])
    over = [r for r in out["serving"] if r["mode"] == "overload"]
    if over:
        fig, ax = plt.subplots(figsize=(7, 4))
        x = np.arange(len(over))
        ax.bar(x - 0.2, [num(r["offered_req_s"]) for r in over], 0.4, label="offered (2x best)", color="#bbb")
        ax.bar(x + 0.2, [num(r["req_s"]) for r in over], 0.4, label="goodput (OK/s)", color="#2a7")
        ax.set_xticks(x, [r["side"].replace("genserve ", "") for r in over], fontsize=8)
        ax.set(ylabel="requests/s", title="Overload at twice each side's best rate")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / PLOTS[1], dpi=110)
        plt.close(fig)
        written.append(PLOTS[1])
    if out["text"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        systems: dict[str, list[tuple[float, float]]] = {}
        for r in out["text"]:
            systems.setdefault(r["system"], []).append((r["streams"], num(r["tokens_s"])))
        for name, curve in systems.items():
            ax.plot([p[0] for p in curve], [p[1] for p in curve], marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="tokens/s", title="Text: tokens/s vs streams")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / PLOTS[2], dpi=110)
        plt.close(fig)
        written.append(PLOTS[2])
    return written


def write(out: dict[str, Any], path: Path) -> list[Path]:
    """REPORT.md at ``path`` and its plots beside it; the paths written."""
    out = plain(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    plots = plot(out, path.parent)
    text = render(out, plots)
    old = path.read_text() if path.exists() else ""
    if TEXT_LOAD_BEGIN in old and TEXT_LOAD_END in old:  # bench.text_load's section, kept as it was
        text += "\n" + old[old.index(TEXT_LOAD_BEGIN) : old.index(TEXT_LOAD_END) + len(TEXT_LOAD_END)] + "\n"
    path.write_text(text)
    return [path, *(path.parent / p for p in plots)]
