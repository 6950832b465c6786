"""The report: which requests a fault touched, the checks, and the printed summary."""

from __future__ import annotations

import collections
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tests.chaos.config import DECODE_LOOP, OK, ChaosConfig
from tests.chaos.ledger import Ledger, Req

if TYPE_CHECKING:
    from tests.chaos.faults import Fault, Injector
    from tests.chaos.harness import Monitor


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class ChaosReport:
    seed: int
    duration_s: float
    wall_s: float
    sent: int
    completed: int
    failed: dict[str, int]  # terminal outcomes other than OK, by status (CLIENT_CANCELLED: the client's own)
    lost: int
    duplicates: int
    late: int  # outcome later than its deadline + tolerance, or none (the deadline: see Req.due)
    late_examples: list[str]
    late_by_client_clock: int  # ... counting the deadline from the send instead (info: includes the wait for admission)
    worst_past_deadline_ms: float  # the latest outcome relative to its deadline (negative: all came before)
    admission_delay_ms: dict[str, float]  # send -> admission, as the client saw it
    lost_examples: list[str]
    sent_by_call: dict[str, int]  # "Generate image" etc.
    probes: dict[str, dict[str, int]]  # probe kind -> outcomes
    touched: int
    touched_outcomes: dict[str, int]
    touched_by_fault: dict[str, dict[str, int]]
    untouched: int
    untouched_ok: int
    untouched_success: float
    untouched_failures: dict[str, int]
    untouched_failure_examples: list[str]
    faults: dict[str, int]  # fault kind -> count
    kills_by_stage: dict[str, int]
    kills_skipped: int  # stage had no task at that moment (restarting)
    restarts_injected: int
    restarts_supervisor: int
    restarts_metric: int
    health_after: str
    health_not_serving_samples: int
    health_samples: int
    inflight_after: int
    leftovers: list[str]
    drain_s: float
    post_chaos: dict[str, str]
    rss_start_mb: float
    rss_peak_mb: float
    rss_end_before_gc_mb: float
    rss_end_mb: float  # after gc.collect()
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ok"] = self.ok
        return out


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _classify(ledger: Ledger, faults: list[Fault]) -> None:
    reqs = ledger.reqs
    for fault in faults:
        if fault.window:
            continue
        for id in fault.ids:
            req = reqs.get(id)
            if req is not None:
                req.touched.add(fault.kind)
    windows = [f for f in faults if f.window]
    if windows:
        for req in reqs.values():
            ended = req.ended if req.ended is not None else float("inf")
            for f in windows:  # a failed decode step touches the requests of its model (text or iterative) in flight
                end = f.end if f.end is not None else float("inf")
                if req.model == f.target and req.sent <= end and ended >= f.start:
                    req.touched.add(f.kind)
                    break


def _by_key() -> dict[str, collections.Counter[str]]:
    return collections.defaultdict(collections.Counter)


