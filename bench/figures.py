"""Figures of one benchmark point from the Python load generators' records: rates, percentiles, statuses."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.accounting import Tally
from bench.h2load import Run as H2Run
from bench.loadgen import CODE_NAMES, DROPPED, OK, RESOURCE_EXHAUSTED, UNFINISHED, Job

# -- figures --------------------------------------------------------------------------------------


@dataclass
class Calls:
    """Every process's records of one point, merged."""

    due: np.ndarray
    sent: np.ndarray
    first: np.ndarray
    end: np.ndarray
    code: np.ndarray
    tokens: np.ndarray
    counts: dict[str, int]
    details: dict[str, str]

    @classmethod
    def merge(cls, payloads: Sequence[dict[str, Any]]) -> Calls:
        def col(name: str, dtype: type) -> np.ndarray:
            return np.concatenate([np.frombuffer(p[name], dtype=dtype) for p in payloads])

        counts: dict[str, int] = {}
        details: dict[str, str] = {}
        for p in payloads:
            for k, v in p["counts"].items():
                counts[k] = counts.get(k, 0) + v
            details = p["details"] | details
        f8, i4 = np.float64, np.int32
        return cls(col("due", f8), col("sent", f8), col("first", f8), col("end", f8), col("code", i4), col("tokens", i4), counts, details)


def pct_ms(seconds: np.ndarray, q: float) -> float:
    """The q-th percentile in ms, no interpolation (so an infinite sample gives inf, not nan); nan when empty."""
    if seconds.size == 0:
        return math.nan
    return float(np.percentile(seconds, q, method="inverted_cdf")) * 1000.0


