"""The seams of the MoE layer: an experts module or a dispatcher swapped in from outside is used
on every path (prefill, the CPU decode shortcut, training), the experts protocol's default
forward and a registered backend equal the per-expert reference, and ``use_reference`` is the
free function :func:`smoe.nn.reference.moe_reference`.

The swapped experts double their output. The same model with ``down_proj`` (and its bias)
doubled computes the same numbers in the same kernels (scaling by 2 is exact in floating point),
so the two are compared at 1e-6; if a path bypassed the swapped module its output would differ
by a factor of two on the routed part.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_layer
from smoe.config import ModelConfig, MoEConfig
from smoe.inference import generate
from smoe.model import SMoETransformer
from smoe.nn.dispatch import Dispatched, LocalDispatcher
from smoe.nn.experts import (EXPERTS_BACKENDS, ExpertsBackend, ExpertsBase, StackedWeights,
                             register_experts_backend)
from smoe.nn.reference import moe_reference

V = 64


class DoublingExperts(ExpertsBase):
    """Wraps stacked experts (implements the protocol) and doubles their output; counts calls."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__(inner.config)
        self.inner = inner
        self.calls = {"forward": 0, "expert_forward": 0}

    def forward(self, x_AD, counts_E, expert_A=None):
        self.calls["forward"] += 1
        return 2 * self.inner(x_AD, counts_E, expert_A)

    def expert_forward(self, x_RD, e):
        self.calls["expert_forward"] += 1
        return 2 * self.inner.expert_forward(x_RD, e)


class CountingDispatcher(LocalDispatcher):
    """The local dispatcher, counting its halves."""

    def __init__(self, decode_shortcut: bool = True) -> None:
        super().__init__()
        self.decode_shortcut = decode_shortcut
        self.calls = {"dispatch": 0, "combine": 0, "decode": 0}

    def dispatch(self, x_TD, route, **kw) -> Dispatched:
        self.calls["dispatch"] += 1
        return super().dispatch(x_TD, route, **kw)

    def combine(self, y_AD, d, **kw):
        self.calls["combine"] += 1
        return super().combine(y_AD, d, **kw)

    def decode(self, x_TD, route, experts, **kw):
        self.calls["decode"] += 1
        return super().decode(x_TD, route, experts, **kw)


def small_model(seed: int = 0, **moe_changes) -> SMoETransformer:
    moe = MoEConfig(hidden_size=32, expert_size=24, num_experts=4, top_k=2, expert_bias=True,
                    num_shared_experts=1, aux_loss_coef=0.01, z_loss_coef=0.001, **moe_changes)
    cfg = ModelConfig(vocab_size=V, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                      max_seq_len=32, ffn_size=48, first_dense_layers=1, moe=moe)
    torch.manual_seed(seed)
    model = SMoETransformer(cfg)
    with torch.no_grad():  # non-zero expert biases, so that they matter
        for _, layer in model.moe_layers():
            layer.experts.down_proj_bias.normal_(std=0.1)
    return model


def swapped_and_twin(model: SMoETransformer):
    """(model with DoublingExperts in every MoE layer, twin with doubled down projections)."""
    swapped, twin = copy.deepcopy(model), copy.deepcopy(model)
    for _, layer in swapped.moe_layers():
        layer.experts = DoublingExperts(layer.experts)
    with torch.no_grad():
        for _, layer in twin.moe_layers():
            layer.experts.down_proj.mul_(2)
            layer.experts.down_proj_bias.mul_(2)
    return swapped, twin


def calls(model, key):
    return sum(layer.experts.calls[key] for _, layer in model.moe_layers())


def test_swapped_experts_are_used_on_every_path():
    model = small_model()
    swapped, twin = swapped_and_twin(model)
    idx = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))

    # Prefill without autograd: the sorted path, through experts.forward.
    with torch.no_grad():
        out, ref = swapped(idx).logits, twin(idx).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert calls(swapped, "forward") == 2 and calls(swapped, "expert_forward") == 0
    assert not torch.allclose(out, model(idx).logits, atol=1e-3)  # doubling is visible

    # Decode (T = 1, no grad, CPU): the shortcut, through experts.expert_forward.
    before = calls(swapped, "forward")
    gen, gen_ref = generate(swapped, idx[:1, :4], 6), generate(twin, idx[:1, :4], 6)
    assert torch.equal(gen, gen_ref)
    assert calls(swapped, "expert_forward") == 2 * 2 * 5  # 2 layers x K=2 x 5 decode steps
    assert calls(swapped, "forward") == before + 2  # the prefill of the prompt

    # Training: forward and backward through experts.forward. The two models compute the same
    # function of everything but the expert weights, so losses and router gradients agree.
    swapped.train(), twin.train()
    for m in (swapped, twin):
        m.zero_grad()
    torch.manual_seed(3)
    out_s = swapped(idx, targets_BT=idx)
    out_t = twin(idx, targets_BT=idx)
    torch.testing.assert_close(out_s.total_loss, out_t.total_loss, atol=1e-6, rtol=1e-6)
    out_s.total_loss.backward(), out_t.total_loss.backward()
    for (_, ls), (_, lt) in zip(swapped.moe_layers(), twin.moe_layers()):
        torch.testing.assert_close(ls.router.weight.grad, lt.router.weight.grad,
                                   atol=1e-6, rtol=1e-5)
        assert ls.experts.inner.down_proj.grad is not None
    assert calls(swapped, "forward") == before + 2 + 2


