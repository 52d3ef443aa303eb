"""Plain-text reports of an evaluation, kept importable from here: ``format_eval`` lives in
:mod:`smoe.evaluation`, the load tables in :mod:`smoe.monitor.report`."""

from __future__ import annotations

from smoe.evaluation import format_eval
from smoe.monitor.report import format_domain_routing, format_load_table

__all__ = ["format_load_table", "format_eval", "format_domain_routing"]
