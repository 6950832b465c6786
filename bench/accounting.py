"""Every plain call of a benchmark point accounted for by its gRPC status, from the servers' metrics.

h2load cannot see grpc-status (a trailer), so the benchmark reads what each side counted: the
server's ``genserve_requests_total`` (admitted calls, by outcome), ``genserve_rejections_total``
(refused before admission) and ``genserve_front_refusals_total`` (refused by its HAProxy front, with
``--front-limit``), the echo's ``genserve_requests_total``; the difference between two
scrapes, around a point, is what that point's calls came to.

A call that got its answer (h2load's "done") and that no counter saw as OK, RESOURCE_EXHAUSTED or
another status of its own was ended outside the application: by grpc core (its backlog's
CANCELLED, issue 11). ``Tally.unseen`` counts those; it must be 0. Calls still open when h2load
stopped (``cut``: started but not done) end when it closes its connections: the side counts those
it had picked up as CANCELLED, and never sees those still in grpc core's backlog.
"""

from __future__ import annotations

import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

Sample = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (metric, sorted labels) -> value
STATUS_COUNTERS = ("genserve_requests_total", "genserve_rejections_total", "genserve_front_refusals_total")  # the last: --front-limit


def parse(text: str) -> Sample:
    out: Sample = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(port: int, timeout_s: float = 5.0) -> Sample:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as response:
        return parse(response.read().decode())


def statuses(sample: Sample, rpc: str = "Generate") -> Counter[str]:
    """Calls of ``rpc`` by status code name, admitted and refused together."""
    out: Counter[str] = Counter()
    for (name, labels), value in sample.items():
        d = dict(labels)
        if name in STATUS_COUNTERS and d.get("rpc") == rpc:
            out[d["code"]] += int(value)
    return out


def front_refusals(sample: Sample) -> int:
    """Calls the server's HAProxy front refused itself (``--front-limit``): no event loop of the server saw them."""
    return int(sum(v for (name, _), v in sample.items() if name == "genserve_front_refusals_total"))


def settled(port: int, timeout_s: float = 5.0, pause_s: float = 0.2) -> Sample:
    """A scrape once the counts stop moving (calls cut at the end of a run finish a moment later)."""
    deadline = time.monotonic() + timeout_s
    last = scrape(port)
    while time.monotonic() < deadline:
        time.sleep(pause_s)
        now = scrape(port)
        if statuses(now) == statuses(last) and now.get(("genserve_inflight_requests", ()), 0.0) == 0.0:
            return now
        last = now
    return last


@dataclass
class Tally:
    """One point's plain calls: how many were sent, and what the side's counters say became of them."""

    sent: int
    done: int  # answered (any status); sent - done were cut when the load generator stopped
    by_status: dict[str, int] = field(default_factory=dict)

    @property
    def seen(self) -> int:
        return sum(self.by_status.values())

    @property
    def cut(self) -> int:
        return self.sent - self.done

    @property
    def unseen(self) -> int:
        """Answered, but not by the application: ended by grpc core. The side's CANCELLED are the cut calls it
        had picked up (the client went away), so they are not answers it gave."""
        return max(0, self.done - (self.seen - self.count("CANCELLED")))

    @property
    def adds_up(self) -> bool:
        """Every status the side counted belongs to a sent call, and every answered call has a status."""
        return self.seen <= self.sent and self.unseen == 0

    def count(self, code: str) -> int:
        return self.by_status.get(code, 0)

    @property
    def other(self) -> dict[str, int]:
        """Statuses other than OK and RESOURCE_EXHAUSTED."""
        return {k: v for k, v in self.by_status.items() if k not in ("OK", "RESOURCE_EXHAUSTED") and v}

    def summary(self) -> dict[str, object]:
        return {"sent": self.sent, "done": self.done, "cut": self.cut, "by_status": dict(self.by_status), "unseen": self.unseen}


def tally(before: Sample, after: Sample, sent: int, done: int, rpc: str = "Generate") -> Tally:
    delta = statuses(after, rpc)
    delta.subtract(statuses(before, rpc))
    return Tally(sent, done, {k: v for k, v in sorted(delta.items()) if v})
