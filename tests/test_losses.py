"""Router losses against hand computations of the formulas in /work/shared/FORMULAS.md.

Every expected value here is computed in plain Python (loops, ``math``) from the formula, not
with the functions under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_layer
from smoe.nn import losses


def _softmax(row):
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    s = sum(ex)
    return [v / s for v in ex]


def _phi(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _cv2(values):
    """Population variance / mean^2."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / n
    return var / mean ** 2


# -- Switch / GShard load-balancing loss -----------------------------------------------------
def _switch_hand(probs, experts, E):
    """smoe's convention: N * sum_i f_i P_i with f_i = count_i / (T*K)."""
    T, K = len(experts), len(experts[0])
    counts = [0] * E
    for row in experts:
        for e in row:
            counts[e] += 1
    f = [c / (T * K) for c in counts]
    P = [sum(probs[t][i] for t in range(T)) / T for i in range(E)]
    return E * sum(fi * pi for fi, pi in zip(f, P))


def _transformers_hand(probs, experts, E):
    """transformers' ``load_balancing_loss_func`` (no attention mask), written out by hand:
    expert_mask = one_hot(selected, E) [T, K, E]; tokens_per_expert = mean over T -> [K, E];
    router_prob_per_expert = mean over T -> [E]; loss = E * sum(tokens_per_expert * prob)."""
    T, K = len(experts), len(experts[0])
    tokens_per_expert = [[sum(1.0 for t in range(T) if experts[t][k] == e) / T
                          for e in range(E)] for k in range(K)]
    prob = [sum(probs[t][e] for t in range(T)) / T for e in range(E)]
    return E * sum(tokens_per_expert[k][e] * prob[e] for k in range(K) for e in range(E))


@pytest.mark.parametrize("K", [1, 2, 4])
def test_switch_loss_is_one_at_uniform_routing(K):
    E, T = 4, 8
    probs = torch.full((T, E), 1.0 / E)
    experts = torch.tensor([[(t + k) % E for k in range(K)] for t in range(T)])
    assert losses.load_balancing_loss(probs, experts).item() == pytest.approx(1.0, abs=1e-6)
    # transformers' convention gives K at uniform routing.
    assert _transformers_hand(probs.tolist(), experts.tolist(), E) == pytest.approx(K)


def test_switch_loss_hand_example_and_transformers_convention():
    probs = [[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.1, 0.3, 0.6]]
    experts = [[0, 1], [0, 2], [0, 1]]  # counts: e0 3, e1 2, e2 1
    # by hand: f = (3/6, 2/6, 1/6), P = (1.3/3, 0.6/3, 1.1/3)
    expected = 3 * (3 / 6 * 1.3 / 3 + 2 / 6 * 0.6 / 3 + 1 / 6 * 1.1 / 3)
    assert _switch_hand(probs, experts, 3) == pytest.approx(expected)
    got = losses.load_balancing_loss(torch.tensor(probs), torch.tensor(experts))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert _transformers_hand(probs, experts, 3) == pytest.approx(2 * got.item(), rel=1e-6)


def test_switch_loss_random_matches_hand_and_gradient_flows_through_probs():
    g = torch.Generator().manual_seed(3)
    T, E, K = 7, 5, 2
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    probs = logits.softmax(-1)
    experts = probs.topk(K, dim=-1).indices
    got = losses.load_balancing_loss(probs, experts)
    assert got.item() == pytest.approx(_switch_hand(probs.tolist(), experts.tolist(), E),
                                       rel=1e-5)
    assert got.item() * K == pytest.approx(
        _transformers_hand(probs.tolist(), experts.tolist(), E), rel=1e-5)
    got.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# -- z-loss --------------------------------------------------------------------------------
def test_z_loss_hand():
    logits = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 4.0, 0.5]]
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits]
    expected = sum(v * v for v in lse) / len(lse)
    assert losses.z_loss(torch.tensor(logits)).item() == pytest.approx(expected, rel=1e-6)
    # bfloat16 logits are upcast: value close to the float32 one
    assert losses.z_loss(torch.tensor(logits).bfloat16()).dtype == torch.float32