@pytest.mark.parametrize("decode_shortcut", [True, False])
def test_swapped_dispatcher_is_used_on_every_path(decode_shortcut):
    model = small_model(seed=2)
    for _, layer in model.moe_layers():
        layer.dispatcher = CountingDispatcher(decode_shortcut)
    idx = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(2))
    plain = small_model(seed=2)
    out = generate(model, idx, 4)
    assert torch.equal(out, generate(plain, idx, 4))
    per_layer = [layer.dispatcher.calls for _, layer in model.moe_layers()]
    for c in per_layer:
        # 1 prefill + 3 decode steps: the decode steps take the shortcut when it is on.
        assert c["decode"] == (3 if decode_shortcut else 0)
        assert c["dispatch"] == c["combine"] == (1 if decode_shortcut else 4)
    model.train()
    model(idx, targets_BT=idx).total_loss.backward()
    assert all(c["dispatch"] == c["combine"] == (2 if decode_shortcut else 5) for c in per_layer)


def test_use_reference_is_the_free_function():
    layer = make_layer(4, num_shared_experts=1, shared_expert_gate=True, capacity_factor=1.0,
                       expert_bias=True)
    x = torch.randn(11, 8, generator=torch.Generator().manual_seed(4))
    layer.use_reference = True
    y, info = layer(x)
    y_free, plan = moe_reference(layer, x)
    assert torch.equal(y, y_free)
    assert torch.equal(info.tokens_per_expert, plan.counts_E)
    layer.use_reference = False
    torch.testing.assert_close(layer(x)[0], y_free, atol=1e-5, rtol=1e-5)


def test_protocol_default_forward_equals_stacked_backends():
    """ExpertsBase.forward (a loop over expert_forward) is what a format gets for free."""
    layer = make_layer(5, expert_bias=True)
    experts = layer.experts
    counts_E = torch.tensor([3, 0, 4, 2])
    expert_A = torch.repeat_interleave(torch.arange(4), counts_E)
    x_AD = torch.randn(9, 8, generator=torch.Generator().manual_seed(5))
    default = ExpertsBase.forward(experts, x_AD, counts_E, expert_A)
    for backend in ("loop", "grouped_mm"):
        experts.backend = backend
        torch.testing.assert_close(experts(x_AD, counts_E, expert_A), default,
                                   atol=1e-5, rtol=1e-5)
    assert ExpertsBase.forward(experts, x_AD[:0], torch.zeros(4, dtype=torch.long)).shape == (0, 8)


def test_registered_backend_is_used_and_judged_against_the_reference():
    used = []

    def dense_einsum(w: StackedWeights, x_AD, counts_E, expert_A, act):
        used.append(x_AD.shape[0])
        h = torch.einsum("ad,adi->ai", x_AD, w.w_in[expert_A]) + w.b_in[expert_A]
        return torch.einsum("af,afd->ad", act(h), w.w_down[expert_A]) + w.b_down[expert_A]

    register_experts_backend("test_einsum", ExpertsBackend(dense_einsum))
    try:
        layer = make_layer(6, expert_bias=True)
        x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(6))
        y_ref, _ = moe_reference(layer, x.reshape(-1, 8))
        layer.experts.backend = "test_einsum"
        y, _ = layer(x)
        assert used == [24]  # 12 tokens x K = 2
        torch.testing.assert_close(y.reshape(-1, 8), y_ref, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="name"):
            register_experts_backend("auto", ExpertsBackend(dense_einsum))
    finally:
        EXPERTS_BACKENDS.pop("test_einsum")


def test_info_does_not_hold_the_layer_and_release_drops_router_tensors():
    layer = make_layer(7, aux_loss_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(7))
    _, info = layer(x)
    assert not any(v is layer for v in vars(info).values())
    aux = info.aux_loss
    counts = info.tokens_per_expert
    info.release()
    assert info.router_logits is None
    assert torch.equal(info.aux_loss, aux) and torch.equal(info.tokens_per_expert, counts)
    assert info.expert_indices.shape == (10, 2)
    with pytest.raises(ValueError, match="z_loss"):
        info.z_loss
    with torch.no_grad():  # the decode shortcut leaves no plan: counts come from the choices
        _, info1 = layer(x[:1])
    info1.release()
    assert int(info1.tokens_per_expert.sum()) == 2 and int(info1.dropped_tokens) == 0


def test_core_imports_nothing_outside_the_core():
    """``nn/`` and ``model.py`` load no train, hf, inference, monitor, serve or parallel module
    (``smoe.model.KVCache``, the old name of the static cache, resolves lazily on use)."""
    import subprocess
    import sys

    code = ("import sys, smoe.model, smoe.nn; print(sorted(m for m in sys.modules if "
            "m.split('.')[:2][-1] in ('train', 'hf', 'inference', 'monitor', 'serve', "
            "'parallel') and m.startswith('smoe.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_model_output_release_keeps_losses_read_and_counts():
    model = small_model(seed=8)
    idx = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(8))
    out = model(idx, targets_BT=idx)
    total = out.total_loss.detach().clone()
    counts = [i.tokens_per_expert.clone() for i in out.moe_infos]
    out.release()
    assert all(i.router_logits is None for i in out.moe_infos)
    assert torch.equal(out.total_loss.detach(), total)
    assert all(torch.equal(i.tokens_per_expert, c) for i, c in zip(out.moe_infos, counts))
