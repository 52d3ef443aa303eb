"""The MoE layer: the fast path equals the reference (``use_reference = True``: Python-walk plan,
dense all-experts combine) for every router, in dropless and capacity modes, forward and
backward; gradcheck in float64; K = N equals the dense softmax mixture; permutation
equivariance; backends; dtypes and shapes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import (FAST, ROUTER_TOP_K, TOKEN_CHOICE_ROUTERS, assert_close, assert_info_equal,
                      force_one_expert, make_layer, run, walk_capacity)
from smoe.config import ROUTERS

ACTS = ("swiglu", "gelu", "relu", "swiglu_oai", "geglu_tanh")


MODES = ("dropless", "capacity")  # for expert choice: c = top_k, or an explicit factor


@st.composite
def layer_cases(draw, max_tokens=12, router=None, mode=None):
    """A random small layer config, input shape, and scenario (router and mode drawn unless
    given)."""
    if router is None:
        router = draw(st.sampled_from(ROUTERS))
    if mode is None:
        mode = draw(st.sampled_from(MODES))
    E = draw(st.integers(2 if router == "sparsemixer" else 1, 6))
    K = ROUTER_TOP_K.get(router) or draw(st.integers(1, E))  # K = N included
    cf = None if mode == "dropless" else draw(st.sampled_from([0.5, 1.0, 1.25, 2.0]))
    one_expert = draw(st.booleans())
    num_shared = draw(st.integers(0, 1))
    cfg = dict(
        router=router, num_experts=E, top_k=K, capacity_factor=cf,
        hidden_size=draw(st.sampled_from([1, 4, 7, 8, 13])),
        expert_size=draw(st.sampled_from([1, 3, 4, 5, 8])),
        activation=draw(st.sampled_from(ACTS)),
        expert_bias=draw(st.booleans()),
        router_bias=one_expert or draw(st.booleans()),
        num_shared_experts=num_shared,
        shared_expert_gate=bool(num_shared) and draw(st.booleans()),
        weights_on_input=draw(st.booleans()),
        aux_loss_coef=0.01, z_loss_coef=0.001, seq_aux_loss_coef=0.001,
    )
    if router in ("softmax_topk", "sigmoid_bias"):
        cfg["routed_scaling_factor"] = draw(st.sampled_from([1.0, 2.5]))
        cfg["norm_topk_prob"] = draw(st.booleans())
    D = cfg["hidden_size"]
    kind = draw(st.sampled_from(["1d", "2d", "3d"]))
    if kind == "1d":
        shape = (D,)
    elif kind == "2d":
        shape = (draw(st.integers(0, max_tokens)), D)
    else:
        shape = (draw(st.integers(1, 3)), draw(st.integers(0, max_tokens // 3)), D)
    return dict(cfg=cfg, shape=shape, one_expert=one_expert, seed=draw(st.integers(0, 2 ** 16)),
                train=router == "noisy_topk" and draw(st.booleans()))


def _build(case):
    layer = make_layer(case["seed"], train=case["train"], **case["cfg"])
    if case["one_expert"]:
        force_one_expert(layer, expert=layer.config.num_experts - 1)
    x = torch.randn(case["shape"], generator=torch.Generator().manual_seed(case["seed"]))
    return layer, x


def _aligned(layer):
    c = layer.config
    return c.hidden_size % 4 == 0 and c.expert_size % 4 == 0


def _check_counts(layer, x, info):
    """Invariants that hold whatever the path: dropless sums, capacity walk, expert choice."""
    cfg = layer.config
    T = x.numel() // cfg.hidden_size
    counts = info.tokens_per_expert
    assert counts.shape == (cfg.num_experts,) and counts.dtype == torch.long
    if cfg.router == "expert_choice":
        assert counts.tolist() == [cfg.capacity(T)] * cfg.num_experts
    elif cfg.dropless:
        assert int(counts.sum()) == T * cfg.top_k
        assert int(info.dropped_tokens) == 0 == int(info.dropped_assignments)
    else:
        _, taken, dropped_assignments, dropped_tokens = walk_capacity(
            info.expert_indices, info.expert_weights, cfg.num_experts, cfg.capacity(T))
        assert counts.tolist() == taken
        assert int(info.dropped_assignments) == dropped_assignments
        assert int(info.dropped_tokens) == dropped_tokens


# -- forward: fast == reference -----------------------------------------------------------------
def _compare_fast_and_reference(case, no_grad=False):
    layer, x = _build(case)
    ctx = torch.no_grad() if no_grad else torch.enable_grad()
    with ctx:
        y_ref, info_ref = run(layer, x, reference=True, noise_seed=1)
        backends = ["auto", "loop"] + (["grouped_mm"] if _aligned(layer) else [])
        for backend in backends:
            layer.experts.backend = backend
            y, info = run(layer, x, reference=False, noise_seed=1)
            assert y.shape == x.shape and y.dtype == x.dtype
            assert_close(y, y_ref)
            assert_info_equal(info, info_ref)
            assert torch.equal(info.router_logits, info_ref.router_logits)
    assert info.router_logits.dtype == torch.float32
    _check_counts(layer, x, info)
    cfg = layer.config
    if case["one_expert"] and cfg.router != "expert_choice" and not case["train"]:
        assert (info.expert_indices[:, 0] == cfg.num_experts - 1).all()
        if cfg.dropless:
            assert int(info.tokens_per_expert[-1]) == x.numel() // cfg.hidden_size


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("router", ROUTERS)
def test_fast_equals_reference(router, mode):
    @settings(FAST, max_examples=12)
    @given(case=layer_cases(router=router, mode=mode), no_grad=st.booleans())
    def check(case, no_grad):
        _compare_fast_and_reference(case, no_grad)

    check()


EDGES = {
    "T0-2d": dict(shape=(0, 8)),
    "T0-3d": dict(shape=(2, 0, 8)),
    "T1": dict(shape=(1, 8)),
    "1d": dict(shape=(8,)),
    "3d": dict(shape=(2, 5, 8)),
    "one-expert": dict(shape=(9, 8), one_expert=True),
    "K=N": dict(shape=(7, 8), top_k=4),
    "odd-D7": dict(shape=(2, 3, 7), hidden_size=7, expert_size=3),
    "odd-D13": dict(shape=(6, 13), hidden_size=13, expert_size=5),
}


@pytest.mark.parametrize("router, mode, edge", [
    (r, m, e) for r in ROUTERS for m in MODES for e in EDGES
    if not ("top_k" in EDGES[e] and r in ROUTER_TOP_K)])  # switch, sparsemixer: fixed K
def test_fast_equals_reference_edges(router, mode, edge):
    """Every router and mode on each edge case, deterministically (with and without autograd:
    T <= 1 without autograd takes the decode path)."""
    spec = dict(EDGES[edge])
    shape, one_expert = spec.pop("shape"), spec.pop("one_expert", False)
    cfg = dict(router=router, capacity_factor=None if mode == "dropless" else 1.0,
               router_bias=one_expert, aux_loss_coef=0.01, z_loss_coef=0.001, **spec)
    for no_grad in (False, True):
        _compare_fast_and_reference(dict(cfg=cfg, shape=shape, one_expert=one_expert, seed=21,
                                         train=router == "noisy_topk"), no_grad)


@settings(FAST, max_examples=30)
@given(case=layer_cases(max_tokens=6), decode_max=st.sampled_from([1, 4, 16]))
def test_decode_path_equals_reference(case, decode_max):
    """Few tokens without autograd take the per-(token, expert) decode path."""
    layer, x = _build(case)
    layer.decode_max_tokens = decode_max
    with torch.no_grad():
        y_ref, info_ref = run(layer, x, reference=True, noise_seed=2)
        y, info = run(layer, x, reference=False, noise_seed=2)
    assert_close(y, y_ref)
    assert_info_equal(info, info_ref)


def test_empty_batches():
    """T = 0 for every router and mode; hidden size 7 runs the loop backend. The output stays
    in the autograd graph (also with weights_on_input, where nothing else connects it)."""
    configs = [dict(router=r, capacity_factor=cf) for r in ROUTERS for cf in (None, 1.0)]
    configs.append(dict(router="switch", weights_on_input=True))
    for changes in configs:
        for backend in ("auto", "grouped_mm"):
            layer = make_layer(hidden_size=7 if backend == "auto" else 8, **changes)
            layer.experts.backend = backend
            D = layer.config.hidden_size
            for shape in ((0, D), (2, 0, D)):
                x = torch.randn(shape, requires_grad=True)
                y, info = layer(x)
                assert y.shape == shape
                assert info.tokens_per_expert.tolist() == [0] * 4
                assert int(info.dropped_tokens) == 0 == int(info.dropped_assignments)
                assert info.aux_loss.item() == 0.0 and info.z_loss.item() == 0.0
                assert y.requires_grad
                (y.sum() + info.loss).backward()
                assert x.grad.shape == shape


# -- backward: fast == reference ---------------------------------------------------------------
def _grads(layer, x, reference, noise_seed):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y, info = run(layer, x, reference=reference, noise_seed=noise_seed)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    ((y * g).sum() + info.loss).backward()
    grads = {"x": x.grad}
    for name, p in layer.named_parameters():
        # An expert with no rows may get no gradient at all on the fast path: that is zero.
        grads[name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return grads


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("router", ROUTERS)
def test_gradients_equal_reference(router, mode):
    """Gradients of x and of every parameter, fast vs reference, float32 within 1e-5."""
    @settings(FAST, max_examples=6)
    @given(case=layer_cases(max_tokens=9, router=router, mode=mode),
           backend=st.sampled_from(["auto", "loop"]))
    def check(case, backend):
        layer, x = _build(case)
        layer.experts.backend = backend
        ref = _grads(layer, x, True, noise_seed=3)
        fast = _grads(layer, x, False, noise_seed=3)
        assert ref.keys() == fast.keys()
        for name in ref:
            assert_close(fast[name], ref[name])

    check()


GRADCHECK_CASES = [
    dict(router="softmax_topk"),
    dict(router="softmax_topk", capacity_factor=1.0),
    dict(router="topk_softmax", expert_bias=True, router_bias=True),
    dict(router="noisy_topk"),  # eval mode: no noise, differentiable
    dict(router="switch", capacity_factor=1.25),
    dict(router="expert_choice"),
    dict(router="sigmoid_bias", routed_scaling_factor=2.5, seq_aux_loss_coef=0.01),
    dict(router="sparsemixer"),
    dict(router="softmax_topk", num_shared_experts=1, shared_expert_gate=True,
         activation="gelu"),
    dict(router="switch", weights_on_input=True),
]


@pytest.mark.parametrize("changes", GRADCHECK_CASES, ids=lambda c: "-".join(
    f"{k}={v}" for k, v in c.items()))
def test_gradcheck_float64(changes):
    """gradcheck of the fast path (float64 runs the loop backend) w.r.t. the input and every
    parameter, for the output and the weighted losses."""
    layer = make_layer(11, dtype=torch.float64, hidden_size=4, expert_size=3, num_experts=4,
                       **changes)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    buffers = dict(layer.named_buffers())

    def f(x, *ps):
        state = {**dict(zip(names, ps)), **buffers}
        y, info = torch.func.functional_call(layer, state, (x,))
        # info.loss = aux + z: for expert choice aux_loss alone is a constant zero with no
        # grad_fn, which gradcheck mis-indexes among the outputs.
        return y, info.loss

    y, _ = f(x, *params)
    assert y.dtype == torch.float64
    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), *params), eps=1e-6,
                                    atol=1e-5, rtol=1e-4, fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: f(x, *params)[0], (x,), eps=1e-6, atol=1e-5)


def test_float64_fast_equals_reference_tightly():
    for router in ROUTERS:
        layer = make_layer(12, dtype=torch.float64, router=router)
        x = torch.randn(9, 8, dtype=torch.float64)
        y, info = run(layer, x, reference=False)
        y_ref, _ = run(layer, x, reference=True)
        assert info.router_logits.dtype == torch.float64
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)


# -- K = N is the dense mixture -------------------------------------------------------------------
@pytest.mark.parametrize("router, norm", [("softmax_topk", True), ("softmax_topk", False),
                                          ("topk_softmax", True)])
def test_k_equals_n_is_the_dense_softmax_mixture(router, norm):
    E, D, Fw = 4, 8, 5
    layer = make_layer(13, router=router, num_experts=E, top_k=E, norm_topk_prob=norm,
                       hidden_size=D, expert_size=Fw, activation="swiglu")
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(13))
    y, info = layer(x)
    # by hand from the raw weights: sum_e softmax(x W^T)_e * expert_e(x)
    with torch.no_grad():
        p = torch.softmax(x @ layer.router.weight.T, dim=-1)
        gate_up, down = layer.experts.gate_up_proj, layer.experts.down_proj
        expected = torch.zeros_like(x)
        for e in range(E):
            gate, up = gate_up[e, :Fw], gate_up[e, Fw:]
            h = F.silu(x @ gate.T) * (x @ up.T)
            expected += p[:, e:e + 1] * (h @ down[e].T)
    assert_close(y, expected)
    assert info.tokens_per_expert.tolist() == [10] * E


def test_shared_experts_are_added_by_hand():
    layer = make_layer(14, num_shared_experts=2, shared_expert_gate=True, activation="swiglu")
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(14))
    y, info = layer(x)
    with torch.no_grad():
        sh = layer.shared_experts
        shared = F.silu(x @ sh.gate_proj.weight.T) * (x @ sh.up_proj.weight.T)
        shared = torch.sigmoid(x @ layer.shared_expert_gate.weight.T) * (
            shared @ sh.down_proj.weight.T)
        routed = torch.zeros_like(x)
        for t in range(6):
            for e, w in zip(info.expert_indices[t].tolist(), info.expert_weights[t].tolist()):
                routed[t] += w * layer.experts.expert_forward(x[t:t + 1], e)[0]
    assert sh.up_proj.weight.shape == (8, 8)  # 2 shared experts x F = 4
    assert_close(y, routed + shared)


# -- permutation equivariance (dropless) -------------------------------------------------------
@FAST
@given(router=st.sampled_from(TOKEN_CHOICE_ROUTERS), T=st.integers(1, 12), data=st.data(),
       seed=st.integers(0, 2 ** 16))
def test_dropless_is_permutation_equivariant(router, T, data, seed):
    layer = make_layer(seed, router=router, hidden_size=7, expert_size=5, num_experts=5,
                       top_k=ROUTER_TOP_K.get(router, 3))
    perm = torch.tensor(data.draw(st.permutations(list(range(T)))))
    x = torch.randn(T, 7, generator=torch.Generator().manual_seed(seed))
    y, info = layer(x)
    y_perm, info_perm = layer(x[perm])
    assert_close(y_perm, y[perm])
    assert torch.equal(info.tokens_per_expert, info_perm.tokens_per_expert)
    assert int(info.tokens_per_expert.sum()) == T * layer.config.top_k


# -- backends -----------------------------------------------------------------------------------
@FAST
@given(case=layer_cases(max_tokens=9))
def test_loop_and_grouped_mm_backends_agree(case):
    case["cfg"].update(hidden_size=8, expert_size=4)
    case["shape"] = case["shape"][:-1] + (8,)
    layer, x = _build(case)
    outs = {}
    for backend in ("loop", "grouped_mm"):
        layer.experts.backend = backend
        outs[backend] = (_grads(layer, x, False, noise_seed=5),
                         run(layer, x, reference=False, noise_seed=5)[0])
    assert_close(outs["loop"][1], outs["grouped_mm"][1])
    for name, g in outs["loop"][0].items():
        assert_close(g, outs["grouped_mm"][0][name])


def test_unknown_backend_raises():
    layer = make_layer()
    with pytest.raises(ValueError, match="backend"):
        layer.experts.backend = "triton"


# -- dtypes and shapes ----------------------------------------------------------------------------
@pytest.mark.parametrize("router", ROUTERS)
def test_bfloat16(router):
    layer16 = make_layer(15, router=router, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(15)).bfloat16()
    # the same (bf16-rounded) weights and input in float32: the router, which runs in float32
    # either way, makes the same choices, so only the experts' precision differs
    layer32 = copy.deepcopy(layer16).float()
    y16, info16 = layer16(x)
    assert y16.dtype == torch.bfloat16 and y16.shape == x.shape
    assert info16.router_logits.dtype == torch.float32
    if info16.expert_weights is not None:
        assert info16.expert_weights.dtype == torch.float32
    y_ref, _ = run(layer16, x, reference=True)
    assert y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y_ref.float(), atol=2e-2, rtol=2e-2)
    y32, info32 = layer32(x.float())
    torch.testing.assert_close(info16.router_logits, info32.router_logits)
    torch.testing.assert_close(y16.float(), y32, atol=3e-2, rtol=3e-2)


def test_output_shape_equals_input_shape():
    layer = make_layer(16)
    x = torch.randn(2, 3, 8)
    y3, _ = layer(x)
    y2, _ = layer(x.reshape(6, 8))
    y1, _ = layer(x[0, 0])
    assert y3.shape == (2, 3, 8) and y2.shape == (6, 8) and y1.shape == (8,)
    assert_close(y3.reshape(6, 8), y2)
    assert_close(y1, y2[0])


@pytest.mark.parametrize("shape", [(4, 7), (7,), (2, 3, 9), (4, 0)])
def test_wrong_hidden_size_raises(shape):
    with pytest.raises(ValueError, match="hidden_size"):
        make_layer(17)(torch.randn(shape))


def test_grouped_mm_capability_probe():
    """``auto`` asks :func:`grouped_mm_runs_on` before taking the grouped GEMM: on CPU the three
    float dtypes run (no probe), anything else goes to ``loop``; a probe's answer on another
    device is remembered per (device, dtype) (the cache holds only what was asked)."""
    from smoe.nn import experts

    cpu = torch.device("cpu")
    assert all(experts.grouped_mm_runs_on(cpu, dt) for dt in experts.GROUPED_MM_DTYPES)
    assert not experts.grouped_mm_runs_on(cpu, torch.float64)
    assert not experts.grouped_mm_runs_on(cpu, torch.int8)
    assert all(key[0] != "cpu" for key in experts._GROUPED_MM_RUNS)
