"""Dispatch: the vectorised plan equals the Python-walk reference and an independent walk of
the priority order; capacity invariants through the layer; expert choice; combine."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import (CAPACITY_ROUTERS, FAST, force_one_expert, hand_capacity, make_layer, run,
                      walk_capacity)
from smoe.nn.dispatch import combine, plan_assignments, plan_assignments_reference
from smoe.nn.router import RouterOutput


@st.composite
def token_choice_routes(draw):
    """A random token-choice RouterOutput: K distinct experts per token; weights drawn from a
    small set so that ties (broken by token index) happen often."""
    E = draw(st.integers(1, 6))
    K = draw(st.integers(1, E))
    T = draw(st.integers(0, 14))
    perm = st.permutations(list(range(E)))
    experts = [draw(perm)[:K] for _ in range(T)]
    weights = draw(st.lists(st.lists(st.sampled_from([0.125, 0.25, 0.5, 0.75, 1.0]),
                                     min_size=K, max_size=K), min_size=T, max_size=T))
    experts_TK = torch.tensor(experts, dtype=torch.long).reshape(T, K)
    weights_TK = torch.tensor(weights, dtype=torch.float32).reshape(T, K)
    logits = torch.zeros(T, E)
    route = RouterOutput(logits, logits.softmax(-1), experts_TK, weights_TK)
    capacity = draw(st.one_of(st.none(), st.integers(0, 6)))
    return route, E, capacity


@FAST
@given(token_choice_routes())
def test_plan_equals_reference_and_independent_walk(case):
    route, E, capacity = case
    T, K = route.experts_TK.shape
    fast = plan_assignments(route, E, capacity)
    ref = plan_assignments_reference(route, E, capacity)
    for name in ("token_A", "expert_A", "weight_A", "counts_E"):
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name
    assert int(fast.dropped_tokens) == int(ref.dropped_tokens)
    assert int(fast.dropped_assignments) == int(ref.dropped_assignments)
    assert fast.capacity == ref.capacity == capacity
    # expert-sorted, counts consistent
    assert torch.equal(fast.expert_A, fast.expert_A.sort().values)
    assert torch.equal(torch.bincount(fast.expert_A, minlength=E), fast.counts_E)
    if capacity is None:
        assert int(fast.counts_E.sum()) == T * K
        assert int(fast.dropped_tokens) == 0 == int(fast.dropped_assignments)
        # each (token, expert) pair exactly once, weight carried along
        rows = sorted(zip(fast.token_A.tolist(), fast.expert_A.tolist(),
                          fast.weight_A.tolist()))
        expected = sorted((t, e, w) for t in range(T)
                          for e, w in zip(route.experts_TK[t].tolist(),
                                          route.weights_TK[t].tolist()))
        assert rows == expected
        return
    kept, taken, dropped_assignments, dropped_tokens = walk_capacity(
        route.experts_TK, route.weights_TK, E, capacity)
    assert fast.counts_E.tolist() == taken
    assert all(c <= capacity for c in taken)
    assert int(fast.dropped_assignments) == dropped_assignments
    assert int(fast.dropped_tokens) == dropped_tokens
    assert int(fast.dropped_assignments) + int(fast.counts_E.sum()) == T * K
    # the same (token, expert) pairs survive, in priority order within each expert
    by_expert = sorted(kept, key=lambda tke: tke[2])  # stable: keeps the walk's order
    assert fast.token_A.tolist() == [t for t, _, _ in by_expert]
    assert fast.expert_A.tolist() == [e for _, _, e in by_expert]


def test_priority_by_hand():
    """Capacity 1, one expert wanted by everyone: slot 0 beats slot 1, then the higher weight,
    then the lower token index."""
    experts = torch.tensor([[1, 0], [0, 1], [0, 1], [1, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3], [0.6, 0.4]])
    route = RouterOutput(torch.zeros(4, 2), torch.zeros(4, 2), experts, weights)
    plan = plan_assignments(route, 2, capacity=1)
    # expert 0: slot-0 candidates are tokens 1 (0.5) and 2 (0.7): token 2 wins.
    # expert 1: slot-0 candidates are tokens 0 (0.6) and 3 (0.6): tie -> token 0.
    assert plan.token_A.tolist() == [2, 0]
    assert plan.expert_A.tolist() == [0, 1]
    assert plan.weight_A.tolist() == [pytest.approx(0.7), pytest.approx(0.6)]
    assert int(plan.dropped_assignments) == 6
    assert int(plan.dropped_tokens) == 2  # tokens 1 and 3
    # capacity 2: expert 0 takes tokens 2 and 1 (slot 0) before any slot-1 pair
    plan = plan_assignments(route, 2, capacity=2)
    assert plan.token_A.tolist() == [2, 1, 0, 3]


def test_combine_by_hand():
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    route = RouterOutput(torch.zeros(3, 2), torch.zeros(3, 2),
                         torch.tensor([[0], [1], [0]]), torch.tensor([[0.5], [2.0], [1.0]]))
    plan = plan_assignments(route, 2, None)
    assert plan.token_A.tolist() == [0, 2, 1] and plan.expert_A.tolist() == [0, 0, 1]
    # y rows follow the plan: (t0, w 0.5), (t2, w 1.0), (t1, w 2.0); token 3 has no expert
    out = combine(y, plan, 4)
    assert out.tolist() == [[0.5, 1.0], [10.0, 12.0], [3.0, 4.0], [0.0, 0.0]]
    assert combine(y, plan, 4, weighted=False).tolist() == [[1, 2], [5, 6], [3, 4], [0, 0]]


# -- capacity through the layer ---------------------------------------------------------------
@FAST
@given(router=st.sampled_from(CAPACITY_ROUTERS), cf=st.sampled_from([0.5, 1.0, 1.25]),
       T=st.integers(1, 16), E=st.integers(2, 6), seed=st.integers(0, 2 ** 16),
       one_expert=st.booleans(), shape3d=st.booleans())
def test_layer_capacity_invariants(router, cf, T, E, seed, one_expert, shape3d):
    K = 1 if router == "switch" else min(2, E)
    layer = make_layer(seed, router=router, num_experts=E, top_k=K, capacity_factor=cf,
                       router_bias=one_expert)
    if one_expert:
        force_one_expert(layer, expert=E - 1)
    x = torch.randn(T, 8, generator=torch.Generator().manual_seed(seed))
    if shape3d:
        x = x.reshape(1, T, 8)
    y, info = run(layer, x, reference=False)
    C = hand_capacity(layer.config, T)
    assert info.capacity == C == layer.config.capacity(T)
    counts = info.tokens_per_expert
    assert (counts <= C).all()
    kept, taken, dropped_assignments, dropped_tokens = walk_capacity(
        info.expert_indices, info.expert_weights, E, C)
    assert counts.tolist() == taken
    assert int(info.dropped_assignments) == dropped_assignments
    assert int(info.dropped_tokens) == dropped_tokens
    assert int(info.dropped_assignments) + int(counts.sum()) == T * K
    if one_expert:
        assert counts[E - 1] == min(C, T)
    # a token that lost all its experts gets exactly zero output (no shared experts)
    covered = {t for t, _, _ in kept}
    y_TD = y.reshape(T, 8)
    for t in range(T):
        if t not in covered:
            assert torch.count_nonzero(y_TD[t]) == 0
    y_ref, info_ref = run(layer, x, reference=True)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(info.tokens_per_expert, info_ref.tokens_per_expert)
    assert int(info.dropped_tokens) == int(info_ref.dropped_tokens)


def test_capacity_factor_large_enough_drops_nothing():
    layer = make_layer(router="softmax_topk", capacity_factor=4.0)  # C = 2T >= T
    x = torch.randn(10, 8)
    y, info = layer(x)
    assert int(info.dropped_assignments) == 0 == int(info.dropped_tokens)
    layer.config = layer.config.replace(capacity_factor=None)
    y_dropless, _ = layer(x)
    torch.testing.assert_close(y, y_dropless, atol=1e-6, rtol=1e-6)


# -- expert choice ---------------------------------------------------------------------------
@FAST
@given(T=st.integers(0, 14), E=st.integers(1, 6), data=st.data(), seed=st.integers(0, 2 ** 16))
def test_expert_choice_capacity_and_drops(T, E, data, seed):
    K = data.draw(st.integers(1, E))
    cf = data.draw(st.sampled_from([None, 0.5, 1.0, 2.0]))
    layer = make_layer(seed, router="expert_choice", num_experts=E, top_k=K, capacity_factor=cf)
    x = torch.randn(T, 8, generator=torch.Generator().manual_seed(seed))
    y, info = layer(x)
    c = cf if cf is not None else K
    C = min(T, math.ceil(T * c / E))
    assert info.capacity == C
    assert info.tokens_per_expert.tolist() == [C] * E
    assert int(info.dropped_assignments) == 0
    route = layer.router(x)
    picked = set(route.tokens_EC.reshape(-1).tolist())
    probs = info.router_logits.softmax(-1)
    for e in range(E):  # each expert's picks are its C best-scored tokens
        mine = route.tokens_EC[e].tolist()
        assert len(set(mine)) == C
        rest = [t for t in range(T) if t not in mine]
        if mine and rest:
            assert probs[mine, e].min() >= probs[rest, e].max()
    assert int(info.dropped_tokens) == T - len(picked)
    for t in range(T):
        if t not in picked:
            assert torch.count_nonzero(y[t]) == 0
    # the output is the score-weighted sum over the experts that took the token
    expected = torch.zeros_like(x)
    for e in range(E):
        for t in route.tokens_EC[e].tolist():
            expected[t] += probs[t, e] * layer.experts.expert_forward(x[t:t + 1], e)[0]
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_expert_choice_refuses_causal():
    layer = make_layer(router="expert_choice")
    with pytest.raises(ValueError, match="causal"):
        layer(torch.randn(2, 3, 8), causal=True)
    layer(torch.randn(2, 3, 8))  # fine when not causal
    make_layer(router="softmax_topk")(torch.randn(2, 3, 8), causal=True)  # token choice: fine
