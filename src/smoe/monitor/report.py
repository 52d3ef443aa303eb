"""Text tables and the offline HTML report of routing statistics.

The trainer's evaluation report, ``smoe eval``, ``smoe route`` and ``smoe monitor`` print these
tables; :func:`write_html_report` is what ``smoe monitor RUN`` writes (a single self-contained
HTML file with the PNG figures embedded, so it can be mailed or archived as one file).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from smoe.monitor import stats

__all__ = ["format_load_table", "format_domain_routing", "format_summary", "format_alerts",
           "write_html_report"]


def format_load_table(expert_load: Sequence[Sequence[float]],
                      layers: Sequence[Any] | None = None) -> str:
    """Layers x experts table of the share of routed assignments each expert took (percent),
    with max/mean per layer (1.00 is perfectly balanced). ``expert_load`` holds shares or
    counts (each row is normalized by its max/mean only, so both read the same)."""
    if not expert_load:
        return "(no MoE layers)"
    E = len(expert_load[0])
    layers = list(layers) if layers is not None else list(range(len(expert_load)))
    ratios = stats.max_over_mean(torch.tensor([list(map(float, r)) for r in expert_load],
                                              dtype=torch.float64)).tolist()
    head = "layer " + "".join(f"{'e' + str(e):>6}" for e in range(E)) + "  max/mean"
    lines = [head, "-" * len(head)]
    for i, row, ratio in zip(layers, expert_load, ratios):
        lines.append(f"{i!s:>5} " + "".join(f"{100 * f:>5.1f}%" for f in row)
                     + f"  {ratio:8.2f}")
    return "\n".join(lines)


def format_domain_routing(domain_routing: dict[str, Sequence[Sequence[int]]],
                          layers: Sequence[Any] | None = None) -> str:
    """For each domain, the share of its tokens' assignments each expert took, per layer."""
    lines = []
    for domain, per_layer in domain_routing.items():
        lines.append(f"{domain}:")
        lines.append(format_load_table(stats.shares(torch.tensor(per_layer)).tolist(), layers))
    return "\n".join(lines)


def format_summary(counts_LE: torch.Tensor, layers: Sequence[Any] | None = None,
                   drift_L: Sequence[float] | None = None) -> str:
    """One line per layer: assignments, max/mean, imbalance (TensorRT-LLM), balancedness
    (SGLang), coefficient of variation, normalized entropy, dead experts (and drift)."""
    s = stats.summarize(counts_LE)
    L = len(s.assignments)
    layers = list(layers) if layers is not None else list(range(L))
    head = (f"{'layer':>12} {'assign':>9} {'max/mean':>9} {'imbal':>7} {'balanced':>9} "
            f"{'cv':>6} {'entropy':>8} {'dead':>5}" + (f" {'drift':>7}" if drift_L else ""))
    lines = [head, "-" * len(head)]
    for li in range(L):
        line = (f"{layers[li]!s:>12} {s.assignments[li]:>9} {s.max_over_mean[li]:>9.3f} "
                f"{s.imbalance[li]:>7.3f} {s.balancedness[li]:>9.3f} {s.cv[li]:>6.3f} "
                f"{s.normalized_entropy[li]:>8.3f} {s.dead_experts[li]:>5}")
        if drift_L:
            line += f" {drift_L[li]:>7.4f}"
        lines.append(line)
    return "\n".join(lines)


def format_alerts(alerts: Sequence[Any]) -> str:
    """One line per alert (``window N [kind] message``), or "(no alerts)"."""
    if not alerts:
        return "(no alerts)"
    return "\n".join(f"window {a.window:>4} [{a.kind}] {a.message}" for a in alerts)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def write_html_report(path: str | Path, monitor: Any, *, title: str = "smoe routing report",
                      notes: Sequence[str] = ()) -> Path:
    """A self-contained HTML report of ``monitor`` (a :class:`RoutingMonitor`): the load
    heatmap, the figures per layer, imbalance and drift per window, and the alerts. Writes the
    PNGs beside it too (``<stem>_load.png``, ``<stem>_windows.png``), all atomically."""
    from smoe._io import atomic_write_bytes
    from smoe.monitor.plots import plot_expert_load, plot_windows

    path = Path(path)
    counts_LE = monitor.counts().cpu()
    load_png = plot_expert_load(stats.shares(counts_LE).tolist(),
                                path.with_name(f"{path.stem}_load.png"),
                                layers=monitor.layer_names, title=title)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    parts += [f"<p>{monitor.total_tokens:,} tokens through {len(monitor.layer_names)} MoE "
              f"layers of {monitor.num_experts} experts; {len(monitor.windows)} windows.</p>",
              _img(load_png), "<h2>Per layer</h2>",
              f"<pre>{html.escape(format_summary(counts_LE, monitor.layer_names, monitor.drift()))}"
              "</pre>"]
    if len(monitor.windows) > 1:
        win_png = plot_windows(list(monitor.windows), path.with_name(f"{path.stem}_windows.png"),
                               layers=monitor.layer_names)
        parts += ["<h2>Over windows</h2>", _img(win_png)]
    parts += ["<h2>Alerts</h2>", f"<pre>{html.escape(format_alerts(monitor.alerts))}</pre>"]
    body = "\n".join(parts)
    doc = (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>body{{font-family:sans-serif;margin:2em}}img{{max-width:100%}}"
           f"</style></head><body>\n{body}\n</body></html>\n")
    return atomic_write_bytes(path, doc.encode("utf-8"))
