"""Prometheus metrics of one server (its own registry, so several servers can share a process)."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from engine.logs import dropped_lines

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class RequestTally:
    """``genserve_requests_total`` (finished requests by outcome) and ``genserve_request_seconds``
    (admission to outcome), kept as plain numbers by the event loop's thread and made into metric
    families at scrape time (a collector, as prometheus_client's docs describe for custom ones).

    Why not a Counter and a Histogram: every finished request updates both, on the event loop, and
    their locked values cost several times these plain numbers. Only the loop's thread writes; a scrape
    (another thread) reads copies made in one step each, so it may see an outcome counted a moment
    before its latency, never a count that goes back."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str], int] = {}
        self._latency: dict[tuple[str, str], tuple[list[int], list[float]]] = {}  # per bucket (and +Inf), [sum]

    def finished(self, model: str, rpc: str, code: str, seconds: float) -> None:
        key = (model, rpc, code)
        self._counts[key] = self._counts.get(key, 0) + 1
        latency = self._latency.get((model, rpc))
        if latency is None:
            latency = self._latency[(model, rpc)] = ([0] * (len(LATENCY_BUCKETS) + 1), [0.0])
        latency[0][bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the first bound >= seconds, as Histogram.observe
        latency[1][0] += seconds

    def count(self, model: str, rpc: str, code: str) -> int:
        return self._counts.get((model, rpc, code), 0)

    def collect(self) -> list[Metric]:
        requests = CounterMetricFamily("genserve_requests_total", "Finished requests by outcome", labels=["model", "rpc", "code"])
        for (model, rpc, code), n in list(self._counts.items()):
            requests.add_metric([model, rpc, code], n)
        latency = HistogramMetricFamily("genserve_request_seconds", "Time from admission to the terminal outcome", labels=["model", "rpc"])
        for (model, rpc), (counts, total) in list(self._latency.items()):
            seen, buckets = 0, []
            for bound, n in zip((*LATENCY_BUCKETS, math.inf), list(counts), strict=True):
                seen += n
                buckets.append((floatToGoString(bound), seen))  # type: ignore[no-untyped-call]
            latency.add_metric([model, rpc], buckets, total[0])
        return [requests, latency]


class LogDrops:
    """``genserve_log_lines_dropped_total``: log lines this process could not write (engine/logs.py SafeSink)."""

    def collect(self) -> list[Metric]:
        return [CounterMetricFamily("genserve_log_lines_dropped_total", "Log lines lost to a failing log sink", value=dropped_lines())]


StepStats = Callable[[], list[tuple[str, int, int]]]  # (model, steps run, active requests) per iterative model's batch


class StepLoops:
    """The iterative models' step batches, read at scrape time: steps run (rate() gives steps/s) and
    the requests advancing in each."""

    def __init__(self) -> None:
        self.source: StepStats | None = None  # the engine's, once it exists

    def collect(self) -> list[Metric]:
        steps = CounterMetricFamily("genserve_model_steps_total", "Steps run by an iterative model's step batch", labels=["model"])
        active = GaugeMetricFamily(
            "genserve_step_active_requests", "Requests advancing in an iterative model's step batch", labels=["model"]
        )
        for model, run, now in self.source() if self.source is not None else []:
            steps.add_metric([model], run)
            active.add_metric([model], now)
        return [steps, active]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("genserve_queue_depth", "Items waiting in a link, by the stage that reads it", ["stage"], registry=r)
        self.inflight = Gauge("genserve_inflight_requests", "Accepted requests not yet finished", registry=r)
        self.ready = Gauge("genserve_ready", "1 while the server admits new work", registry=r)
        self.batch_size = Histogram("genserve_batch_size", "Samples per image forward pass", ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram(
            "genserve_batch_seconds", "Time of one image batch on the engine", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.requests = RequestTally()  # genserve_requests_total and genserve_request_seconds
        r.register(self.requests)
        self.rejections = Counter("genserve_rejections_total", "Requests refused before admission", ["rpc", "code"], registry=r)
        self.overload_refusals = Counter(
            "genserve_overload_refusals_total",
            "Requests refused for overload, by reason (delay: jobs queue; arrival: calls wait for a handler; count; "
            "limit: calls in progress; start: a text model's requests wait for their first token)",
            ["reason"],
            registry=r,
        )
        self.queue_delay = Gauge(
            "genserve_queue_delay_seconds", "Latest queueing delay seen by admission (an image job's wait)", registry=r
        )
        self.loop_busy = Gauge(
            "genserve_loop_busy_ratio",
            "Share of the latest 20 ms the event loop's thread was on a CPU (near 1: this process's loop is the limit)",
            registry=r,
        )
        self.restarts = Counter("genserve_stage_restarts_total", "Stage restarts by the supervisor", ["stage"], registry=r)
        self.tokens = Counter("genserve_tokens_total", "Tokens generated", ["model"], registry=r)
        self.samples = Counter("genserve_samples_total", "Image samples generated", ["model"], registry=r)
        self.model_loads = Counter(
            "genserve_model_loads_total", "Model files loaded at run time, by result (loaded, refused)", ["result"], registry=r
        )
        self.model_versions = Gauge("genserve_model_versions", "Versions served per model", ["model"], registry=r)
        r.register(LogDrops())
        self.step_loops = StepLoops()
        r.register(self.step_loops)

    def track_depth(self, stage: str, depth: Callable[[], float]) -> None:
        """Read a link's depth at scrape time (no cost on the hot path)."""
        self.queue_depth.labels(stage).set_function(depth)

    def serve(self, host: str, port: int) -> Callable[[], None]:
        """Expose /metrics on a background thread (prometheus_client's own HTTP server); returns its stop."""
        httpd, thread = start_http_server(port, addr=host, registry=self.registry)

        def stop() -> None:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)

        return stop
