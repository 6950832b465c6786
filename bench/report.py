"""The benchmark's printed report: one table per section, server beside echo, and the targets."""

from __future__ import annotations

import math
from typing import Any

from bench.figures import fmt, not_ok_text
from bench.loadgen import PROMPT

# -- the report -----------------------------------------------------------------------------------


def print_header(out: dict[str, Any]) -> None:
    m, s = out["machine"], out["setup"]
    loop = f"grpc.aio on uvloop {m['uvloop']}" if m["uvloop"] else "grpc.aio on asyncio"
    print(
        f"genserve serving benchmark{' (--quick)' if m['quick'] else ''}: {m['cpu_count']} CPUs ({m['affinity']} usable, "
        f"{m['processor']}), python {m['python']}, grpcio {m['grpcio']}; load from {m['load_generator_processes']} "
        f"process(es), {loop}, on the same cores"
    )
    print(f"server under test: {s['server_cmd']}")
    print(f"echo (ceiling):    {s['echo_cmd']}")
    print(
        f"each point: {s['warm_s']} s warm-up + {s['duration_s']} s measured, echo then server; batch_size {s['batch_size']}, "
        f"batch_timeout {s['batch_timeout_ms']} ms, VAE batch compute {s['batch_compute_ms']:.2f} ms (batch {s['batch_size']}), "
        f"max_inflight {s['max_inflight']}, stream credit {s['stream_credits']}\n",
        flush=True,
    )


def print_closed(rows: list[dict[str, Any]]) -> None:
    print("closed loop: one-sample VAE requests; req/s finishing OK, latency ms per request")
    print("  Generate by h2load (statuses counted by each side's metrics); GenerateStream by the Python client")
    head = f"{'call':<15}{'in flight':>10} | {'echo req/s':>11}{'p50':>8}{'p99':>8} | {'server req/s':>13}{'p50':>8}{'p99':>8} | "
    head += f"{'srv/echo':>8}  server not OK"
    print(head)
    print("-" * len(head))
    by = {(r["call"], r["in_flight"], r["side"]): r for r in rows}
    for call, n in dict.fromkeys((r["call"], r["in_flight"]) for r in rows):
        e, s = by[(call, n, "echo")], by[(call, n, "server")]
        print(
            f"{call:<15}{n:>10} | {fmt(e['req_s']):>11}{fmt(e['p50_ms']):>8}{fmt(e['p99_ms']):>8} | "
            f"{fmt(s['req_s']):>13}{fmt(s['p50_ms']):>8}{fmt(s['p99_ms']):>8} | {s['req_s'] / max(e['req_s'], 1e-9):>8.2f}  "
            f"{not_ok_text(s['not_ok'])}"
        )
    counted = [r for r in rows if "statuses" in r]
    if counted:
        print("statuses counted by each side (CANCELLED: calls cut when h2load stopped; BY GRPC CORE: answered, not by the side):")
        for r in counted:
            print(f"  {r['call']} {r['in_flight']:>4} {r['side']:<7} {r['statuses']}")
    streams = [r for r in rows if "msgs_out_s" in r]
    if streams:
        parts = [
            f"{r['side']} {r['in_flight']}: {fmt(r['msgs_out_s'])}, {fmt(r['msgs_in_s'])} ({r['requests_per_msg_out']:.1f})"
            for r in streams
        ]
        print("GenerateStream messages/s out, in (requests per message out): " + "; ".join(parts))
        print("  (the Python client is not the bottleneck while the echo's row is well above the server's)")
    print(flush=True)


OPEN_HEAD = (
    f"{'side':<8}{'offered/s':>10}{'sent/s':>9}{'goodput/s':>10}{'p50':>7}{'p99':>8}{'adm p99':>9}"
    f"{'refused':>9}{'ref p99':>9}{'lag p99':>9}"
)


def open_row(r: dict[str, Any]) -> str:
    return (
        f"{r['side']:<8}{fmt(r['offered_req_s']):>10}{fmt(r['sent_req_s']):>9}{fmt(r['goodput_req_s']):>10}{fmt(r['p50_ms']):>7}"
        f"{fmt(r['p99_ms']):>8}{fmt(r['admitted_p99_ms']):>9}{r['refused']:>9}{fmt(r['refusal_p99_ms']):>9}{fmt(r['client_lag_p99_ms']):>9}"
    )


OPEN_NOTE = (
    "(h2load on 4 connections offers the load; p50/p99: every call h2load finished, admitted or refused; adm p99, ref p99:\n"
    " a Python probe at <= 200 calls/s inside the same load, from the scheduled start / from sending; lag: the probe's own delay)"
)


def print_open(out: dict[str, Any]) -> None:
    print("open loop: Generate started on a schedule at a fraction of each side's best closed-loop rate; latency ms")
    head = f"{'fraction':<9}" + OPEN_HEAD + "  other statuses"
    print(head)
    print("-" * len(head))
    for r in out["open"]:
        print(f"{r['fraction']:<9.2f}" + open_row(r) + f"  {not_ok_text(r['not_ok'])}")
    for r in out["open"]:
        print(f"  {r['fraction']:.2f} {r['side']:<7} {r['statuses']}")
    print(OPEN_NOTE + "\n", flush=True)


