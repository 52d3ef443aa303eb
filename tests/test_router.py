"""Each routing rule against a hand computation from its definition (FORMULAS.md), plus the
auxiliary-loss-free bias balancing of ``sigmoid_bias`` on a skewed stream."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from conftest import FAST, make_layer, moe_config
from smoe.nn.router import Router, limit_to_groups


def _router(seed=0, **changes) -> Router:
    torch.manual_seed(seed)
    router = Router(moe_config(**changes))
    if router.bias is not None:
        with torch.no_grad():
            router.bias.normal_(std=0.3)
    return router.eval()


def _x(T, D=8, seed=0):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def _softmax(row):
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    return [v / sum(ex) for v in ex]


def _top(row, k):
    """Indices of the k largest values, largest first (no ties in random data)."""
    return sorted(range(len(row)), key=lambda i: -row[i])[:k]


def _check_logits(router, x):
    out = router(x)
    b = 0.0 if router.bias is None else router.bias
    torch.testing.assert_close(out.logits_TE, x @ router.weight.T + b)
    assert out.logits_TE.dtype == torch.float32
    return out


@FAST
@given(T=st.integers(0, 9), E=st.integers(2, 6), data=st.data(), norm=st.booleans(),
       seed=st.integers(0, 2 ** 16), bias=st.booleans())
def test_softmax_topk_and_topk_softmax_hand(T, E, data, norm, seed, bias):
    K = data.draw(st.integers(1, E))
    scale = data.draw(st.sampled_from([1.0, 2.5]))
    soft = _router(seed, router="softmax_topk", num_experts=E, top_k=K, norm_topk_prob=norm,
                   router_bias=bias, routed_scaling_factor=scale)
    first = _router(seed, router="topk_softmax", num_experts=E, top_k=K, router_bias=bias)
    x = _x(T, seed=seed)
    out_s, out_f = _check_logits(soft, x), _check_logits(first, x)
    for t, row in enumerate(out_s.logits_TE.tolist()):
        p = _softmax(row)
        top = _top(p, K)
        assert out_s.experts_TK[t].tolist() == top
        assert out_f.experts_TK[t].tolist() == top  # same experts either way
        w = [p[i] for i in top]
        if norm and K > 1:
            w = [v / sum(w) for v in w]
        assert out_s.weights_TK[t].tolist() == pytest.approx([v * scale for v in w], rel=1e-5)
        assert out_f.weights_TK[t].tolist() == pytest.approx(_softmax([row[i] for i in top]),
                                                             rel=1e-5)
        assert out_s.probs_TE[t].tolist() == pytest.approx(p, rel=1e-5)


def test_topk_softmax_equals_renormalised_softmax_topk():
    """The two orders give the same weights once softmax-then-top-K is renormalised."""
    a = _router(1, router="softmax_topk", top_k=2, norm_topk_prob=True)
    b = _router(1, router="topk_softmax", top_k=2)
    x = _x(10, seed=1)
    oa, ob = a(x), b(x)
    assert torch.equal(oa.experts_TK, ob.experts_TK)
    torch.testing.assert_close(oa.weights_TK, ob.weights_TK)


def test_switch_is_top1_probability():
    router = _router(2, router="switch", norm_topk_prob=True)
    x = _x(9, seed=2)
    out = _check_logits(router, x)
    probs = out.logits_TE.softmax(-1)
    assert out.experts_TK.shape == (9, 1)
    assert torch.equal(out.experts_TK[:, 0], probs.argmax(-1))
    # never renormalised: the weight is the chosen probability (< 1), not 1
    torch.testing.assert_close(out.weights_TK[:, 0], probs.max(-1).values)
    assert (out.weights_TK < 1).all()


def test_sigmoid_bias_selects_with_bias_weights_without():
    router = _router(3, router="sigmoid_bias", top_k=2, routed_scaling_factor=2.5,
                     num_experts=5)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0]))
    x = _x(6, seed=3)
    out = _check_logits(router, x)
    for t, row in enumerate(out.logits_TE.tolist()):
        s = [1 / (1 + math.exp(-v)) for v in row]
        biased = [v + b for v, b in zip(s, [0, 0, 0, 0, 10.0])]
        top = _top(biased, 2)
        assert top[0] == 4  # the bias forces expert 4 in
        assert out.experts_TK[t].tolist() == top
        w = [s[i] / (s[top[0]] + s[top[1]]) * 2.5 for i in top]  # unbiased, renormalised
        assert out.weights_TK[t].tolist() == pytest.approx(w, rel=1e-5)
        assert out.probs_TE[t].tolist() == pytest.approx([v / sum(s) for v in s], rel=1e-5)
    # the bias is a buffer (no gradient), kept in checkpoints
    assert "expert_bias" in dict(router.named_buffers())
    assert "expert_bias" not in dict(router.named_parameters())
    assert "expert_bias" in router.state_dict()


def test_noisy_topk_eval_is_clean_and_train_adds_softplus_noise():
    router = _router(4, router="noisy_topk", top_k=2)
    with torch.no_grad():
        router.noise_weight.normal_(std=0.5)
    x = _x(7, seed=4)
    out = _check_logits(router.eval(), x)
    torch.testing.assert_close(out.noisy_TE, out.logits_TE)
    std = F.softplus(x @ router.noise_weight.T)
    torch.testing.assert_close(out.noise_std_TE, std)
    router.train()
    torch.manual_seed(123)
    out = router(x)
    torch.manual_seed(123)
    noisy = out.logits_TE + torch.randn(7, 4) * std
    torch.testing.assert_close(out.noisy_TE, noisy)
    for t, row in enumerate(noisy.tolist()):
        top = _top(row, 2)
        assert out.experts_TK[t].tolist() == top
        assert out.weights_TK[t].tolist() == pytest.approx(_softmax([row[i] for i in top]),
                                                           rel=1e-5)
    torch.manual_seed(124)
    assert not torch.equal(router(x).noisy_TE, noisy)  # fresh noise per call


@pytest.mark.parametrize("T, cf, expected_C", [(8, None, 4), (5, None, 3), (5, 1.0, 2),
                                                (3, 8.0, 3), (1, None, 1)])
def test_expert_choice_takes_top_c_tokens_per_expert(T, cf, expected_C):
    router = _router(5, router="expert_choice", top_k=2, capacity_factor=cf)
    x = _x(T, seed=5)
    out = _check_logits(router, x)
    assert not out.token_choice and out.experts_TK is None
    assert out.tokens_EC.shape == (4, expected_C) == out.weights_EC.shape
    probs = out.logits_TE.softmax(-1)
    for e in range(4):
        col = probs[:, e].tolist()
        assert out.tokens_EC[e].tolist() == _top(col, expected_C)
        torch.testing.assert_close(out.weights_EC[e], probs[out.tokens_EC[e], e])


def _sparsemixer_hand(row, eps):
    """Phi-3.5-MoE's sparsemixer (deterministic form), one token, written out."""
    picks, weights = [], []
    masked = list(row)
    for _ in range(2):
        best = max(masked)
        pick = masked.index(best)
        kept = []
        for i, u in enumerate(row):
            factor = max(abs(u), best)
            far = (best - u) / factor > 2 * eps
            kept.append(-math.inf if far or masked[i] == -math.inf else masked[i])
        finite = [v for v in kept if v != -math.inf]
        m = max(finite)
        z = sum(math.exp(v - m) for v in finite)
        picks.append(pick)
        weights.append(math.exp(kept[pick] - m) / z)
        masked[pick] = -math.inf
    return picks, weights


