"""MoEConfig: every invalid field raises ValueError naming the field; derived values."""

from __future__ import annotations

import math

import pytest

from smoe.config import ACTIVATIONS, ROUTERS, MoEConfig

BASE = dict(hidden_size=8, expert_size=4, num_experts=4, top_k=2)

INVALID = [
    # sizes: non-positive, wrong type, bool where an int is expected
    (dict(hidden_size=0), "hidden_size"),
    (dict(hidden_size=-3), "hidden_size"),
    (dict(hidden_size=True), "hidden_size"),
    (dict(hidden_size=8.0), "hidden_size"),
    (dict(expert_size=0), "expert_size"),
    (dict(expert_size=False), "expert_size"),
    (dict(num_experts=0), "num_experts"),
    (dict(num_experts=True), "num_experts"),
    (dict(num_experts="4"), "num_experts"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(top_k=5), "top_k"),  # > num_experts
    # names
    (dict(router="mixtral"), "router"),
    (dict(router="Softmax_TopK"), "router"),
    (dict(activation="tanh"), "activation"),
    (dict(activation=""), "activation"),
    (dict(group_score="mean"), "group_score"),
    # router-specific top_k
    (dict(router="switch", top_k=2), "top_k"),
    (dict(router="sparsemixer", top_k=1), "top_k"),
    (dict(router="sparsemixer", top_k=3), "top_k"),
    # capacity factor: positive and finite, a number
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(capacity_factor=math.nan), "capacity_factor"),
    (dict(capacity_factor=math.inf), "capacity_factor"),
    (dict(capacity_factor=True), "capacity_factor"),
    (dict(capacity_factor="1.25"), "capacity_factor"),
    # bool flags
    (dict(expert_bias=1), "expert_bias"),
    (dict(router_bias="yes"), "router_bias"),
    (dict(norm_topk_prob=None), "norm_topk_prob"),
    (dict(shared_expert_gate=0), "shared_expert_gate"),
    (dict(weights_on_input=1), "weights_on_input"),
    # shared experts
    (dict(num_shared_experts=-1), "num_shared_experts"),
    (dict(num_shared_experts=True), "num_shared_experts"),
    (dict(shared_expert_size=16), "shared_expert_size"),  # without shared experts
    (dict(num_shared_experts=1, shared_expert_size=0), "shared_expert_size"),
    (dict(shared_expert_gate=True), "shared_expert_gate"),  # without shared experts
    # group-limited routing
    (dict(num_experts=8, n_groups=2, topk_groups=3), "topk_groups"),
    (dict(num_experts=8, n_groups=3), "n_groups"),  # does not divide num_experts
    (dict(n_groups=0), "n_groups"),
    (dict(topk_groups=0), "topk_groups"),
    (dict(num_experts=8, n_groups=2, router="topk_softmax"), "n_groups"),
    (dict(num_experts=8, n_groups=4, topk_groups=1, top_k=3), "top_k"),  # > 1 group x 2
    # scalars
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(routed_scaling_factor=math.inf), "routed_scaling_factor"),
    (dict(activation_alpha=math.nan), "activation_alpha"),
    (dict(activation_limit=0.0), "activation_limit"),
    (dict(aux_loss_coef=-1e-2), "aux_loss_coef"),
    (dict(aux_loss_coef=math.nan), "aux_loss_coef"),
    (dict(z_loss_coef=-1e-3), "z_loss_coef"),
    (dict(seq_aux_loss_coef=-1e-4), "seq_aux_loss_coef"),
    (dict(bias_update_rate=-1e-3), "bias_update_rate"),
    (dict(bias_update_rate=math.inf), "bias_update_rate"),
    (dict(sparsemixer_jitter_eps=-0.01), "sparsemixer_jitter_eps"),
    (dict(init_std=0.0), "init_std"),
    (dict(init_std=-0.02), "init_std"),
]