def code_counts(codes: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(codes, return_counts=True)
    return {CODE_NAMES.get(int(v), str(int(v))): int(c) for v, c in zip(values, counts, strict=True) if v != OK}


def closed_figures(calls: Calls, job: Job) -> dict[str, Any]:
    """Requests/s finishing OK in the window; latency of those that did; everything else by code."""
    w0, w1 = job.window_start, job.window_end
    in_window = (calls.end >= w0) & (calls.end < w1)
    ok = in_window & (calls.code == OK)
    lat = (calls.end - calls.sent)[ok]
    out: dict[str, Any] = {
        "req_s": float(ok.sum()) / job.dur_s,
        "p50_ms": pct_ms(lat, 50),
        "p90_ms": pct_ms(lat, 90),
        "p99_ms": pct_ms(lat, 99),
        "not_ok": code_counts(calls.code[in_window | (calls.code == UNFINISHED)]),
        "details": calls.details,
    }
    if calls.counts.get("msgs_out"):
        out["msgs_out_s"] = calls.counts["msgs_out"] / (job.warm_s + job.dur_s)
        out["msgs_in_s"] = calls.counts["msgs_in"] / (job.warm_s + job.dur_s)
        out["requests_per_msg_out"] = calls.code.size / calls.counts["msgs_out"]
    return out


def open_figures(calls: Calls, job: Job, offered: float) -> dict[str, Any]:
    """Latency from the scheduled start for the calls due in the window; goodput = OK finishing in it."""
    w0, w1 = job.window_start, job.window_end
    due = (calls.due >= w0) & (calls.due < w1)
    code = calls.code
    admitted = due & ((code == OK) | (code == UNFINISHED))
    lat = np.where(code == UNFINISHED, np.inf, calls.end - calls.due)[admitted]
    refused = due & (code == RESOURCE_EXHAUSTED)
    sent = due & (code != DROPPED)
    return {
        "offered_req_s": offered,
        "sent_req_s": float(sent.sum()) / job.dur_s,
        "goodput_req_s": float(((calls.end >= w0) & (calls.end < w1) & (code == OK)).sum()) / job.dur_s,
        "p50_ms": pct_ms(lat, 50),
        "p90_ms": pct_ms(lat, 90),
        "p99_ms": pct_ms(lat, 99),
        "p99_from_sent_ms": pct_ms(np.where(code == UNFINISHED, np.inf, calls.end - calls.sent)[admitted], 99),
        "client_lag_p99_ms": pct_ms((calls.sent - calls.due)[sent], 99),
        "refused": int(refused.sum()),
        "refused_frac": float(refused.sum()) / max(int(sent.sum()), 1),
        "refusal_p50_ms": pct_ms((calls.end - calls.sent)[refused], 50),
        "refusal_p99_ms": pct_ms((calls.end - calls.sent)[refused], 99),
        "not_ok": code_counts(code[due & ~refused]),
        "details": calls.details,
    }


def text_figures(calls: Calls, job: Job) -> dict[str, Any]:
    w0, w1 = job.window_start, job.window_end
    started = (calls.sent >= w0) & (calls.sent < w1)
    ok = started & (calls.code == OK)
    ttft = (calls.first - calls.sent)[ok]
    return {
        "tokens_s": calls.counts.get("tokens_in_window", 0) / job.dur_s,
        "requests": int(ok.sum()),
        "ttft_p50_ms": pct_ms(ttft, 50),
        "ttft_p99_ms": pct_ms(ttft, 99),
        "ms_per_token_p50": pct_ms((calls.end - calls.first)[ok] / np.maximum(calls.tokens[ok] - 1, 1), 50),
        "not_ok": code_counts(calls.code[started]),
        "details": calls.details,
    }


def fmt(x: float, unit: str = "") -> str:
    if isinstance(x, float) and math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf"
    if abs(x) >= 1000:
        return f"{x:,.0f}{unit}"
    if abs(x) >= 100:
        return f"{x:.0f}{unit}"
    if abs(x) >= 10:
        return f"{x:.1f}{unit}"
    return f"{x:.2f}{unit}"


def not_ok_text(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"


# -- plain calls driven by h2load, accounted for by the servers' counters (bench/accounting.py) ------


def statuses_text(t: Tally) -> str:
    """What the counters say became of the sent calls, e.g. ``sent 9,000: OK 8,990, CANCELLED 10``."""
    parts = [f"{k} {v:,}" for k, v in t.by_status.items()]
    if t.unseen:
        parts.append(f"ENDED BY GRPC CORE {t.unseen:,}")
    check = "adds up" if t.adds_up else "DOES NOT ADD UP"
    return f"sent {t.sent:,}, answered {t.done:,} (cut at the end {t.cut:,}): " + (", ".join(parts) or "-") + f"; {check}"


def h2load_closed_figures(r: H2Run, t: Tally) -> dict[str, Any]:
    """Closed loop by h2load: calls/s that ended OK (counted by the side), latency of every finished call."""
    return {
        "req_s": t.count("OK") / r.wall_s if r.wall_s else 0.0,
        "p50_ms": pct_ms(r.durations, 50),
        "p90_ms": pct_ms(r.durations, 90),
        "p99_ms": pct_ms(r.durations, 99),
        "not_ok": {k: v for k, v in t.by_status.items() if k not in ("OK", "CANCELLED")} | ({"BY_GRPC_CORE": t.unseen} if t.unseen else {}),
        "accounting": t.summary(),
        "statuses": statuses_text(t),
        "driver": "h2load",
    }


def h2load_open_figures(r: H2Run, t: Tally, probe: Calls, job: Job, offered: float) -> dict[str, Any]:
    """Open loop: h2load offers the load, a Python probe at a low rate beside it tells admitted
    from refused calls (h2load cannot: both are HTTP 200) and times them from their scheduled start."""
    w0, w1 = job.window_start, job.window_end
    due = (probe.due >= w0) & (probe.due < w1)
    code = probe.code
    admitted = due & ((code == OK) | (code == UNFINISHED))
    refused = due & (code == RESOURCE_EXHAUSTED)
    sent = due & (code != DROPPED)
    wall = r.wall_s or 1.0
    return {
        "offered_req_s": offered,
        "sent_req_s": t.sent / wall,
        "goodput_req_s": t.count("OK") / wall,
        "p50_ms": pct_ms(r.durations, 50),  # every call h2load finished, admitted and refused
        "p99_ms": pct_ms(r.durations, 99),
        "admitted_p50_ms": pct_ms(np.where(code == UNFINISHED, np.inf, probe.end - probe.due)[admitted], 50),
        "admitted_p99_ms": pct_ms(np.where(code == UNFINISHED, np.inf, probe.end - probe.due)[admitted], 99),
        "refusal_p50_ms": pct_ms((probe.end - probe.sent)[refused], 50),
        "refusal_p99_ms": pct_ms((probe.end - probe.sent)[refused], 99),
        "probe_calls": int(sent.sum()),
        "client_lag_p99_ms": pct_ms((probe.sent - probe.due)[sent], 99),
        "refused": t.count("RESOURCE_EXHAUSTED"),
        "refused_frac": t.count("RESOURCE_EXHAUSTED") / max(t.sent, 1),
        "not_ok": {k: v for k, v in t.other.items() if k != "CANCELLED"} | ({"BY_GRPC_CORE": t.unseen} if t.unseen else {}),
        "h2load_reset": r.errored,  # streams reset before any response (no grpc-status at all)
        "accounting": t.summary(),
        "statuses": statuses_text(t),
        "details": probe.details,
        "driver": "h2load + probe",
    }
