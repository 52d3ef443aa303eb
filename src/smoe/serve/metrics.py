"""The server's Prometheus metrics (its own registry, exposed at ``/metrics``) and the recent
latencies the dashboard shows as percentiles.

Names (``smoe_`` prefix): ``requests_total{endpoint,status}``, histograms
``time_to_first_token_seconds``, ``inter_token_latency_seconds``,
``e2e_request_latency_seconds`` (p50/p90/p99 via ``histogram_quantile``), counters
``prompt_tokens_total`` and ``generation_tokens_total``, gauges ``queue_depth`` (waiting for a
slot), ``running_requests`` (the running batch), ``generation_tokens_per_second`` (last 10 s),
plus the routing monitor's series (:mod:`smoe.monitor.prometheus`).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

__all__ = ["ServerMetrics", "percentile"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                    2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between order statistics."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


class ServerMetrics:
    def __init__(self, worker: Any, monitor: Any = None, *, detail: str = "expert",
                 recent: int = 2048) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("smoe_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("smoe_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("smoe_inter_token_latency_seconds", "Time between tokens of a "
                             "request", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("smoe_e2e_request_latency_seconds", "Request latency, arrival to "
                             "last token", buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("smoe_prompt_tokens", "Prompt tokens", registry=r)
        self.gen_tokens = Counter("smoe_generation_tokens", "Generated tokens", registry=r)
        Gauge("smoe_queue_depth", "Requests waiting for a slot", registry=r).set_function(
            lambda: worker.engine.num_waiting)
        Gauge("smoe_running_requests", "Requests in the running batch",
              registry=r).set_function(lambda: worker.engine.num_running)
        Gauge("smoe_generation_tokens_per_second", "Generated tokens per second over the last "
              "10 s", registry=r).set_function(worker.tokens_per_second)
        if monitor is not None:
            from smoe.monitor.prometheus import RoutingCollector

            r.register(RoutingCollector(monitor, detail=detail))
        self._lock = threading.Lock()
        self.recent = {k: deque(maxlen=recent) for k in ("ttft", "itl", "e2e")}

    def observe(self, kind: str, seconds: float) -> None:
        {"ttft": self.ttft, "itl": self.itl, "e2e": self.e2e}[kind].observe(seconds)
        with self._lock:
            self.recent[kind].append(seconds)

    def percentiles(self) -> dict[str, dict[str, float | None]]:
        with self._lock:
            recent = {k: list(v) for k, v in self.recent.items()}
        return {k: {f"p{q}": percentile(v, q) for q in (50, 90, 99)}
                for k, v in recent.items()}

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
