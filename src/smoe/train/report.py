"""Plain-text reports of an evaluation: losses, bits per byte, the per-expert load table (the
load tables come from :mod:`smoe.monitor.report`; their names stay importable from here)."""

from __future__ import annotations

from typing import Any

from smoe.monitor.report import format_domain_routing, format_load_table

__all__ = ["format_load_table", "format_eval", "format_domain_routing"]


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