@pytest.mark.parametrize("eps", [0.01, 0.3, 2.0])
def test_sparsemixer_hand(eps):
    router = _router(6, router="sparsemixer", sparsemixer_jitter_eps=eps, num_experts=5)
    x = _x(12, seed=6) * 3
    out = _check_logits(router, x)
    for t, row in enumerate(out.logits_TE.tolist()):
        picks, weights = _sparsemixer_hand(row, eps)
        assert out.experts_TK[t].tolist() == picks
        assert out.weights_TK[t].tolist() == pytest.approx(weights, rel=1e-5)


def test_limit_to_groups_hand():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.4, 0.3, 0.2, 0.8, 0.05]])
    # groups (pairs): sums 1.0, 0.9, 0.5, 0.85; maxima 0.9, 0.5, 0.3, 0.8
    top2 = limit_to_groups(scores, 4, 2, "top2_sum")
    keep = [0, 1, 2, 3]
    assert torch.isfinite(top2[0]).tolist() == [i in keep for i in range(8)]
    assert top2[0, :4].tolist() == scores[0, :4].tolist()
    mx = limit_to_groups(scores, 4, 2, "max")
    assert torch.isfinite(mx[0]).tolist() == [i in (0, 1, 6, 7) for i in range(8)]
    assert limit_to_groups(scores, 1, 1, "top2_sum") is scores


