"""Dispatch: turn a router's decision into expert-sorted rows for the experts, and back.

Legend: T tokens, D hidden, E experts, K slots per token, A assignments (token, expert, weight)
kept after capacity; ``*_A`` tensors are sorted by expert so each expert's rows are contiguous.

The cost of dispatch grows with A = T*K (or E*C for expert choice), never with T*E: there is no
one-hot tensor over experts and no Python loop over tokens or experts.

:class:`LocalDispatcher` is the seam ``MoELayer`` calls (``layer.dispatcher``): plan with
capacity, permute rows to the experts, run them, combine back; plus the small-batch decode
shortcut. It is stateless in the sense of torchtitan's token dispatcher: everything
:meth:`~LocalDispatcher.combine` needs comes back from :meth:`~LocalDispatcher.dispatch` in a
:class:`Dispatched`, nothing is kept on the object between the two. An expert-parallel
dispatcher subclasses it and overrides ``dispatch``/``combine`` (all-to-all in between) and sets
``decode_shortcut = False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from smoe.nn.router import RouterOutput

__all__ = ["Assignments", "Dispatched", "LocalDispatcher", "plan_assignments",
           "plan_assignments_reference", "combine"]


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
        # div(rounding_mode=) is a C method; `//` goes through a Python wrapper (tiny batches).
        return Assignments(order_A.div(K, rounding_mode="floor"), expert_flat[order_A],
                           weights_TK.reshape(-1)[order_A], counts_E, zero, zero, None)
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


@dataclass
class Dispatched:
    """What :meth:`LocalDispatcher.dispatch` hands to the experts and back to ``combine``.

    x_AD: rows for the (local) experts, expert-sorted (already scaled by the router weight
        when ``weights_on_input``); counts_E: rows per (local) expert; expert_A: the (local)
        expert of each row (None allowed when the experts have no biases);
    plan: the global :class:`Assignments` (what MoEInfo reports);
    state: dispatcher-private data for ``combine`` (e.g. all-to-all split sizes);
    num_tokens: T, the number of output rows of ``combine``.
    """

    x_AD: torch.Tensor
    counts_E: torch.Tensor
    expert_A: torch.Tensor | None
    plan: Assignments
    state: Any = None
    num_tokens: int = 0


class LocalDispatcher:
    """Single-device dispatch: plan (capacity), permute, run the experts, combine.

    ``decode_max_tokens``: up to this many tokens, without autograd, on CPU, dropless token
    choice, the plan/sort/scatter is skipped and each token's chosen experts run one by one
    through ``experts.expert_forward`` (reads only the chosen experts' weights; see
    ``benchmarks/layer.py`` for the crossover). On accelerators the sorted path is used
    instead: it needs no host sync. ``decode_shortcut = False`` turns it off (subclasses whose
    experts are not all local must).
    """

    decode_shortcut = True

    def __init__(self, decode_max_tokens: int = 1) -> None:
        self.decode_max_tokens = decode_max_tokens

    def __repr__(self) -> str:
        return f"{type(self).__name__}(decode_max_tokens={self.decode_max_tokens})"

    # -- the two halves ---------------------------------------------------------------------
    def dispatch(self, x_TD: torch.Tensor, route: RouterOutput, *, num_experts: int,
                 capacity: int | None, weights_on_input: bool) -> Dispatched:
        """Plan with capacity and gather each kept (token, expert) row, expert-sorted."""
        plan = plan_assignments(route, num_experts, capacity)
        x_AD = x_TD.index_select(0, plan.token_A)
        if weights_on_input:
            x_AD = x_AD * plan.weight_A.to(x_AD.dtype).unsqueeze(-1)
        return Dispatched(x_AD, plan.counts_E, plan.expert_A, plan, None, x_TD.shape[0])

    def combine(self, y_AD: torch.Tensor, d: Dispatched, *,
                weights_on_input: bool) -> torch.Tensor:
        """Scatter the experts' rows back to their tokens (weighted unless the weights were
        applied on the input): out_TD."""
        return combine(y_AD, d.plan, d.num_tokens, weighted=not weights_on_input)

    # -- the whole routed part ------------------------------------------------------------
    def __call__(self, x_TD: torch.Tensor, route: RouterOutput, experts: nn.Module, *,
                 capacity: int | None,
                 weights_on_input: bool) -> tuple[torch.Tensor, Assignments | None]:
        """(out_TD, plan): the routed experts' weighted sum per token. ``plan`` is None when the
        decode shortcut ran (then MoEInfo counts from ``route.experts_TK``)."""
        if self.shortcut_applies(x_TD, route, capacity):
            return self.decode(x_TD, route, experts, weights_on_input=weights_on_input), None
        d = self.dispatch(x_TD, route, num_experts=route.logits_TE.shape[-1], capacity=capacity,
                          weights_on_input=weights_on_input)
        y_AD = experts(d.x_AD, d.counts_E, d.expert_A)
        return self.combine(y_AD, d, weights_on_input=weights_on_input), d.plan

    # -- the small-batch decode shortcut ------------------------------------------------------
    def shortcut_applies(self, x_TD: torch.Tensor, route: RouterOutput,
                         capacity: int | None) -> bool:
        return (self.decode_shortcut and x_TD.shape[0] <= self.decode_max_tokens
                and route.token_choice and capacity is None and not torch.is_grad_enabled()
                and x_TD.device.type == "cpu"
                # host reads (.tolist()) would break a compiled graph; the sorted path compiles
                and not torch.compiler.is_compiling())

    @staticmethod
    def decode(x_TD: torch.Tensor, route: RouterOutput, experts: nn.Module, *,
               weights_on_input: bool) -> torch.Tensor:
        """Each token through its K experts' ``expert_forward``, weighted sum: out_TD. Memory-
        bound like a dense FFN of width K*F; reads the routing decisions on the host."""
        # Each op costs a few microseconds of dispatch, comparable to reading one small expert's
        # weights, so the loop keeps to row views and in-place accumulation.
        rows = []
        expert_forward = experts.expert_forward
        for t, (row_e, row_w) in enumerate(zip(route.experts_TK.tolist(),
                                               route.weights_TK.tolist())):
            x_1D = x_TD[t:t + 1]
            acc_1D = None
            for e, w in zip(row_e, row_w):
                if weights_on_input:
                    y = expert_forward(x_1D * w, e)
                elif acc_1D is None:
                    y = expert_forward(x_1D, e) * w
                else:
                    acc_1D.add_(expert_forward(x_1D, e), alpha=w)
                    continue
                acc_1D = y if acc_1D is None else acc_1D.add_(y)
            rows.append(acc_1D if acc_1D is not None else torch.zeros_like(x_1D))
        if not rows:
            return torch.zeros_like(x_TD)
        return rows[0] if len(rows) == 1 else torch.cat(rows)
