"""smoe.hf.patch on the MoE families transformers 5.23 added after the main table
(``tests/test_hf_patch.py``): each patched tiny random model (or, where transformers has no
text-only model class, the family's sparse MoE block alone) computes what the original does,
and each family smoe cannot compute is refused with the missing feature named.

Same tolerances as the main table: float32 outputs within 1e-5, gradients within 1e-4 of their
largest entry (the two paths sum the same products in different orders), bfloat16 outputs
within 2e-2 of the output scale (see ``test_patched_model_close_to_original_bf16``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # noqa: E402 - before transformers is imported

import importlib

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402

import smoe.hf  # noqa: E402
from smoe.hf.families import BLOCKS  # noqa: E402

from test_hf_patch import BASE, MLA, _init_, _inputs, _max_diff  # noqa: E402

transformers.utils.logging.set_verbosity_error()

QWEN4_EXP = dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                 linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                 hc_count=2, hc_lowrank=8, ngram_vocab_size_base=1000, split_ngram_parts=4,
                 heads_per_ngram=2, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8,
                 indexer_budget=8, indexer_compress_ratio=2)


def case(family: str, name: str, model_type: str, head: str, **kwargs):
    """``head``: ``lm`` (AutoModelForCausalLM, loss on labels) or ``model`` (the text decoder
    of a composite model through AutoModel, loss on its last hidden state)."""
    return pytest.param(family, model_type, head, kwargs, id=f"{family}-{name}")


MODEL_CASES = [
    case("mistral4", "e8k2-groups", "mistral4", "model", intermediate_size=48,
         moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
         n_group=4, topk_group=2, routed_scaling_factor=1.5, **MLA),
    case("mistral4", "e6k3-nonorm", "mistral4", "model", intermediate_size=48,
         moe_intermediate_size=16, n_routed_experts=6, num_experts_per_tok=3, n_shared_experts=2,
         n_group=1, topk_group=1, norm_topk_prob=False, **MLA),
    case("mistral_large4", "e8k2-groups", "mistral_large4_text", "model", intermediate_size=48,
         moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
         n_group=4, topk_group=1, routed_scaling_factor=2.0, **MLA),
    case("qwen3_vl_moe", "e6k2", "qwen3_vl_moe_text", "model", intermediate_size=48,
         moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2, head_dim=8),
    case("glm4v_moe", "e8k2-groups-dense1", "glm4v_moe_text", "model", intermediate_size=48,
         moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
         n_group=2, topk_group=1, head_dim=8, first_k_dense_replace=1, routed_scaling_factor=1.5,
         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 0, 1],
                              partial_rotary_factor=0.5)),
    case("qwen4_exp_text", "e6k2-shared", "qwen4_exp_text", "lm", intermediate_size=48,
         moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=6,
         num_experts_per_tok=2, head_dim=8, **QWEN4_EXP),
    case("axk1", "e8k3-groups-postnorm", "axk1", "lm", intermediate_size=48,
         moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
         n_group=4, topk_group=2, first_k_dense_replace=1, num_hidden_layers=3,
         routed_scaling_factor=2.5, **MLA),
    case("axk2", "e6k2-nogroups", "axk2", "lm", intermediate_size=48, moe_intermediate_size=16,
         n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
         **MLA),
    case("aria", "e6k2-shared", "aria_text", "lm", intermediate_size=16, moe_num_experts=6,
         moe_topk=2, moe_num_shared_experts=1, head_dim=8),
    case("dots3_note", "e8k2-groups", "dots3_note_text", "lm", intermediate_size=48,
         moe_intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, n_shared_experts=1,
         shared_experts_intermediate_size=16, n_group=2, topk_group=1, head_dim=8,
         num_key_value_heads=4, first_k_dense_replace=0, routed_scaling_factor=2.0),
    case("beam", "e8k2-groups", "beam", "lm", intermediate_size=48, moe_intermediate_size=16,
         num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, head_dim=8,
         routed_scaling_factor=2.0, mlp_layer_types=["dense", "sparse"]),
]


def _build(model_type: str, head: str, kwargs: dict) -> nn.Module:
    config = AutoConfig.for_model(model_type, **{**BASE, **kwargs})
    torch.manual_seed(0)
    model = (AutoModelForCausalLM if head == "lm" else AutoModel).from_config(config)
    _init_(model)
    return model.eval()


def _run(model: nn.Module, head: str, dtype: torch.dtype = torch.float32):
    """Output, and the gradient of every parameter, in training mode."""
    ids, labels = _inputs()
    model.train()
    model.zero_grad(set_to_none=True)
    if head == "lm":
        out = model(ids, labels=labels)
        y, loss = out.logits, out.loss
    else:
        y = model(ids).last_hidden_state
        loss = y.float().square().mean()
    loss.backward()
    model.eval()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                        if p.grad is not None}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family,model_type,head,kwargs", MODEL_CASES)
def test_new_family_patched_equals_original(family, model_type, head, kwargs):
    model = _build(model_type, head, kwargs)
    y, grads = _run(model, head)
    params = dict(model.named_parameters())
    smoe.hf.patch(model)
    layers = smoe.hf.patched_layers(model)
    assert layers and all(type(model.get_submodule(n)).__name__ in BLOCKS for n in layers)
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for layer in layers.values() for p in layer.parameters())
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in layers.values()]
    p_y, p_grads = _run(model, head)
    assert len(calls) >= len(layers), "the smoe layers did not run"
    for h in hooks:
        h.remove()
    assert _max_diff(y, p_y) <= 1e-5
    assert grads.keys() == p_grads.keys()
    for n, g in grads.items():
        assert _max_diff(g, p_grads[n]) <= 1e-4 * max(1.0, g.abs().max().item()), n
    smoe.hf.unpatch(model)
    assert not smoe.hf.is_patched(model) and dict(model.named_parameters()) == params

    model = model.to(torch.bfloat16)
    ids_, _ = _inputs()
    with torch.no_grad():
        ref = model(ids_)[0].float()
        out = smoe.hf.patch(model)(ids_)[0].float()
    fp32 = y.float()
    assert _max_diff(ref, out) <= max(2e-2 * ref.abs().max().item(), _max_diff(ref, fp32))


# Families whose text decoder has no text-only model class in transformers: the sparse MoE
# block alone, built from the family's text config, patched and compared.
def _block_case(family: str, name: str, module: str, cls: str, model_type: str, **kwargs):
    return pytest.param(family, module, cls, model_type, kwargs, id=f"{family}-{name}")


BLOCK_CASES = [
    _block_case("step3p7", "e6k2-unclamped", "step3p7", "Step3p7SparseMoeBlock", "step3p5",
                intermediate_size=48, moe_intermediate_size=16, num_local_experts=6,
                num_experts_per_tok=2, share_expert_dim=24, head_dim=8,
                moe_router_scaling_factor=1.5),
    _block_case("qwen3_omni_moe", "thinker-e6k2", "qwen3_omni_moe",
                "Qwen3OmniMoeThinkerTextSparseMoeBlock", "qwen3_omni_moe_text",
                moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2),
    _block_case("qwen3_omni_moe", "talker-e6k3-shared-nonorm", "qwen3_omni_moe",
                "Qwen3OmniMoeTalkerTextSparseMoeBlock", "qwen3_omni_moe_talker_text",
                moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=6,
                num_experts_per_tok=3, norm_topk_prob=False),
    _block_case("deepseek_ocr2", "e8k3-group-limited", "deepseek_ocr2", "DeepseekOcr2TextMoe",
                "deepseek_ocr2_text", intermediate_size=48, moe_intermediate_size=16,
                num_experts=8, num_experts_per_tok=3, n_shared_experts=1, n_group=4,
                topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=1.5),
    _block_case("unlimited_ocr", "e6k2-greedy", "unlimited_ocr", "UnlimitedOcrTextMoe",
                "unlimited_ocr_text", intermediate_size=48, moe_intermediate_size=16,
                num_experts=6, num_experts_per_tok=2, n_shared_experts=2, topk_method="greedy"),
]


def _block(module: str, cls: str, model_type: str, kwargs: dict) -> nn.Module:
    config = AutoConfig.for_model(model_type, **{**BASE, **kwargs})
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    torch.manual_seed(0)
    block_cls = getattr(mod, cls)
    try:
        block = block_cls(config, 0)
    except TypeError:
        block = block_cls(config)
    _init_(block)
    return block.eval()


@pytest.mark.parametrize("family,module,cls,model_type,kwargs", BLOCK_CASES)
def test_new_family_block_patched_equals_original(family, module, cls, model_type, kwargs):
    block = _block(module, cls, model_type, kwargs)
    x = torch.randn(2, 8, BASE["hidden_size"], generator=torch.Generator().manual_seed(0))
    probe = torch.randn_like(x)
    outs = []
    for patched in (False, True):
        if patched:
            smoe.hf.patch(block)
            (layer,) = smoe.hf.patched_layers(block).values()
            calls = []
            layer.register_forward_hook(lambda *_: calls.append(1))
        xr = x.clone().requires_grad_()
        block.zero_grad(set_to_none=True)
        y = block(xr)
        (y * probe).sum().backward()
        outs.append((y.detach(), xr.grad, {n: p.grad.clone() for n, p in
                                           block.named_parameters() if p.grad is not None}))
    assert calls, "the smoe layer did not run"
    (y, gx, grads), (p_y, p_gx, p_grads) = outs
    assert _max_diff(y, p_y) <= 1e-5 * max(1.0, y.abs().max().item())
    assert _max_diff(gx, p_gx) <= 1e-4 * max(1.0, gx.abs().max().item())
    assert grads.keys() == p_grads.keys()
    for n, g in grads.items():
        assert _max_diff(g, p_grads[n]) <= 1e-4 * max(1.0, g.abs().max().item()), n


def test_step3p7_clamped_layer_is_refused():
    """Step-3.7 clamps the SwiGLU of some layers (``swiglu_limits``): those blocks are refused
    naming the clamp; unclamped layers are computed (above)."""
    (param,) = [p for p in BLOCK_CASES if p.id.startswith("step3p7")]
    _, module, cls, model_type, kwargs = param.values
    block = _block(module, cls, model_type, {**kwargs, "swiglu_limits": [7.0, 0.0]})
    with pytest.raises(ValueError, match="clamps its SwiGLU .*experts limit 7.0"):
        smoe.hf.patch(block)
    assert not smoe.hf.is_patched(block)


def test_axk2_zero_masked_groups_with_negative_bias_are_refused():
    """A.X-K2 scores dropped groups' experts 0 (not -inf): identical to smoe's group limit
    while every biased score is positive, refused when a negative bias could break that."""
    kwargs = dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                  num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2,
                  first_k_dense_replace=0, **MLA)
    model = _build("axk2", "lm", kwargs)  # _init_ draws biases of both signs
    with pytest.raises(ValueError, match="dropped groups 0 .*negative entries"):
        smoe.hf.patch(model)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.abs_()
    y, grads = _run(model, "lm")
    smoe.hf.patch(model)
    p_y, p_grads = _run(model, "lm")
    assert _max_diff(y, p_y) <= 1e-5
    for n, g in grads.items():
        assert _max_diff(g, p_grads[n]) <= 1e-4 * max(1.0, g.abs().max().item()), n


#: Families tested by a dedicated test below rather than a table row.
OTHER_TESTED = {"ernie4_5_vl_moe"}  # test_ernie4_5_vl_modality_isolated_experts

# Every MoE family of transformers 5.23 that smoe recognises but cannot compute, as a tiny model
# (transformers' default config with 2 layers, built on the meta device: only the module tree
# matters) and the exact refusal. ``None`` as the block: the family has no routed experts.
SMALL = dict(num_hidden_layers=2)
REFUSED_CASES = [
    ("hy_v4", "HYV4MoE", SMALL),
    ("glm5_next", "Glm5NextTextMoE", {}),
    ("deepseek_v4", "DeepseekV4SparseMoeBlock", SMALL),
    ("nemotron_h", "NemotronHMoE", SMALL),
    ("longcat_flash", "LongcatFlashMoE", SMALL),
    ("gemma4_text", "Gemma4TextRouter", dict(SMALL, enable_moe_block=True, num_experts=8,
                                               top_k_experts=2, moe_intermediate_size=16)),
    ("diffusion_gemma", "DiffusionGemmaTextRouter",
     dict(text_config=dict(SMALL, enable_moe_block=True, num_experts=8, top_k_experts=2,
                           moe_intermediate_size=16))),
    ("inkling_text", "InklingMoE", SMALL),
    ("inkling2_text", "Inkling2SparseMoeBlock", SMALL),
    ("minimax_m3_vl_text", "MiniMaxM3VLSparseMoeBlock", SMALL),
    ("muse_spark_text", "MuseSparkMoE", SMALL),
    ("zaya", "ZayaSparseMoeBlock", SMALL),
    ("openai_privacy_filter", "OpenAIPrivacyFilterMLP", SMALL),
    ("doge", "DogeCDMoE", dict(SMALL, is_moe=True, num_experts=64, num_experts_per_tok=4)),
    ("nllb-moe", "NllbMoeSparseMLP", {}),
    ("switch_transformers", "SwitchTransformersSparseMLP", {}),
    ("vitpose_backbone", "VitPoseBackboneMoeMLP", dict(num_hidden_layers=2, num_experts=2)),
    ("bamba", None, SMALL),
]


@pytest.mark.parametrize("model_type,block,kwargs", REFUSED_CASES,
                         ids=[c[0] for c in REFUSED_CASES])
def test_refused_family_names_the_missing_feature(model_type, block, kwargs):
    from smoe.hf.families import NO_ROUTED_EXPERTS, REFUSED

    config = AutoConfig.for_model(model_type, **kwargs)
    with torch.device("meta"):
        if model_type == "vitpose_backbone":  # a backbone: no AutoModel mapping
            from transformers import VitPoseBackbone
            model = VitPoseBackbone(config)
        else:
            model = AutoModel.from_config(config)
    if block is None:
        expected = f"smoe.hf.patch: nothing to patch: {NO_ROUTED_EXPERTS[model_type]}"
    else:
        assert block in {type(m).__name__ for m in model.modules()}
        expected = f"smoe.hf.patch: {block} cannot run on smoe: {REFUSED[block]}"
    with pytest.raises(ValueError) as err:
        smoe.hf.patch(model)
    assert str(err.value) == expected and "\n" not in expected
    assert not smoe.hf.is_patched(model)


def test_every_refusal_is_tested():
    from smoe.hf.families import NO_ROUTED_EXPERTS, REFUSED

    assert {c[1] for c in REFUSED_CASES if c[1]} == set(REFUSED)
    assert {c[0] for c in REFUSED_CASES if c[1] is None} == set(NO_ROUTED_EXPERTS)


def test_ernie4_5_vl_modality_isolated_experts():
    """ERNIE-4.5-VL's MoE block sends text tokens to one expert set and vision tokens
    (``moe_mm_token_type_ids``) to another, each an ERNIE-4.5 router and experts fed a flattened
    selection of tokens: both inner blocks are patched, and the outer block's output, router
    logits and gradients equal the original's, text-only and mixed."""
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeMoeBlock,
    )

    config = AutoConfig.for_model("ernie4_5_vl_moe_text", **{
        **BASE, "moe_intermediate_size": [16, 24], "moe_num_experts": 6, "moe_k": 2,
        "moe_num_shared_experts": 1, "intermediate_size": 48})
    torch.manual_seed(0)
    block = Ernie4_5_VLMoeMoeBlock(config)
    _init_(block)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.normal_(std=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, BASE["hidden_size"], generator=g)
    probe = torch.randn_like(x)
    types = (torch.rand(2, 8, generator=g) < 0.4).int()
    for token_types in (None, types):
        outs = []
        for patched in (False, True):
            if patched:
                smoe.hf.patch(block)
                assert len(smoe.hf.patched_layers(block)) == 2  # text and vision experts
            xr = x.clone().requires_grad_()
            block.zero_grad(set_to_none=True)
            y, logits = block(xr, token_types)
            ((y * probe).sum() + logits.square().sum()).backward()
            outs.append((y.detach(), logits.detach(), xr.grad,
                         {n: p.grad.clone() for n, p in block.named_parameters()
                          if p.grad is not None}))
            if patched:
                smoe.hf.unpatch(block)
        (y, lg, gx, grads), (p_y, p_lg, p_gx, p_grads) = outs
        assert _max_diff(y, p_y) <= 1e-5 * max(1.0, y.abs().max().item())
        assert lg.dtype == p_lg.dtype and _max_diff(lg, p_lg) <= 1e-5
        assert _max_diff(gx, p_gx) <= 1e-4 * max(1.0, gx.abs().max().item())
        assert grads.keys() == p_grads.keys()
        for n, gr in grads.items():
            assert _max_diff(gr, p_grads[n]) <= 1e-4 * max(1.0, gr.abs().max().item()), n
