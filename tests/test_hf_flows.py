"""Patched transformers models in the flows users run besides a plain forward: torch.compile,
meta-device building then materialising, configs transformers accepts that smoe's own config
would not, and ``set_experts_implementation``.

Every test compares the patched model with the same model unpatched (transformers' own code on
the same weights), or checks the exact refusal.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # noqa: E402 - before transformers is imported

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import smoe.hf  # noqa: E402
from smoe.hf.families import BLOCKS  # noqa: E402
from smoe.nn.grouped_mm import grouped_mm  # noqa: E402

transformers.utils.logging.set_verbosity_error()

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
           qk_nope_head_dim=8, v_head_dim=8)
MIXTRAL = dict(intermediate_size=16, num_local_experts=6, num_experts_per_tok=2)
# The test config of transformers' own DeepSeek-V3 suite: 8 experts in 2 groups, 1 group kept
# (4 experts), yet top_k = 8.
DEEPSEEK_V3_TESTER = dict(intermediate_size=32, moe_intermediate_size=16, n_shared_experts=1,
                          n_routed_experts=8, routed_scaling_factor=2.5, n_group=2,
                          topk_group=1, num_experts_per_tok=8, first_k_dense_replace=1,
                          norm_topk_prob=True, **MLA)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(family: str, seed: int = 0, **kwargs) -> nn.Module:
    config = AutoConfig.for_model(family, **{**BASE, **kwargs})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _init_(model)
    return model.eval()


def _init_(model: nn.Module) -> None:
    """Non-trivial random weights (and selection biases) so that routing matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(std=0.2)
        for name, b in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                b.normal_(std=0.1)


def _ids(seed: int = 0, batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# -- torch.compile --------------------------------------------------------------------------
def test_grouped_mm_custom_op_matches_aten_with_gradients():
    """``smoe::grouped_mm`` (what runs under compile) against aten's ``_grouped_mm`` in eager:
    same kernel on the same data, so values and gradients are equal; an expert with no rows
    gets a zero weight gradient."""
    from smoe.nn.grouped_mm import _grouped_mm_op

    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 8, generator=g)
    w = torch.randn(3, 8, 12, generator=g)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    probe = torch.randn(10, 12, generator=g)
    a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = torch.nn.functional.grouped_mm(a, b, offs=offs)
    (ref * probe).sum().backward()
    c, d = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = _grouped_mm_op(c, d, offs)
    out.sum().backward()  # a zero-stride incoming gradient: aten's own backward rejects it
    c.grad = d.grad = None
    out = _grouped_mm_op(c, d, offs)
    (out * probe).sum().backward()
    assert torch.equal(out, ref)
    torch.testing.assert_close(c.grad, a.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(d.grad, b.grad, rtol=0, atol=1e-6)
    assert torch.equal(d.grad[1], torch.zeros(8, 12))
    torch.library.opcheck(_grouped_mm_op, (x, w, offs),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@pytest.mark.slow
def test_compiled_patched_block_equals_eager_fullgraph():
    """A patched float32 Mixtral block compiles with ``fullgraph=True`` (as transformers'
    original does) and equals the eager block, forward and backward. Both run the same aten
    grouped GEMM; compiled code may fuse the elementwise ops around it, so the comparison
    allows float32 rounding (1e-5 of outputs of order 1)."""
    torch._dynamo.reset()
    model = _model("mixtral", **MIXTRAL)
    smoe.hf.patch(model)
    block = model.model.layers[0].mlp
    assert type(block).__name__ in BLOCKS
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = block(xa)
    y = compiled(xb)
    assert _max_diff(y, y_ref) <= 1e-5
    probe = torch.randn_like(y_ref)
    (y_ref * probe).sum().backward()
    grads_ref = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad(set_to_none=True)
    (y * probe).sum().backward()
    assert _max_diff(xa.grad, xb.grad) <= 1e-5
    for n, p in block.named_parameters():
        assert _max_diff(p.grad, grads_ref[n]) <= 1e-5, n


@pytest.mark.slow
def test_compiled_patched_model_records_router_logits():
    """Compiled whole model with ``output_router_logits``: the router's recording hooks still
    see the replayed router output (no ContextVar under compile), and the aux loss matches.
    ``aot_eager`` traces the same graph (fake tensors, the custom operator's shape rule,
    fullgraph) without Inductor's C++ code generation, which the block test above covers."""
    torch._dynamo.reset()
    model = _model("qwen3_moe", intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                   num_experts_per_tok=2, norm_topk_prob=True, head_dim=8, num_hidden_layers=1)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids, output_router_logits=True)
        smoe.hf.patch(model)
        compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
        out = compiled(ids, output_router_logits=True)
    assert _max_diff(out.logits, ref.logits) <= 1e-5
    assert len(out.router_logits) == len(ref.router_logits) == 1
    assert _max_diff(out.router_logits[0], ref.router_logits[0]) <= 1e-5
    assert abs(out.aux_loss.item() - ref.aux_loss.item()) <= 1e-6


def test_compiled_patched_block_decodes_one_token_fullgraph():
    """One token without autograd on CPU takes smoe's decode shortcut in eager mode, which reads
    the routing on the host; under compile the sorted path runs instead, so a decode step
    still compiles as one graph and gives the eager result."""
    torch._dynamo.reset()
    model = _model("mixtral", **MIXTRAL)
    smoe.hf.patch(model)
    block = model.model.layers[1].mlp
    x = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = block(x)
        out = torch.compile(block, fullgraph=True, dynamic=False, backend="aot_eager")(x)
    assert _max_diff(out, ref) <= 1e-6


def test_grouped_mm_wrapper_is_plain_aten_in_eager():
    """Eager calls do not go through the custom operator (its dispatch costs tens of us)."""
    x, w = torch.randn(4, 8), torch.randn(2, 8, 4)
    offs = torch.tensor([1, 4], dtype=torch.int32)
    with torch.autograd.profiler.profile() as prof:
        grouped_mm(x, w, offs)
    names = {e.name for e in prof.function_events}
    assert "aten::_grouped_mm" in names and not any(n.startswith("smoe::") for n in names)


# -- meta device ----------------------------------------------------------------------------
@pytest.mark.parametrize("family,kwargs", [
    ("deepseek_v3", dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                         num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=0,
                         **MLA)),
    ("lfm2_moe", dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                      num_experts_per_tok=2, num_dense_layers=0,
                      layer_types=["full_attention", "conv"])),
    ("mixtral", MIXTRAL),
])
def test_patch_on_meta_then_materialise(family, kwargs):
    """Build on meta, patch, ``to_empty`` and initialise (what low-memory loading and FSDP do):
    the first forward works and equals the unpatched model on the same weights; a training
    forward counts load on the right device."""
    config = AutoConfig.for_model(family, **{**BASE, **kwargs})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    smoe.hf.patch(model)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    _init_(model)
    model.eval()
    ids = _ids()
    with torch.no_grad():
        out = model(ids).logits
        smoe.hf.unpatch(model)
        ref = model(ids).logits
    assert _max_diff(out, ref) <= 1e-5
    smoe.hf.patch(model)
    model.train()
    model(ids)
    for layer in smoe.hf.patched_layers(model).values():
        if layer.load_since_update is not None:
            assert layer.load_since_update.device.type == "cpu"
            assert int(layer.load_since_update.sum()) == ids.numel() * layer.config.top_k


