"""The server's per-request metrics: plain numbers on the loop, the same exposition as prometheus_client's own."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from server.metrics import LATENCY_BUCKETS, Metrics, RequestTally


def test_the_tally_exposes_what_a_counter_and_a_histogram_would() -> None:
    """Same names, labels, buckets (a value on a bound counts in that bound's bucket), counts and
    sums as prometheus_client's Counter and Histogram fed the same outcomes (less their _created)."""
    stock = CollectorRegistry()
    histogram = Histogram(
        "genserve_request_seconds", "Time from admission to the terminal outcome", ["model", "rpc"], buckets=LATENCY_BUCKETS, registry=stock
    )
    counter = Counter("genserve_requests_total", "Finished requests by outcome", ["model", "rpc", "code"], registry=stock)
    ours = CollectorRegistry()
    tally = RequestTally()
    ours.register(tally)
    rng = random.Random(1)
    for _ in range(2000):
        seconds = rng.choice([*LATENCY_BUCKETS, 0.0, 0.0004, 0.0049, 31.0, rng.random(), rng.random() * 40])
        model, rpc, code = (
            rng.choice(["vae", "gan"]),
            rng.choice(["Generate", "GenerateStream"]),
            rng.choice(["OK", "CANCELLED", "DEADLINE_EXCEEDED"]),
        )
        histogram.labels(model, rpc).observe(seconds)
        counter.labels(model, rpc, code).inc()
        tally.finished(model, rpc, code, seconds)
    want = sorted(line for line in generate_latest(stock).decode().splitlines() if "_created" not in line)
    assert sorted(generate_latest(ours).decode().splitlines()) == want
    assert tally.count("vae", "Generate", "OK") == ours.get_sample_value(
        "genserve_requests_total", {"model": "vae", "rpc": "Generate", "code": "OK"}
    )


def test_the_servers_registry_serves_the_tally() -> None:
    metrics = Metrics()
    assert metrics.registry.get_sample_value("genserve_requests_total", {"model": "vae", "rpc": "Generate", "code": "OK"}) is None
    metrics.requests.finished("vae", "Generate", "OK", 0.003)
    labels = {"model": "vae", "rpc": "Generate"}
    assert metrics.registry.get_sample_value("genserve_requests_total", labels | {"code": "OK"}) == 1
    assert metrics.registry.get_sample_value("genserve_request_seconds_bucket", labels | {"le": "0.002"}) == 0
    assert metrics.registry.get_sample_value("genserve_request_seconds_bucket", labels | {"le": "0.005"}) == 1
    assert metrics.registry.get_sample_value("genserve_request_seconds_count", labels) == 1
