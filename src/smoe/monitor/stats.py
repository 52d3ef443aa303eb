"""Expert-load statistics: the one place smoe computes them (trainer, ``smoe eval``,
``smoe route``, the server's ``/metrics`` and dashboard all call these functions).

Legend: L MoE layers, E experts per layer; every function takes counts of routed (token,
expert) assignments, ``[E]`` or ``[L, E]`` (any integer or float tensor), and returns float64
tensors per layer (the last dimension is reduced). A layer with no tokens gets 0 where a ratio
is undefined (never NaN), so a fresh server's metrics stay plottable.

The names follow what the field already reads:

- ``max_over_mean``: max / mean load (1.0 perfectly balanced, E everything on one expert);
  smoe's historical figure, shown by the trainer's progress bar.
- ``imbalance``: (max - mean) / mean, the imbalance ratio TensorRT-LLM's expert-load balancer
  reports (0 when balanced).
- ``balancedness``: mean / max, SGLang's expert-distribution recorder's figure (1 when balanced,
  1/E when one expert takes everything).
- ``coefficient_of_variation``: population std / mean of the counts.
- ``entropy``: Shannon entropy of the shares in nats, and ``normalized_entropy`` = entropy / ln E
  (1 uniform, 0 one expert): the floor of the collapse alert.
- ``js_divergence``: Jensen-Shannon divergence (Lin 1991, "Divergence measures based on the
  Shannon entropy", IEEE Trans. Inf. Theory 37(1)) between two distributions over experts, in
  bits, so it lies in [0, 1]: the drift figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["shares", "max_over_mean", "imbalance", "balancedness", "coefficient_of_variation",
           "entropy", "normalized_entropy", "dead_experts", "js_divergence", "LoadSummary",
           "summarize"]


def _f64(counts: torch.Tensor) -> torch.Tensor:
    counts = torch.as_tensor(counts)
    if counts.dim() == 0:
        raise ValueError("counts must have an expert dimension ([E] or [L, E])")
    return counts.detach().to(torch.float64)


def shares(counts: torch.Tensor) -> torch.Tensor:
    """Each expert's share of its layer's assignments (rows sum to 1; all-zero rows stay 0)."""
    c = _f64(counts)
    return c / c.sum(dim=-1, keepdim=True).clamp(min=1e-300)


def _mean(c: torch.Tensor) -> torch.Tensor:
    return c.mean(dim=-1)


def max_over_mean(counts: torch.Tensor) -> torch.Tensor:
    """max / mean tokens per expert, per layer (0 for a layer without tokens)."""
    c = _f64(counts)
    m = _mean(c)
    return torch.where(m > 0, c.max(dim=-1).values / m.clamp(min=1e-300), torch.zeros_like(m))


def imbalance(counts: torch.Tensor) -> torch.Tensor:
    """(max - mean) / mean, TensorRT-LLM's imbalance ratio (0 balanced, E - 1 at worst)."""
    r = max_over_mean(counts)
    return torch.where(r > 0, r - 1.0, r)


def balancedness(counts: torch.Tensor) -> torch.Tensor:
    """mean / max, SGLang's balancedness (1 balanced, 1/E at worst; 0 without tokens)."""
    r = max_over_mean(counts)
    return torch.where(r > 0, 1.0 / r.clamp(min=1e-300), r)


def coefficient_of_variation(counts: torch.Tensor) -> torch.Tensor:
    """Population standard deviation / mean of the counts (0 balanced; 0 without tokens)."""
    c = _f64(counts)
    m = _mean(c)
    sd = c.std(dim=-1, correction=0)
    return torch.where(m > 0, sd / m.clamp(min=1e-300), torch.zeros_like(m))


def entropy(counts: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the shares in nats (ln E uniform, 0 on one expert or no tokens)."""
    p = shares(counts)
    return -(p * torch.log(p.clamp(min=1e-300))).sum(dim=-1)


def normalized_entropy(counts: torch.Tensor) -> torch.Tensor:
    """entropy / ln E in [0, 1] (a single-expert layer counts as 1: it cannot collapse)."""
    E = _f64(counts).shape[-1]
    if E <= 1:
        return torch.ones(_f64(counts).shape[:-1], dtype=torch.float64)
    return entropy(counts) / math.log(E)


def dead_experts(counts: torch.Tensor) -> torch.Tensor:
    """Boolean mask of experts that got no token, same shape as ``counts``."""
    return _f64(counts) == 0


def js_divergence(p_counts: torch.Tensor, q_counts: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits between two count (or share) distributions over the
    last dimension: 0 when equal, 1 when disjoint. A layer where either side has no tokens
    gets 0 (no evidence of drift)."""
    p, q = shares(p_counts), shares(q_counts)
    if p.shape != q.shape:
        raise ValueError(f"js_divergence needs equal shapes, got {tuple(p.shape)} and "
                         f"{tuple(q.shape)}")
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # 0 * log(0 / x) = 0; b > 0 wherever a > 0 since b is the mixture.
        return torch.where(a > 0, a * torch.log2(a.clamp(min=1e-300) / b.clamp(min=1e-300)),
                           torch.zeros_like(a)).sum(dim=-1)

    js = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    empty = (_f64(p_counts).sum(-1) == 0) | (_f64(q_counts).sum(-1) == 0)
    return torch.where(empty, torch.zeros_like(js), js.clamp(min=0.0, max=1.0))


@dataclass(frozen=True)
class LoadSummary:
    """Per-layer figures of one ``[L, E]`` count matrix, as plain lists (JSON-ready)."""

    assignments: list[int]
    max_over_mean: list[float]
    imbalance: list[float]
    balancedness: list[float]
    cv: list[float]
    entropy: list[float]
    normalized_entropy: list[float]
    dead_experts: list[int]

    def as_dict(self) -> dict[str, list]:
        return dict(self.__dict__)


def summarize(counts_LE: torch.Tensor) -> LoadSummary:
    """All per-layer figures of ``counts_LE`` at once (one conversion to the CPU)."""
    c = _f64(counts_LE).cpu()
    if c.dim() == 1:
        c = c[None]
    return LoadSummary(
        assignments=[int(v) for v in c.sum(-1).tolist()],
        max_over_mean=max_over_mean(c).tolist(), imbalance=imbalance(c).tolist(),
        balancedness=balancedness(c).tolist(), cv=coefficient_of_variation(c).tolist(),
        entropy=entropy(c).tolist(), normalized_entropy=normalized_entropy(c).tolist(),
        dead_experts=[int(v) for v in dead_experts(c).sum(-1).tolist()])