# -- DeepSeek-V3 sequence-wise balance loss ---------------------------------------------------
def test_sequence_balance_loss_hand_two_sequences():
    # 2 sequences x 3 tokens, E = 3, K = 2; probs are normalised scores s'.
    probs = [[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.2, 0.2, 0.6],
             [0.1, 0.8, 0.1], [0.3, 0.4, 0.3], [0.25, 0.25, 0.5]]
    experts = [[0, 1], [0, 2], [2, 0], [1, 0], [1, 2], [2, 1]]
    E, K, S, Ts = 3, 2, 2, 3
    per_seq = []
    for s in range(S):
        rows = range(s * Ts, (s + 1) * Ts)
        f = [E / (K * Ts) * sum(1 for t in rows if i in experts[t]) for i in range(E)]
        P = [sum(probs[t][i] for t in rows) / Ts for i in range(E)]
        per_seq.append(sum(fi * pi for fi, pi in zip(f, P)))
    expected = sum(per_seq) / S
    got = losses.sequence_balance_loss(torch.tensor(probs), torch.tensor(experts), S)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # one sequence of 6 differs: the loss is per sequence, not over the batch
    one = losses.sequence_balance_loss(torch.tensor(probs), torch.tensor(experts), 1)
    assert one.item() != pytest.approx(expected, rel=1e-3)


def test_layer_aux_loss_combines_switch_and_sequence_losses():
    layer = make_layer(router="sigmoid_bias", aux_loss_coef=0.01, seq_aux_loss_coef=0.1,
                       z_loss_coef=0.001)
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    _, info = layer(x)
    logits = info.router_logits.tolist()
    experts = info.expert_indices.tolist()
    scores = [[1 / (1 + math.exp(-v)) for v in row] for row in logits]
    probs = [[v / sum(row) for v in row] for row in scores]
    E, K, Ts = 4, 2, 3
    seq = []
    for s in range(2):
        rows = range(s * Ts, (s + 1) * Ts)
        f = [E / (K * Ts) * sum(1 for t in rows if i in experts[t]) for i in range(E)]
        P = [sum(probs[t][i] for t in rows) / Ts for i in range(E)]
        seq.append(sum(a * b for a, b in zip(f, P)))
    expected = 0.01 * _switch_hand(probs, experts, E) + 0.1 * sum(seq) / 2
    assert info.aux_loss.item() == pytest.approx(expected, rel=1e-5)
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits]
    assert info.z_loss.item() == pytest.approx(0.001 * sum(v * v for v in lse) / 6, rel=1e-5)


# -- noisy top-K importance and load losses (Shazeer et al. 2017) -------------------------------
def _noisy_hand(clean, noisy, std, K):
    T, E = len(clean), len(clean[0])
    importance = [0.0] * E
    load = [0.0] * E
    for t in range(T):
        top = sorted(range(E), key=lambda i: -noisy[t][i])[:K]
        gates = _softmax([noisy[t][i] for i in top])
        for i, g in zip(top, gates):
            importance[i] += g
        for i in range(E):
            others = sorted((noisy[t][j] for j in range(E) if j != i), reverse=True)
            kth_excluding = others[K - 1]
            load[i] += _phi((clean[t][i] - kth_excluding) / std[t][i])
    return _cv2(importance), _cv2(load)


@pytest.mark.parametrize("K", [1, 2])
def test_noisy_topk_losses_hand(K):
    clean = [[0.5, -0.2, 0.1, 0.9], [1.2, 0.3, -0.4, 0.0], [-0.3, 0.8, 0.6, 0.2]]
    noisy = [[0.7, -0.1, 0.4, 0.6], [1.0, 0.9, -0.6, 0.1], [-0.5, 0.7, 0.75, 0.3]]
    std = [[0.5, 0.4, 0.6, 0.7], [0.3, 0.8, 0.5, 0.9], [0.6, 0.6, 0.2, 0.4]]
    exp_imp, exp_load = _noisy_hand(clean, noisy, std, K)
    noisy_t = torch.tensor(noisy)
    top, experts = noisy_t.topk(K, dim=-1)
    imp, load = losses.noisy_topk_losses(torch.tensor(clean), noisy_t, torch.tensor(std),
                                         experts, top.softmax(-1))
    assert imp.item() == pytest.approx(exp_imp, rel=1e-5)
    assert load.item() == pytest.approx(exp_load, rel=1e-5)