@pytest.mark.parametrize("changes, field", INVALID,
                         ids=[f"{f}-{i}" for i, (_, f) in enumerate(INVALID)])
def test_invalid_field_raises_naming_it(changes, field):
    with pytest.raises(ValueError) as exc:
        MoEConfig(**{**BASE, **changes})
    assert field in str(exc.value)


def test_invalid_field_message_starts_with_the_field():
    with pytest.raises(ValueError, match=r"^hidden_size=True is invalid"):
        MoEConfig(**{**BASE, "hidden_size": True})


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_router_and_activation_is_accepted(router, activation):
    top_k = {"switch": 1, "sparsemixer": 2}.get(router, 2)
    cfg = MoEConfig(**{**BASE, "router": router, "activation": activation, "top_k": top_k})
    assert cfg.router == router and cfg.activation == activation
    assert cfg.gated == (activation in ("swiglu", "geglu", "geglu_tanh", "swiglu_oai"))


def test_valid_edge_values():
    MoEConfig(**{**BASE, "top_k": 4})  # K = N
    MoEConfig(**{**BASE, "capacity_factor": 1e-6})
    MoEConfig(**{**BASE, "capacity_factor": 2})  # an int is a number
    MoEConfig(**{**BASE, "aux_loss_coef": 0.0, "z_loss_coef": 0.0, "bias_update_rate": 0.0})
    MoEConfig(**{**BASE, "num_experts": 8, "n_groups": 4, "topk_groups": 4})
    MoEConfig(**{**BASE, "top_k": 1, "weights_on_input": True})


@pytest.mark.parametrize("cf, T, K, N, expected", [
    (1.0, 8, 2, 4, 4),       # 8*2/4
    (1.25, 8, 2, 4, 5),      # ceil(5.0)
    (1.25, 7, 2, 4, 5),      # ceil(4.375)
    (0.5, 5, 1, 4, 1),       # ceil(0.625)
    (2.0, 3, 2, 8, 2),       # ceil(1.5)
    (1.0, 0, 2, 4, 0),
])
def test_capacity_token_choice(cf, T, K, N, expected):
    cfg = MoEConfig(hidden_size=4, expert_size=4, num_experts=N, top_k=K, capacity_factor=cf)
    assert cfg.capacity(T) == expected == math.ceil(cf * T * K / N)
    assert not cfg.dropless


@pytest.mark.parametrize("cf, T, K, N, expected", [
    (None, 8, 2, 4, 4),      # c = K: 8*2/4
    (None, 3, 2, 4, 2),      # ceil(1.5)
    (2.0, 5, 1, 4, 3),       # ceil(2.5)
    (8.0, 5, 2, 4, 5),       # min(T, ceil(10))
    (None, 1, 2, 4, 1),
    (None, 0, 2, 4, 0),
])
def test_capacity_expert_choice(cf, T, K, N, expected):
    cfg = MoEConfig(hidden_size=4, expert_size=4, num_experts=N, top_k=K,
                    router="expert_choice", capacity_factor=cf)
    assert cfg.capacity(T) == expected
    assert not cfg.dropless


def test_dropless_and_capacity_without_factor():
    cfg = MoEConfig(**BASE)
    assert cfg.dropless and cfg.capacity(10) == 10


def test_shared_size():
    assert MoEConfig(**BASE).shared_size == 0
    assert MoEConfig(**BASE, num_shared_experts=2).shared_size == 8
    assert MoEConfig(**BASE, num_shared_experts=2, shared_expert_size=6).shared_size == 6


def test_replace_validates_and_round_trips():
    cfg = MoEConfig(**BASE, router="sigmoid_bias", capacity_factor=1.25)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(top_k=3).top_k == 3 and cfg.top_k == 2
    with pytest.raises(ValueError, match="top_k"):
        cfg.replace(top_k=9)
    with pytest.raises(ValueError, match="bogus"):
        MoEConfig.from_dict({**cfg.to_dict(), "bogus": 1})
