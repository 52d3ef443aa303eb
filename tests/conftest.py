"""Shared helpers for the core's tests: small layers with a fixed seed, fast-vs-reference runs,
and an independent walk of the capacity priority order.

Legend as in the package: T tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, settings

from smoe.config import ROUTERS, MoEConfig
from smoe.nn.moe import MoELayer

#: Small, quick hypothesis runs (the core suite must stay well under a minute and a half on two
#: shared cores). A decorator, not a global profile: other test files keep their own settings.
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: top_k each router needs (switch is top-1, sparsemixer top-2).
ROUTER_TOP_K = {"switch": 1, "sparsemixer": 2}
TOKEN_CHOICE_ROUTERS = tuple(r for r in ROUTERS if r != "expert_choice")
#: Token-choice routers that accept a capacity factor in the tests below.
CAPACITY_ROUTERS = ("softmax_topk", "switch", "topk_softmax", "sigmoid_bias")


def moe_config(**changes) -> MoEConfig:
    """A small config (D=8, F=4, E=4, K=2, init_std=0.5 so routing is far from uniform); the
    router's required top_k is applied unless ``top_k`` is given."""
    cfg = dict(hidden_size=8, expert_size=4, num_experts=4, top_k=2, init_std=0.5)
    router = changes.get("router", "softmax_topk")
    if "top_k" not in changes and router in ROUTER_TOP_K:
        cfg["top_k"] = ROUTER_TOP_K[router]
    cfg.update(changes)
    return MoEConfig(**cfg)


def make_layer(seed: int = 0, *, train: bool = False, dtype: torch.dtype | None = None,
               **changes) -> MoELayer:
    """An :class:`MoELayer` built under ``torch.manual_seed(seed)``, in eval mode by default.

    Router biases and expert biases (zero at init) get random values too, so that they matter.
    """
    torch.manual_seed(seed)
    layer = MoELayer(moe_config(**changes))
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("bias") or name == "router.noise_weight":
                p.normal_(std=0.3)
    layer.train(train)
    if dtype is not None:
        layer.to(dtype)
    return layer


def force_one_expert(layer: MoELayer, expert: int = 0, margin: float = 6.0) -> None:
    """Make every token's logits identical with ``expert`` far ahead: router weight zero, router
    bias ``margin`` on ``expert`` (the layer needs ``router_bias=True``)."""
    assert layer.router.bias is not None, "force_one_expert needs router_bias=True"
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.zero_()
        layer.router.bias[expert] = margin


def run(layer: MoELayer, x: torch.Tensor, *, reference: bool, noise_seed: int | None = None,
        **kwargs):
    """``layer(x)`` on the fast or the reference path; reseeds the RNG first when asked so that
    a training-mode noisy router draws the same noise on both paths."""
    previous = layer.use_reference
    layer.use_reference = reference
    try:
        if noise_seed is not None:
            torch.manual_seed(noise_seed)
        return layer(x, **kwargs)
    finally:
        layer.use_reference = previous


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def assert_info_equal(a, b) -> None:
    """Two MoEInfo carry the same counts, capacity and losses."""
    assert torch.equal(a.tokens_per_expert, b.tokens_per_expert), (
        a.tokens_per_expert, b.tokens_per_expert)
    assert int(a.dropped_tokens) == int(b.dropped_tokens)
    assert int(a.dropped_assignments) == int(b.dropped_assignments)
    assert a.capacity == b.capacity
    assert_close(a.aux_loss, b.aux_loss)
    assert_close(a.z_loss, b.z_loss)


def walk_capacity(experts_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int,
                  capacity: int):
    """Independent capacity walk: (token, slot) pairs in priority order -- slot 0 before slot 1,
    then higher weight, then lower token index -- each kept while its expert has room.

    Returns (kept [(t, k, e)], per-expert counts, dropped assignments, tokens with no expert).
    """
    experts = experts_TK.tolist()
    weights = weights_TK.detach().double().tolist()
    T = len(experts)
    K = experts_TK.shape[1] if experts_TK.dim() == 2 else 0
    pairs = sorted(((k, t) for t in range(T) for k in range(K)),
                   key=lambda kt: (kt[0], -weights[kt[1]][kt[0]], kt[1]))
    taken = [0] * num_experts
    kept = []
    for k, t in pairs:
        e = experts[t][k]
        if taken[e] < capacity:
            taken[e] += 1
            kept.append((t, k, e))
    covered = {t for t, _, _ in kept}
    return kept, taken, T * K - len(kept), T - len(covered)


def hand_capacity(config: MoEConfig, num_tokens: int) -> int:
    """ceil(cf * T * K / N), written out again for the tests."""
    return math.ceil(config.capacity_factor * num_tokens * config.top_k / config.num_experts)