def test_noisy_topk_losses_k_equals_n_has_zero_load():
    clean = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    top, experts = clean.topk(3, dim=-1)
    imp, load = losses.noisy_topk_losses(clean, clean, torch.ones(5, 3), experts,
                                         top.softmax(-1))
    assert load.item() == 0.0
    exp_imp = _cv2([sum(row) for row in zip(*clean.softmax(-1).tolist())])
    assert imp.item() == pytest.approx(exp_imp, rel=1e-5, abs=1e-7)


def test_layer_noisy_topk_aux_loss_is_coef_times_importance_plus_load():
    layer = make_layer(router="noisy_topk", aux_loss_coef=0.05, train=True)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(11)
    _, info = layer(x)
    torch.manual_seed(11)
    eps = torch.randn(6, 4)
    clean = info.router_logits
    std = torch.nn.functional.softplus(x @ layer.router.noise_weight.T)
    noisy = clean + eps * std
    exp_imp, exp_load = _noisy_hand(clean.tolist(), noisy.tolist(), std.tolist(), 2)
    assert info.aux_loss.item() == pytest.approx(0.05 * (exp_imp + exp_load), rel=1e-4)


# -- helpers and empty batches ---------------------------------------------------------------
def test_cv_squared():
    assert losses.cv_squared(torch.tensor([3.0])).item() == 0.0
    assert losses.cv_squared(torch.tensor([2.0, 2.0, 2.0])).item() == 0.0
    assert losses.cv_squared(torch.tensor([1.0, 3.0])).item() == pytest.approx(_cv2([1, 3]))


def test_losses_of_an_empty_batch_are_zero():
    probs = torch.zeros(0, 4)
    experts = torch.zeros(0, 2, dtype=torch.long)
    assert losses.load_balancing_loss(probs, experts).item() == 0.0
    assert losses.sequence_balance_loss(probs, experts, 1).item() == 0.0
    assert losses.z_loss(probs).item() == 0.0
    imp, load = losses.noisy_topk_losses(probs, probs, probs, experts, experts.float())
    assert imp.item() == 0.0 and load.item() == 0.0


# -- MoEInfo losses: zero without coefficients, differentiable with them -----------------------
ROUTERS_FOR_LOSSES = ["softmax_topk", "topk_softmax", "noisy_topk", "switch", "expert_choice",
                      "sigmoid_bias", "sparsemixer"]


@pytest.mark.parametrize("router", ROUTERS_FOR_LOSSES)
def test_info_losses_zero_without_coefficients(router):
    layer = make_layer(router=router, aux_loss_coef=0.0, z_loss_coef=0.0,
                       seq_aux_loss_coef=0.0)
    _, info = layer(torch.randn(2, 3, 8))
    for value in (info.aux_loss, info.z_loss, info.loss):
        assert value.shape == () and value.item() == 0.0
        assert value.grad_fn is None


@pytest.mark.parametrize("router", ROUTERS_FOR_LOSSES)
def test_info_losses_backpropagate_with_coefficients(router):
    layer = make_layer(router=router, aux_loss_coef=0.01, z_loss_coef=0.001,
                       seq_aux_loss_coef=0.001, train=router == "noisy_topk")
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4))
    _, info = layer(x)
    assert info.z_loss.grad_fn is not None and info.z_loss.item() > 0
    if router == "expert_choice":  # balanced by construction: no balance loss
        assert info.aux_loss.item() == 0.0
    else:
        assert info.aux_loss.grad_fn is not None and info.aux_loss.item() > 0
    info.loss.backward()
    assert layer.router.weight.grad is not None
    assert layer.router.weight.grad.abs().sum() > 0