def print_text(rows: list[dict[str, Any]], ttft_tokens: int, text_tokens: int) -> None:
    print(f'text: transformer, prompt "{PROMPT}"; 1 stream x {ttft_tokens} new tokens, 32 streams x {text_tokens} new tokens')
    head = f"{'side':<8}{'streams':>8}{'requests':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'ms/token':>9}{'tokens/s':>10}  not OK"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['side']:<8}{r['streams']:>8}{r['requests']:>9}{fmt(r['ttft_p50_ms']):>10}{fmt(r['ttft_p99_ms']):>10}"
            f"{fmt(r['ms_per_token_p50']):>9}{fmt(r['tokens_s']):>10}  {not_ok_text(r['not_ok'])}"
        )
    print(flush=True)


def print_overload(out: dict[str, Any]) -> None:
    print("overload: Generate offered at 2x each side's best closed-loop rate; latency ms")
    head = OPEN_HEAD + f"{'RSS MB':>8}{'peak':>6}{'growth':>7}{'loop us':>8}  other statuses"
    print(head)
    print("-" * len(head))
    for o in out["overload"]:
        per_call = o.get("loop_us_per_call")  # absent from runs saved before the column existed
        loop_us = fmt(math.nan if per_call is None else per_call)
        growth = f"{o['rss_before_mb']:>8.0f}{o['rss_peak_mb']:>6.0f}{o['rss_growth_mb']:>7.1f}{loop_us:>8}"
        print(open_row(o) + f"{growth}  {not_ok_text(o['not_ok'])}")
    for o in out["overload"]:
        print(f"  {o['side']:<7} {o['statuses']}")
    s = out["setup"]
    print(OPEN_NOTE)
    print(
        f"({out['overload'][0]['duration_s']} s each; RSS: VmRSS of the server and its children, before the overload and its peak; "
        f"server idle {s['server_rss_idle_mb']:.0f} MB, after {out['server_rss_after_mb']:.0f} MB;\n"
        " loop us: the event loops' CPU per call the side answered itself, OK or refused)\n",
        flush=True,
    )


def print_details(out: dict[str, Any]) -> None:
    """The details string that came with each failing status code, once per side and code."""
    seen: dict[tuple[str, str], str] = {}
    for section in ("closed", "open", "text", "overload"):
        for r in out[section]:
            for code, details in r.get("details", {}).items():
                seen.setdefault((r["side"], code), details)
    for (side, code), details in seen.items():
        print(f"{side} {code}: {details!r}")
    if seen:
        print()


def targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 11's targets, on the server under test: figure, value, bound, met (None: nothing to judge)."""
    if "overload" not in out:
        return []
    closed = {(r["call"], r["in_flight"], r["side"]): r for r in out["closed"]}
    srv = [r for r in out["closed"] if r["side"] == "server"]
    ratio64 = closed[("Generate", 64, "server")]["req_s"] / max(closed[("Generate", 64, "echo")]["req_s"], 1e-9)
    best_stream = max((r for r in srv if r["call"] == "GenerateStream"), key=lambda r: r["req_s"])
    stream_ratio = best_stream["req_s"] / max(closed[("GenerateStream", best_stream["in_flight"], "echo")]["req_s"], 1e-9)
    at = {r["fraction"]: r for r in out["open"] if r["side"] == "server"}
    best = max(r["req_s"] for r in srv if r["call"] == "Generate")
    o = next(r for r in out["overload"] if r["side"] == "server")
    not_ours = sum(o["not_ok"].values()) + o["h2load_reset"]
    rows: list[tuple[str, float, str, float]] = [
        ("Generate c=64 (h2load), server/echo", ratio64, ">=", 0.75),
        ("GenerateStream (best window), server/echo", stream_ratio, ">=", 0.40),
        ("p99 ms at 0.8 of the max Generate rate", at[0.8]["p99_ms"] if 0.8 in at else math.nan, "<=", 20),
        ("overload: calls not OK/RESOURCE_EXHAUSTED", float(not_ours), "<=", 0),
        ("overload goodput / max Generate rate", o["goodput_req_s"] / max(best, 1e-9), ">=", 0.80),
        ("overload p99 ms of the admitted (probe)", o["admitted_p99_ms"], "<=", 25),
        ("overload refusal p99 ms (probe)", o["refusal_p99_ms"], "<=", 5),
        ("overload server RSS growth MB", o["rss_growth_mb"], "<", 50),
    ]
    text = {r["streams"]: r for r in out["text"] if r["side"] == "server"}
    if text:
        rows += [("text TTFT p50 ms (1 stream)", text[1]["ttft_p50_ms"], "<=", 5)]
    result = []
    for name, value, op, bound in rows:
        met = None if math.isnan(value) else value >= bound if op == ">=" else value <= bound if op == "<=" else value < bound
        result.append({"figure": name, "value": value, "target": f"{op} {fmt(float(bound))}", "met": met})
    return result


def print_targets(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    print("targets (issue 11), server under test")
    head = f"{'figure':<46}{'value':>10}  {'target':<12}"
    print(head)
    print("-" * (len(head) + 8))
    for r in rows:
        verdict = "n/a (no sample: e.g. nothing was refused)" if r["met"] is None else "met" if r["met"] else "MISSED"
        print(f"{r['figure']:<46}{fmt(r['value']):>10}  {r['target']:<12}{verdict}")
    judged = [r for r in rows if r["met"] is not None]
    print(f"{sum(r['met'] for r in judged)} of {len(judged)} met", flush=True)
