"""Route a random batch through one MoE layer and describe what happened (``smoe route``)."""

from __future__ import annotations

import torch

from smoe.config import MoEConfig
from smoe.monitor import stats
from smoe.nn.moe import MoELayer

__all__ = ["route_report"]


def route_report(*, hidden_size: int, expert_size: int, num_experts: int, top_k: int,
                 router: str, capacity_factor: float | None, tokens: int, seed: int) -> str:
    """Build a layer from the arguments, route ``tokens`` random tokens, return a text table of
    tokens per expert, dropped tokens and the losses."""
    if tokens < 0:
        raise ValueError(f"tokens={tokens} is invalid: must be >= 0")
    config = MoEConfig(hidden_size=hidden_size, expert_size=expert_size,
                       num_experts=num_experts, top_k=top_k, router=router,
                       capacity_factor=capacity_factor)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = MoELayer(config).eval()
    x = torch.randn(tokens, hidden_size, generator=gen)
    with torch.no_grad():
        _, info = layer(x)
    counts_E = info.tokens_per_expert
    counts = counts_E.tolist()
    total = max(sum(counts), 1)
    lines = [f"router={router} experts={num_experts} top_k={top_k} tokens={tokens} "
             f"capacity={info.capacity if info.capacity is not None else 'dropless'}",
             "expert  tokens  share"]
    for e, n in enumerate(counts):
        lines.append(f"{e:>6}  {n:>6}  {n / total:6.1%}  {'#' * round(40 * n / total)}")
    if sum(counts):
        s = stats.summarize(counts_E)
        lines.append(f"max/mean load: {s.max_over_mean[0]:.3f}  imbalance (max-mean)/mean: "
                     f"{s.imbalance[0]:.3f}  balancedness mean/max: {s.balancedness[0]:.3f}")
        lines.append(f"routing entropy: {s.normalized_entropy[0]:.3f} of ln E  "
                     f"dead experts: {s.dead_experts[0]}")
    else:
        lines.append("max/mean load: n/a")
    lines += [
        f"dropped tokens: {int(info.dropped_tokens)} "
        f"(dropped assignments: {int(info.dropped_assignments)})",
        f"aux loss: {float(info.aux_loss):.6f}  z loss: {float(info.z_loss):.6f}",
    ]
    return "\n".join(lines)
