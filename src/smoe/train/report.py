"""Plain-text reports of an evaluation: losses, bits per byte, the per-expert load table."""

from __future__ import annotations

from typing import Any

__all__ = ["format_load_table", "format_eval", "format_domain_routing"]


def format_load_table(expert_load: list[list[float]], layers: list[int] | None = None) -> str:
    """Layers x experts table of the share of routed assignments each expert took (percent),
    with max/mean per layer (1.00 is perfectly balanced)."""
    if not expert_load:
        return "(no MoE layers)"
    E = len(expert_load[0])
    layers = layers if layers is not None else list(range(len(expert_load)))
    head = "layer " + "".join(f"{'e' + str(e):>6}" for e in range(E)) + "  max/mean"
    lines = [head, "-" * len(head)]
    for i, row in zip(layers, expert_load):
        mean = sum(row) / len(row) if row else 0.0
        ratio = max(row) / mean if mean > 0 else 0.0
        lines.append(f"{i:>5} " + "".join(f"{100 * f:>5.1f}%" for f in row) + f"  {ratio:8.2f}")
    return "\n".join(lines)


def format_domain_routing(domain_routing: dict[str, list[list[int]]],
                          layers: list[int] | None = None) -> str:
    """For each domain, the share of its tokens' assignments each expert took, per layer."""
    lines = []
    for domain, per_layer in domain_routing.items():
        fractions = []
        for counts in per_layer:
            total = sum(counts) or 1
            fractions.append([c / total for c in counts])
        lines.append(f"{domain}:")
        lines.append(format_load_table(fractions, layers))
    return "\n".join(lines)


def format_eval(row: dict[str, Any]) -> str:
    """The evaluation row of :func:`smoe.train.evaluate_model` as a short report."""
    lines = [f"step {row.get('step', '?')}: validation loss {row['val_loss']:.4f} nats/token"
             + (f", {row['val_bpb']:.4f} bits/byte" if "val_bpb" in row else "")
             + f" ({row.get('val_tokens', 0):,} tokens)"]
    for d, loss in row.get("val_loss_by_domain", {}).items():
        bpb = row.get("val_bpb_by_domain", {}).get(d)
        lines.append(f"  {d:<8} loss {loss:.4f}" + (f", {bpb:.4f} bits/byte" if bpb else ""))
    if "val_expert_load" in row:
        lines.append(f"expert load on validation (share of routed tokens; mean max/mean "
                     f"{row['val_load_imbalance']:.2f}):")
        lines.append(format_load_table(row["val_expert_load"], row.get("moe_layers")))
    return "\n".join(lines)
