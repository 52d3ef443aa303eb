"""Plots of expert load, drawn with matplotlib's object API on the Agg canvas (no pyplot, no
global backend switch); matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_expert_load", "plot_windows"]


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
    panels = [("all tokens", [list(map(float, r)) for r in expert_load])]
    for domain, counts in (domain_routing or {}).items():
        panels.append((f"{domain} tokens", _fractions(counts)))
    L = len(panels[0][1])
    E = len(panels[0][1][0]) if L else 0
    layers = list(layers) if layers is not None else list(range(L))
    uniform = 1.0 / E if E else 0.0
    vmax = max([max(r) for _, p in panels for r in p] + [2 * uniform])

    fig = _figure((1.6 + 0.62 * E * len(panels), 1.4 + 0.5 * L))
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
    return _save(fig, path)


def _figure(figsize: tuple[float, float]):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'smoe[plot]'") from exc
    fig = Figure(figsize=figsize, dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    """PNG bytes rendered in memory, then written atomically."""
    import io

    from smoe._io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(Path(path), buf.getvalue())


def plot_windows(windows: Sequence, path: str | Path, *,
                 layers: Sequence | None = None) -> Path:
    """Imbalance ((max - mean) / mean), normalized routing entropy and drift (JS divergence
    from the reference, bits) per layer over a monitor's closed windows
    (:class:`~smoe.monitor.recorder.WindowRecord`). Writes a PNG to ``path``."""
    fig = _figure((9.0, 6.5))
    axes = fig.subplots(3, 1, sharex=True)
    x = [w.index for w in windows]
    L = len(windows[0].drift_L) if windows else 0
    names = list(layers) if layers is not None else list(range(L))
    series = [("imbalance (max-mean)/mean", lambda w, i: w.summary.imbalance[i]),
              ("entropy / ln E", lambda w, i: w.summary.normalized_entropy[i]),
              ("drift (JS, bits)", lambda w, i: w.drift_L[i])]
    for ax, (label, get) in zip(axes, series):
        for i in range(L):
            ax.plot(x, [get(w, i) for w in windows], label=f"layer {names[i]}", linewidth=1.2)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("window")
    if L <= 12:
        axes[0].legend(fontsize=7, ncol=min(L, 6))
    fig.suptitle("Routing over windows", fontsize=11)
    return _save(fig, path)
