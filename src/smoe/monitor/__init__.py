"""Monitoring: the routing recorder, load statistics, alerts, reports, plots and Prometheus.

    from smoe.monitor import RoutingMonitor
    monitor = RoutingMonitor(window_tokens=4096).attach(model.moe_layers())
    # or .attach(smoe.hf.patched_layers(hf_model))

:mod:`smoe.monitor.stats` holds the only implementation of the load figures (shares, max/mean,
imbalance, balancedness, CV, entropy, dead experts, Jensen-Shannon drift). Plotting needs
matplotlib (the ``plot`` extra) and the collector ``prometheus_client`` (the ``serve`` extra),
both imported only when used.
"""

from smoe.monitor import stats
from smoe.monitor.plots import plot_expert_load, plot_windows
from smoe.monitor.recorder import Alert, AlertConfig, RoutingMonitor, WindowRecord
from smoe.monitor.report import (format_alerts, format_domain_routing, format_load_table,
                                 format_summary, write_html_report)

__all__ = ["RoutingMonitor", "AlertConfig", "Alert", "WindowRecord", "stats",
           "plot_expert_load", "plot_windows", "format_load_table", "format_domain_routing",
           "format_summary", "format_alerts", "write_html_report"]
