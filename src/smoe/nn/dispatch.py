"""Dispatch: turn a router's decision into expert-sorted assignments, and back.

Legend: T tokens, D hidden, E experts, K slots per token, A assignments (token, expert, weight)
kept after capacity; ``*_A`` tensors are sorted by expert so each expert's rows are contiguous.

The cost of dispatch grows with A = T*K (or E*C for expert choice), never with T*E: there is no
one-hot tensor over experts and no Python loop over tokens or experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smoe.nn.router import RouterOutput

__all__ = ["Assignments", "plan_assignments", "plan_assignments_reference", "combine"]


@dataclass
class Assignments:
    """Expert-sorted (token, expert, weight) triples that survive capacity.

    token_A: which token each row comes from; weight_A: its router weight (float32);
    counts_E: rows per expert (so expert e owns rows offsets[e-1]:offsets[e]);
    expert_A: the expert of each row (sorted ascending);
    dropped_tokens: tokens left with no expert (0-d LongTensor);
    dropped_assignments: (token, expert) pairs removed by capacity (0-d LongTensor);
    capacity: per-expert capacity, or None when dropless.
    """

    token_A: torch.Tensor
    expert_A: torch.Tensor
    weight_A: torch.Tensor
    counts_E: torch.Tensor
    dropped_tokens: torch.Tensor
    dropped_assignments: torch.Tensor
    capacity: int | None


def _count_uncovered(token_A: torch.Tensor, num_tokens: int) -> torch.Tensor:
    covered_T = torch.zeros(num_tokens, dtype=torch.bool, device=token_A.device)
    covered_T[token_A] = True
    return (~covered_T).sum()


def plan_assignments(route: RouterOutput, num_experts: int, capacity: int | None) -> Assignments:
    """The vectorised plan: sort by expert; in capacity modes keep each expert's first
    ``capacity`` rows in priority order (see below) and drop the rest.

    Priority (capacity modes, token choice): a token's first choice beats any second choice
    (slot order), then a higher router weight wins, then the earlier token: batch-prioritised
    routing (Riquelme et al. 2021, arXiv 2106.05974) applied per slot, deterministic.
    """
    if not route.token_choice:
        return _plan_expert_choice(route, num_experts)
    experts_TK, weights_TK = route.experts_TK, route.weights_TK
    T, K = experts_TK.shape
    device = experts_TK.device
    expert_flat = experts_TK.reshape(-1)
    zero = torch.zeros((), dtype=torch.long, device=device)
    if capacity is None:
        order_A = torch.argsort(expert_flat, stable=True)
        counts_E = torch.bincount(expert_flat, minlength=num_experts)
        return Assignments(order_A // K, expert_flat[order_A], weights_TK.reshape(-1)[order_A],
                           counts_E, zero, zero, None)
    # Lexicographic sort by (expert, slot, -weight, token) through stable sorts, last key first.
    weight_flat = weights_TK.detach().reshape(-1)
    order = torch.argsort(-weight_flat, stable=True)  # ties keep token order (flat = t*K + k)
    order = order[torch.argsort(order % K, stable=True)]
    order = order[torch.argsort(expert_flat[order], stable=True)]
    expert_sorted = expert_flat[order]
    counts_all_E = torch.bincount(expert_flat, minlength=num_experts)
    starts_E = torch.cumsum(counts_all_E, 0) - counts_all_E
    rank_A = torch.arange(order.numel(), device=device) - starts_E[expert_sorted]
    keep = rank_A < capacity
    kept = order[keep]
    token_A = kept // K
    counts_E = counts_all_E.clamp(max=capacity)
    return Assignments(token_A, expert_sorted[keep], weights_TK.reshape(-1)[kept], counts_E,
                       _count_uncovered(token_A, T), (~keep).sum(), capacity)


def _plan_expert_choice(route: RouterOutput, num_experts: int) -> Assignments:
    tokens_EC, weights_EC = route.tokens_EC, route.weights_EC
    E, C = tokens_EC.shape
    T = route.logits_TE.shape[0]
    device = tokens_EC.device
    token_A = tokens_EC.reshape(-1)
    expert_A = torch.arange(E, device=device).repeat_interleave(C)
    counts_E = torch.full((E,), C, dtype=torch.long, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return Assignments(token_A, expert_A, weights_EC.reshape(-1), counts_E,
                       _count_uncovered(token_A, T), zero, C)


def plan_assignments_reference(route: RouterOutput, num_experts: int,
                               capacity: int | None) -> Assignments:
    """The obvious plan: walk the (token, slot) pairs in priority order in Python, give each to
    its expert while the expert has room. Slow; tests hold :func:`plan_assignments` equal to it.
    """
    if not route.token_choice:
        return _plan_expert_choice(route, num_experts)
    experts_TK, weights_TK = route.experts_TK, route.weights_TK
    T, K = experts_TK.shape
    pairs = [(k, -float(weights_TK[t, k].detach()), t) for t in range(T) for k in range(K)]
    if capacity is not None:
        pairs.sort()
    taken = [0] * num_experts
    kept: dict[int, list[tuple[int, int]]] = {e: [] for e in range(num_experts)}
    dropped = 0
    for k, _, t in pairs:
        e = int(experts_TK[t, k])
        if capacity is not None and taken[e] >= capacity:
            dropped += 1
            continue
        taken[e] += 1
        kept[e].append((t, k))
    if capacity is None:  # dropless: token order within each expert
        kept = {e: sorted(rows) for e, rows in kept.items()}
    rows = [(t, k, e) for e in range(num_experts) for t, k in kept[e]]
    device = experts_TK.device
    token_A = torch.tensor([t for t, _, _ in rows], dtype=torch.long, device=device)
    expert_A = torch.tensor([e for _, _, e in rows], dtype=torch.long, device=device)
    if rows:
        weight_A = torch.stack([weights_TK[t, k] for t, k, _ in rows])
    else:
        weight_A = weights_TK.reshape(-1)[:0]
    counts_E = torch.tensor(taken, dtype=torch.long, device=device)
    no_expert = sum(1 for t in range(T) if not any(t == r[0] for r in rows))
    return Assignments(token_A, expert_A, weight_A, counts_E,
                       torch.tensor(no_expert, device=device), torch.tensor(dropped, device=device),
                       capacity)


def combine(y_AD: torch.Tensor, plan: Assignments, num_tokens: int,
            weighted: bool = True) -> torch.Tensor:
    """Scatter expert outputs back to their tokens, weighted by the router: out_TD."""
    if weighted:
        y_AD = y_AD * plan.weight_A.to(y_AD.dtype).unsqueeze(-1)
    out_TD = y_AD.new_zeros(num_tokens, y_AD.shape[-1])
    return out_TD.index_add_(0, plan.token_A, y_AD)