# -- configs transformers accepts -----------------------------------------------------------
@pytest.mark.parametrize("family,kwargs", [
    # transformers' DeepSeek-V3 tester: top_k = E, so every expert is picked, groups or not.
    ("deepseek_v3", DEEPSEEK_V3_TESTER),
    ("glm4_moe", dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=6,
                      num_experts_per_tok=6, n_shared_experts=1, n_group=3, topk_group=1,
                      head_dim=8, num_nextn_predict_layers=0)),
    # DeepSeek-V2 zeroes the dropped groups' scores: picks beyond the kept experts weigh 0.
    ("deepseek_v2", dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                         num_experts_per_tok=6, n_shared_experts=1, n_group=4, topk_group=2,
                         topk_method="group_limited_greedy", routed_scaling_factor=1.5,
                         first_k_dense_replace=0, **MLA)),
])
def test_group_limited_top_k_above_kept_experts(family, kwargs):
    model = _model(family, **kwargs)
    ids, labels = _ids(), _ids(1)
    model.train()
    ref = model(ids, labels=labels)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    smoe.hf.patch(model)
    out = model(ids, labels=labels)
    out.loss.backward()
    assert _max_diff(out.logits, ref.logits) <= 1e-5
    for n, g in ref_grads.items():
        assert _max_diff(model.get_parameter(n).grad, g) <= 1e-4 * max(1.0, g.abs().max().item())
    model.eval()
    with torch.no_grad():
        gen = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
        smoe.hf.unpatch(model)
        assert torch.equal(gen, model.generate(ids[:1], max_new_tokens=6, do_sample=False))


def test_group_limited_top_k_between_kept_and_all_is_refused_with_the_difference():
    """4 kept experts < top_k 6 < 8 experts: which dropped experts transformers adds depends on
    torch.topk's tie order among -inf scores; the refusal says so and what would work."""
    model = _model("deepseek_v3", **{**DEEPSEEK_V3_TESTER, "num_experts_per_tok": 6})
    with pytest.raises(ValueError, match=r"top_k=6 .* only 4: .*tie order.*top_k <= 4, "
                                         r"top_k = 8"):
        smoe.hf.patch(model)
    assert not smoe.hf.is_patched(model)


# -- experts implementation -----------------------------------------------------------------
def test_set_experts_implementation_is_honoured():
    model = _model("mixtral", **MIXTRAL)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    smoe.hf.patch(model)
    layers = list(smoe.hf.patched_layers(model).values())
    expected = {"eager": "loop", "grouped_mm": "grouped_mm", "batched_mm": "auto"}
    for impl, backend in expected.items():
        model.set_experts_implementation(impl)
        with torch.no_grad():
            out = model(ids).logits
        assert all(layer.experts.backend == backend for layer in layers), impl
        assert _max_diff(out, ref) <= 1e-5
    model.config._experts_implementation_internal = "no_such_kernel"
    with pytest.raises(ValueError, match="experts_implementation='no_such_kernel' has no smoe "
                                         "equivalent"):
        model(ids)


def test_patch_does_not_initialise_the_meta_layers():
    """The smoe layers only view the model's tensors: building them runs no initialiser (meta
    ``normal_`` goes through Python references at milliseconds a call, which made ``patch``
    cost as much as building the tiny model). A mode below the patch's own sees any that
    slips through."""
    from torch.overrides import TorchFunctionMode

    inits = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__module__", "") == "torch.nn.init" or func in (
                    torch.Tensor.normal_, torch.Tensor.uniform_):
                inits.append(func)
            return func(*args, **(kwargs or {}))

    model = _model("deepseek_v3", **DEEPSEEK_V3_TESTER)
    with Spy():
        smoe.hf.patch(model)
    assert inits == []
    assert len(smoe.hf.patched_layers(model)) == 1
