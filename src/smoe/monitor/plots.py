"""Plots of expert load, drawn with matplotlib's object API on the Agg canvas (no pyplot, no
global backend switch); matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_expert_load"]


def _fractions(counts_LE: Sequence[Sequence[float]]) -> list[list[float]]:
    out = []
    for row in counts_LE:
        total = float(sum(row)) or 1.0
        out.append([c / total for c in row])
    return out


def plot_expert_load(expert_load: Sequence[Sequence[float]], path: str | Path, *,
                     layers: Sequence[int] | None = None,
                     domain_routing: dict[str, Sequence[Sequence[float]]] | None = None,
                     title: str | None = None) -> Path:
    """Heatmaps (layers x experts) of the share of routed tokens each expert took, one panel for
    all tokens and, with ``domain_routing`` (``{domain: [[count per expert] per layer]}``), one
    per domain; each cell shows its percentage. Writes a PNG to ``path`` and returns it.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'smoe[plot]'") from exc

    panels = [("all tokens", [list(map(float, r)) for r in expert_load])]
    for domain, counts in (domain_routing or {}).items():
        panels.append((f"{domain} tokens", _fractions(counts)))
    L = len(panels[0][1])
    E = len(panels[0][1][0]) if L else 0
    layers = list(layers) if layers is not None else list(range(L))
    uniform = 1.0 / E if E else 0.0
    vmax = max([max(r) for _, p in panels for r in p] + [2 * uniform])

    fig = Figure(figsize=(1.6 + 0.62 * E * len(panels), 1.4 + 0.5 * L), dpi=120,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (name, data) in zip(axes, panels):
        image = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(E), [f"e{e}" for e in range(E)], fontsize=8)
        ax.set_yticks(range(L), [f"layer {i}" for i in layers], fontsize=8)
        ax.set_xlabel("expert")
        for li, row in enumerate(data):
            for e, f in enumerate(row):
                ax.text(e, li, f"{100 * f:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if f < 0.6 * vmax else "black")
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), shrink=0.9)
        bar.set_label(f"share of routed tokens (uniform = {uniform:.3f})")
    fig.suptitle(title or "Expert load per layer (% of routed tokens)", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