@pytest.mark.parametrize("router_name", ["softmax_topk", "sigmoid_bias"])
@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
def test_group_limited_routing_picks_inside_the_best_groups(router_name, group_score):
    router = _router(7, router=router_name, num_experts=8, n_groups=4, topk_groups=2, top_k=3,
                     group_score=group_score)
    x = _x(10, seed=7) * 3
    out = router(x)
    scores = (out.logits_TE.softmax(-1) if router_name == "softmax_topk"
              else out.logits_TE.sigmoid()).tolist()
    for t, row in enumerate(scores):
        groups = [row[2 * g:2 * g + 2] for g in range(4)]
        g_score = [sum(gr) if group_score == "top2_sum" else max(gr) for gr in groups]
        kept = _top(g_score, 2)
        allowed = [i for i in range(8) if i // 2 in kept]
        expected = sorted(allowed, key=lambda i: -row[i])[:3]
        assert out.experts_TK[t].tolist() == expected


def test_router_logits_float32_for_low_precision_input():
    router = _router(8).to(torch.bfloat16)
    x = _x(4, seed=8).bfloat16()
    out = router(x)
    assert out.logits_TE.dtype == torch.float32 and out.weights_TK.dtype == torch.float32
    torch.testing.assert_close(out.logits_TE, x.float() @ router.weight.float().T)
    router.logits_in_float32 = False  # the transformers-style cast after the matmul
    assert router(x).logits_TE.dtype == torch.float32
    router64 = _router(8).double()
    assert router64(_x(4).double()).logits_TE.dtype == torch.float64  # never downcast


# -- auxiliary-loss-free balancing ------------------------------------------------------------
def test_update_bias_step_by_hand():
    layer = make_layer(router="sigmoid_bias", bias_update_rate=0.1)
    layer.update_bias(torch.tensor([4, 0, 2, 2]))  # mean 2
    assert layer.router.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])
    # accumulated load: training-mode forwards only, reset by the update
    x = _x(6, seed=9)
    layer.eval()
    layer(x)
    assert layer.load_since_update.sum().item() == 0
    layer.train()
    _, a = layer(x)
    _, b = layer(x)
    assert torch.equal(layer.load_since_update, a.tokens_per_expert + b.tokens_per_expert)
    before = layer.router.expert_bias.clone()
    load = layer.load_since_update.float()
    layer.update_bias()
    torch.testing.assert_close(layer.router.expert_bias,
                               before + 0.1 * torch.sign(load.mean() - load))
    assert layer.load_since_update.sum().item() == 0


def test_update_bias_needs_sigmoid_bias():
    with pytest.raises(ValueError, match="sigmoid_bias"):
        make_layer(router="softmax_topk").update_bias(torch.tensor([1, 1, 1, 1]))


def test_bias_balancing_fixes_a_skewed_stream():
    E, K, D = 8, 2, 16
    layer = make_layer(3, router="sigmoid_bias", num_experts=E, top_k=K, hidden_size=D,
                       bias_update_rate=1e-2, init_std=0.3)
    g = torch.Generator().manual_seed(0)
    w = layer.router.weight.detach()
    base = (w[0] + w[1]) / (w[0] + w[1]).norm() * 4  # strongly prefers experts 0 and 1

    def batch(n):
        return base + torch.randn(n, D, generator=g)

    def imbalance():
        layer.eval()
        with torch.no_grad():
            _, info = layer(batch(1024))
        load = info.tokens_per_expert.float()
        return (load.max() / load.mean()).item()

    initial = imbalance()
    assert initial > 2.5  # the stream is skewed: experts 0 and 1 take most tokens
    layer.train()
    with torch.no_grad():
        for _ in range(300):
            layer(batch(64))
            layer.update_bias()
    final = imbalance()
    assert final < 0.6 * initial and final < 1.5, (initial, final)