@dataclass
class _Tally:
    """The books, counted: one pass over every request."""

    late_tolerance_s: float
    failed: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    sent_by: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    probes: dict[str, collections.Counter[str]] = dataclasses.field(default_factory=_by_key)
    touched_outcomes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    touched_by: dict[str, collections.Counter[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    untouched_failures: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    untouched_examples: list[str] = dataclasses.field(default_factory=list)
    late_examples: list[str] = dataclasses.field(default_factory=list)
    lost_examples: list[str] = dataclasses.field(default_factory=list)
    admission: list[float] = dataclasses.field(default_factory=list)
    completed: int = 0
    lost: int = 0
    late: int = 0
    late_client: int = 0
    untouched: int = 0
    untouched_ok: int = 0
    touched: int = 0
    worst: float = -math.inf

    def add(self, r: Req) -> None:
        self.sent_by[f"{r.rpc} {r.kind}"] += 1
        outcome = r.outcome or "LOST"
        if r.outcome is None:
            self.lost += 1
            if len(self.lost_examples) < 5:
                self.lost_examples.append(f"{r.id} ({r.rpc} {r.model}, timeout {r.deadline - r.sent:.3f} s)")
        elif r.outcome == OK:
            self.completed += 1
        else:
            self.failed[r.outcome] += 1
        if r.admitted is not None:
            self.admission.append(r.admitted - r.sent)
        self._deadline(r, outcome)
        if r.probe:
            self.probes[r.probe][outcome] += 1
        elif r.touched:
            self.touched += 1
            self.touched_outcomes[outcome] += 1
            self.touched_by["+".join(sorted(r.touched))][outcome] += 1
        else:
            self.untouched += 1
            if outcome == OK:
                self.untouched_ok += 1
            else:
                self.untouched_failures[outcome] += 1
                if len(self.untouched_examples) < 5:
                    self.untouched_examples.append(f"{r.id} ({r.rpc} {r.model}) {outcome} after {((r.ended or r.deadline) - r.sent):.3f} s")

    def _deadline(self, r: Req, outcome: str) -> None:
        tolerance = self.late_tolerance_s
        if r.ended is not None:
            self.worst = max(self.worst, r.ended - r.due)
            self.late_client += r.ended > r.deadline + tolerance
        if r.ended is None or r.ended > r.due + tolerance:
            self.late += 1
            if len(self.late_examples) < 5:
                past = "never" if r.ended is None else f"{r.ended - r.due:+.3f} s"
                admitted = "never admitted" if r.admitted is None else f"admitted {r.admitted - r.sent:.3f} s after it was sent"
                self.late_examples.append(f"{r.id} ({r.rpc} {r.model}, {outcome}) ended {past} past its deadline; {admitted}")

    @property
    def success(self) -> float:
        return self.untouched_ok / self.untouched if self.untouched else 0.0


def _checks(
    config: ChaosConfig,
    t: _Tally,
    ledger: Ledger,
    injector: Injector,
    client_errors: list[str],
    *,
    drain_s: float,
    inflight_after: int,
    leftovers: list[str],
    health: dict[str, str],
    post: dict[str, str],
    restarts: tuple[int, int, int],
    kinds: dict[str, str],
    rss: tuple[float, float, float, float],
) -> list[Check]:
    faults = collections.Counter(f.kind for f in injector.faults)
    injected, by_supervisor, by_metric = restarts
    rss_start, rss_peak, rss_before_gc, rss_end = rss
    killed_kinds = {kinds[name] for name in injector.kills}
    missing = sorted(set(kinds.values()) - killed_kinds)
    if injector.text_models and not faults["decode-step"]:
        missing.append(DECODE_LOOP)
    return [
        Check("lost == 0", t.lost == 0, f"{t.lost} lost" + (f": {', '.join(t.lost_examples)}" if t.lost_examples else "")),
        Check("one outcome each", ledger.duplicates == 0, f"{ledger.duplicates} duplicates {ledger.duplicate_examples}"),
        Check("none past its deadline", t.late == 0, f"{t.late} later than deadline + {config.late_tolerance_s:g} s {t.late_examples}"),
        Check(
            f"untouched success >= {config.min_untouched_success:.0%}",
            t.untouched > 0 and t.success >= config.min_untouched_success,
            f"{t.untouched_ok}/{t.untouched} = {t.success:.4%} {dict(t.untouched_failures)} {t.untouched_examples}",
        ),
        Check(
            "restarts match the metric",
            injected == by_supervisor == by_metric,
            f"injected {injected}, supervisor {by_supervisor}, genserve_stage_restarts_total {by_metric}",
        ),
        Check("every stage kind faulted", not missing, f"never faulted: {missing}" if missing else "all"),
        Check("image faults fired", not injector.image_models or (faults["forward-error"] > 0 and faults["stall"] > 0), str(dict(faults))),
        Check("drained", inflight_after == 0, f"{inflight_after} in flight {drain_s:.2f} s after the load"),
        Check("nothing left behind", not leftovers, "; ".join(leftovers) or "links empty, stages hold nothing, decode loops idle"),
        Check(
            "clients saw no protocol error",
            not client_errors,
            "; ".join(client_errors[:5]) or "credits all returned on every closed stream",
        ),
        Check("health SERVING", all(v == "SERVING" for v in health.values()), str(health)),
        Check("serves after", all(v == OK for v in post.values()), str(post)),
        Check(
            f"server memory peak within +{config.memory_peak_mb:g} MB",
            rss_peak <= rss_start + config.memory_peak_mb,
            f"start {rss_start:.0f} MB, peak {rss_peak:.0f} MB ({rss_peak - rss_start:+.0f} MB)",
        ),
        Check(
            f"server memory at the end within +{config.memory_end_mb:g} MB, before gc.collect()",
            rss_before_gc <= rss_start + config.memory_end_mb,
            f"start {rss_start:.0f} MB, end {rss_before_gc:.0f} MB ({rss_before_gc - rss_start:+.0f} MB), "
            f"{rss_end:.0f} MB after gc.collect()",
        ),
    ]


def build_report(
    config: ChaosConfig,
    ledger: Ledger,
    injector: Injector,
    client_errors: list[str],
    monitor: Monitor,
    *,
    wall: float,
    drain_s: float,
    inflight_after: int,
    leftovers: list[str],
    health: dict[str, str],
    post: dict[str, str],
    restarts: tuple[int, int, int],
    kinds: dict[str, str],
    rss: tuple[float, float, float, float],
) -> ChaosReport:
    _classify(ledger, injector.faults)
    reqs = list(ledger.reqs.values())
    t = _Tally(config.late_tolerance_s)
    for r in reqs:
        t.add(r)
    checks = _checks(
        config,
        t,
        ledger,
        injector,
        client_errors,
        drain_s=drain_s,
        inflight_after=inflight_after,
        leftovers=leftovers,
        health=health,
        post=post,
        restarts=restarts,
        kinds=kinds,
        rss=rss,
    )
    faults = collections.Counter(f.kind for f in injector.faults)
    injected, by_supervisor, by_metric = restarts
    rss_start, rss_peak, rss_before_gc, rss_end = rss
    return ChaosReport(
        seed=config.seed,
        duration_s=config.duration_s,
        wall_s=wall,
        sent=len(reqs),
        completed=t.completed,
        failed=dict(t.failed.most_common()),
        lost=t.lost,
        duplicates=ledger.duplicates,
        late=t.late,
        late_examples=t.late_examples,
        late_by_client_clock=t.late_client,
        worst_past_deadline_ms=1000 * t.worst if reqs else 0.0,
        admission_delay_ms={
            "p50": 1000 * _quantile(t.admission, 0.5),
            "p99": 1000 * _quantile(t.admission, 0.99),
            "max": 1000 * max(t.admission, default=0.0),
        },
        lost_examples=t.lost_examples,
        sent_by_call=dict(sorted(t.sent_by.items())),
        probes={k: dict(v.most_common()) for k, v in sorted(t.probes.items())},
        touched=t.touched,
        touched_outcomes=dict(t.touched_outcomes.most_common()),
        touched_by_fault={k: dict(v.most_common()) for k, v in sorted(t.touched_by.items())},
        untouched=t.untouched,
        untouched_ok=t.untouched_ok,
        untouched_success=t.success,
        untouched_failures=dict(t.untouched_failures.most_common()),
        untouched_failure_examples=t.untouched_examples,
        faults=dict(sorted(faults.items())),
        kills_by_stage=dict(sorted(injector.kills.items())),
        kills_skipped=injector.kills_skipped,
        restarts_injected=injected,
        restarts_supervisor=by_supervisor,
        restarts_metric=by_metric,
        health_after=",".join(f"{k or '(server)'}={v}" for k, v in health.items()),
        health_not_serving_samples=monitor.not_serving,
        health_samples=monitor.health_samples,
        inflight_after=inflight_after,
        leftovers=leftovers,
        drain_s=drain_s,
        post_chaos=post,
        rss_start_mb=rss_start,
        rss_peak_mb=rss_peak,
        rss_end_before_gc_mb=rss_before_gc,
        rss_end_mb=rss_end,
        checks=checks,
    )


def format_report(r: ChaosReport) -> str:
    def counts(d: dict[str, int] | dict[str, str]) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"

    rows = [
        ("duration", f"{r.duration_s:g} s of chaos, {r.wall_s:.1f} s in all (seed {r.seed})"),
        ("requests sent", f"{r.sent}  ({counts(r.sent_by_call)})"),
        ("completed (OK)", str(r.completed)),
        ("failed, by status", counts(r.failed)),
        ("lost", str(r.lost)),
        ("duplicate outcomes", str(r.duplicates)),
        (
            "past deadline",
            f"{r.late}; latest {r.worst_past_deadline_ms:+.0f} ms from its deadline; from the send: {r.late_by_client_clock} late",
        ),
        ("admission delay", ", ".join(f"{k} {v:.1f} ms" for k, v in r.admission_delay_ms.items())),
        ("deadline probes", counts(r.probes.get("deadline", {}))),
        ("cancelled by client", counts(r.probes.get("cancel", {}))),
        ("touched by a fault", f"{r.touched}: {counts(r.touched_outcomes)}"),
        *((f"  by {kind}", counts(outcomes)) for kind, outcomes in r.touched_by_fault.items()),
        ("untouched succeeded", f"{r.untouched_ok}/{r.untouched} = {r.untouched_success:.3%}  failures: {counts(r.untouched_failures)}"),
        ("faults injected", counts(r.faults)),
        ("kills by stage", f"{counts(r.kills_by_stage)} (skipped: {r.kills_skipped})"),
        ("stages restarted", f"injected {r.restarts_injected}, supervisor {r.restarts_supervisor}, metric {r.restarts_metric}"),
        ("health", f"after: {r.health_after}; during: {r.health_samples - r.health_not_serving_samples}/{r.health_samples} SERVING"),
        ("drain", f"{r.inflight_after} in flight after {r.drain_s:.2f} s; then {counts(r.post_chaos)}"),
        (
            "server memory (RSS)",
            f"start {r.rss_start_mb:.0f} MB, peak {r.rss_peak_mb:.0f} MB, "
            f"end {r.rss_end_before_gc_mb:.0f} MB, {r.rss_end_mb:.0f} MB after gc.collect()",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines += [f"{'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}" for c in r.checks]
    lines.append("chaos: " + ("every check passed" if r.ok else "FAILED"))
    return "\n".join(lines)
