"""Monitoring: routing statistics, plots and reports.

Plotting needs matplotlib (the ``plot`` extra), imported only when a plot is drawn.
"""

from smoe.monitor.plots import plot_expert_load

__all__ = ["plot_expert_load"]
