"""Prometheus exposition of a :class:`~smoe.monitor.recorder.RoutingMonitor`.

A custom collector (``prometheus_client``'s collector protocol): nothing is kept twice, the
figures are read from the monitor when Prometheus scrapes. Series, with ``prefix="smoe"``:

- ``smoe_expert_tokens_total{layer,expert}`` (detail ``expert`` only): cumulative assignments
  per expert: the per-expert counters no mainline serving engine exports.
- ``smoe_layer_tokens_total{layer}``, ``smoe_dropped_tokens_total{layer}``.
- gauges per layer over the last closed window (the open window until one closes):
  ``smoe_expert_imbalance_ratio`` ((max - mean) / mean, TensorRT-LLM),
  ``smoe_expert_balancedness`` (mean / max, SGLang), ``smoe_expert_load_cv``,
  ``smoe_routing_entropy`` (normalized, 1 uniform), ``smoe_dead_experts``, ``smoe_routing_drift``
  (Jensen-Shannon divergence from the reference, bits) and ``smoe_expert_max_share``.
- ``smoe_routing_alerts_total{kind}``.

Cardinality is bounded: detail ``expert`` exports L x E + 9 L + 3 series, and falls back to
``summary`` (9 L + 3, no per-expert series) when L x E exceeds ``max_expert_series``, as vLLM's
per-expert metrics discussion found necessary (61 layers x 72 GPUs would be 4,392 series).
"""

from __future__ import annotations

from typing import Any

from smoe.monitor import stats

__all__ = ["RoutingCollector", "DETAILS"]

DETAILS = ("expert", "summary")
ALERT_KINDS = ("hot_spot", "collapse", "drift")


class RoutingCollector:
    """``REGISTRY.register(RoutingCollector(monitor))`` exports the monitor's figures."""

    def __init__(self, monitor: Any, *, detail: str = "expert", prefix: str = "smoe",
                 max_expert_series: int = 4096) -> None:
        if detail not in DETAILS:
            raise ValueError(f"detail={detail!r} must be one of {DETAILS}")
        if max_expert_series < 0:
            raise ValueError(f"max_expert_series={max_expert_series!r} must be >= 0")
        self.monitor = monitor
        self.detail = detail
        self.prefix = prefix
        self.max_expert_series = max_expert_series

    @property
    def per_expert(self) -> bool:
        m = self.monitor
        return (self.detail == "expert"
                and len(m.layer_names) * m.num_experts <= self.max_expert_series)

    def describe(self) -> list:
        return []  # registering must not read the model; names are checked at collect time

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m, p = self.monitor, self.prefix
        names = list(m.layer_names)
        counts_LE = m.counts().cpu()
        dropped_L = m.dropped_tokens().cpu().tolist()
        window = m.windows[-1] if m.windows else None
        recent_LE = window.counts_LE if window is not None else m.window_counts().cpu()
        drift_L = window.drift_L if window is not None else [0.0] * len(names)
        s = stats.summarize(recent_LE) if names else None

        if self.per_expert and names:
            c = CounterMetricFamily(f"{p}_expert_tokens", "Routed (token, expert) assignments "
                                    "per layer and expert since start", labels=["layer", "expert"])
            for li, row in enumerate(counts_LE.tolist()):
                for e, v in enumerate(row):
                    c.add_metric([names[li], str(e)], v)
            yield c
        layer_tok = CounterMetricFamily(f"{p}_layer_tokens", "Routed assignments per layer",
                                        labels=["layer"])
        drop = CounterMetricFamily(f"{p}_dropped_tokens", "Tokens that got no expert",
                                   labels=["layer"])
        for li, name in enumerate(names):
            layer_tok.add_metric([name], float(counts_LE[li].sum()))
            drop.add_metric([name], float(dropped_L[li]))
        yield layer_tok
        yield drop
        if s is not None:
            max_share = stats.shares(recent_LE).max(dim=-1).values.tolist()
            gauges = [
                ("expert_imbalance_ratio", "(max - mean) / mean expert load, recent window "
                 "(TensorRT-LLM's imbalance ratio)", s.imbalance),
                ("expert_balancedness", "mean / max expert load, recent window (SGLang)",
                 s.balancedness),
                ("expert_load_cv", "coefficient of variation of expert load, recent window",
                 s.cv),
                ("routing_entropy", "routing entropy / ln E, recent window (1 = uniform)",
                 s.normalized_entropy),
                ("dead_experts", "experts with no token in the recent window",
                 s.dead_experts),
                ("routing_drift", "Jensen-Shannon divergence (bits) of the recent window "
                 "from the reference", drift_L),
                ("expert_max_share", "largest expert's share of the layer, recent window",
                 max_share),
            ]
            for name, doc, values in gauges:
                g = GaugeMetricFamily(f"{p}_{name}", doc, labels=["layer"])
                for li, lname in enumerate(names):
                    g.add_metric([lname], float(values[li]))
                yield g
        alerts = CounterMetricFamily(f"{p}_routing_alerts", "Routing alerts fired",
                                     labels=["kind"])
        by_kind = dict.fromkeys(ALERT_KINDS, 0)
        for a in list(m.alerts):
            by_kind[a.kind] = by_kind.get(a.kind, 0) + 1
        for kind, n in by_kind.items():
            alerts.add_metric([kind], n)
        yield alerts
