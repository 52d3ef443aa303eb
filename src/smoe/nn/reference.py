"""The slow, obviously correct MoE layer that every fast path is held equal to.

Legend: T tokens, D hidden, E experts.

Capacity is applied by a Python walk over (token, slot) pairs in priority order
(:func:`~smoe.nn.dispatch.plan_assignments_reference`); every expert runs on every token through
its per-expert forward (``experts.expert_forward``); a dense [T, E] weight matrix combines the
outputs. Quadratic in nothing but obviously O(T*E) work: for tests and small debugging runs.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe.nn.dispatch import Assignments, plan_assignments_reference
from smoe.nn.router import RouterOutput

__all__ = ["reference_routed", "moe_reference"]


def reference_routed(x_TD: torch.Tensor, route: RouterOutput, experts: nn.Module, *,
                     capacity: int | None,
                     weights_on_input: bool) -> tuple[torch.Tensor, Assignments]:
    """The routed part, with the dispatcher's call signature: (out_TD, plan)."""
    T, E = x_TD.shape[0], route.logits_TE.shape[-1]
    plan = plan_assignments_reference(route, E, capacity)
    weight_TE = x_TD.new_zeros(T, E, dtype=plan.weight_A.dtype).index_put(
        (plan.token_A, plan.expert_A), plan.weight_A, accumulate=True)
    chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TD.device)
    chosen_TE[plan.token_A, plan.expert_A] = True
    out_TD = torch.zeros_like(x_TD)
    for e in range(E):
        w_T1 = weight_TE[:, e:e + 1].to(x_TD.dtype)
        mask_T1 = chosen_TE[:, e:e + 1].to(x_TD.dtype)
        if weights_on_input:
            y = experts.expert_forward(x_TD * w_T1, e) * mask_T1
        else:
            y = experts.expert_forward(x_TD, e) * w_T1
        out_TD = out_TD + y
    return out_TD, plan


def moe_reference(layer: nn.Module, x_TD: torch.Tensor) -> tuple[torch.Tensor, Assignments]:
    """``layer``'s whole forward on x_TD the slow way (router, reference routed part, shared
    experts): (out_TD, plan). A training-mode noisy router draws noise, so reseed the RNG
    before comparing with the fast path."""
    cfg = layer.config
    route = layer.router(x_TD)
    capacity = None if cfg.dropless else cfg.capacity(x_TD.shape[0])
    out_TD, plan = reference_routed(x_TD, route, layer.experts, capacity=capacity,
                                    weights_on_input=cfg.weights_on_input)
    shared_TD = layer.shared_forward(x_TD)
    return (out_TD if shared_TD is None else out_TD + shared_TD), plan
