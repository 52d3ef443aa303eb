"""smoe.hf.patch: a patched transformers MoE model computes what the original computes.

For each family a tiny random model is built from its config class, saved, loaded back with
``AutoModelForCausalLM.from_pretrained`` and compared with itself patched: logits, recorded
router logits, the model's own auxiliary loss, gradients of every parameter, greedy generation
and, in bfloat16, logits within rounding. The patched layers must hold the model's own
Parameter objects, and ``unpatch`` must give the original model back.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # noqa: E402 - before transformers is imported

import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import smoe.hf  # noqa: E402
from smoe.hf.families import BLOCKS, FAMILIES  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB, SEQ = 96, 8
BASE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False)
# Multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash).
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
           qk_nope_head_dim=8, v_head_dim=8)
LINEAR_ATTN = dict(head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8,
                   linear_num_key_heads=2, linear_num_value_heads=4,
                   layer_types=["linear_attention", "full_attention"])


def case(family: str, name: str, **kwargs):
    return pytest.param(family, kwargs, id=f"{family}-{name}")


# Expert counts that are not powers of two, top_k 1..4, renormalisation on and off, shared
# experts (gated and not), dense first layers, sparse steps, groups, biases.
CASES = [
    case("mixtral", "e6k2", intermediate_size=16, num_local_experts=6, num_experts_per_tok=2),
    case("mixtral", "e5k1-jitter", intermediate_size=16, num_local_experts=5,
         num_experts_per_tok=1, router_jitter_noise=0.1),
    case("minimax", "e6k2", intermediate_size=16, num_local_experts=6, num_experts_per_tok=2,
         head_dim=8, layer_types=["linear_attention", "full_attention"]),
    case("qwen2_moe", "e10k3-shared-nonorm", intermediate_size=48, moe_intermediate_size=16,
         shared_expert_intermediate_size=24, num_experts=10, num_experts_per_tok=3,
         norm_topk_prob=False),
    case("qwen2_moe", "e6k4-norm-sparse-step2", intermediate_size=48, moe_intermediate_size=16,
         shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=4,
         norm_topk_prob=True, decoder_sparse_step=2, num_hidden_layers=3),
    case("qwen3_moe", "e6k2-norm", intermediate_size=48, moe_intermediate_size=16, num_experts=6,
         num_experts_per_tok=2, norm_topk_prob=True, head_dim=8),
    case("qwen3_moe", "e10k1-mlp-only", intermediate_size=48, moe_intermediate_size=16,
         num_experts=10, num_experts_per_tok=1, norm_topk_prob=True, head_dim=8,
         mlp_only_layers=[0], num_hidden_layers=3),
    case("qwen3_next", "e6k2", intermediate_size=48, moe_intermediate_size=16,
         shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2, **LINEAR_ATTN),
    case("qwen3_5_moe_text", "e6k2", moe_intermediate_size=16,
         shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2, **LINEAR_ATTN),
    case("olmoe", "e6k2-nonorm", intermediate_size=16, num_experts=6, num_experts_per_tok=2,
         norm_topk_prob=False),
    case("olmoe", "e10k4-norm", intermediate_size=16, num_experts=10, num_experts_per_tok=4,
         norm_topk_prob=True),
    case("flex_olmo", "e7k3", intermediate_size=16, num_experts=7, num_experts_per_tok=3),
    case("mellum", "e6k2", intermediate_size=48, moe_intermediate_size=16, num_local_experts=6,
         num_experts_per_tok=2, head_dim=8, sliding_window=16),
    case("jamba", "e6k2", intermediate_size=16, num_experts=6, num_experts_per_tok=2,
         expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1,
         use_mamba_kernels=False, mamba_dt_rank=8, mamba_d_state=8),
    case("hunyuan_v1_moe", "e6k2", intermediate_size=16, num_experts=6, moe_topk=2, head_dim=8),
    case("deepseek_v3", "e8k3-groups-dense1", intermediate_size=48, moe_intermediate_size=16,
         n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, n_group=4, topk_group=2,
         first_k_dense_replace=1, routed_scaling_factor=2.5, num_hidden_layers=3, **MLA),
    case("deepseek_v3", "e6k1-nonorm", intermediate_size=48, moe_intermediate_size=16,
         n_routed_experts=6, num_experts_per_tok=1, n_shared_experts=2, n_group=1,
         topk_group=1, first_k_dense_replace=0, norm_topk_prob=False, **MLA),
    case("deepseek_v2", "e8k3-group-limited", intermediate_size=48, moe_intermediate_size=16,
         n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, n_group=4, topk_group=2,
         topk_method="group_limited_greedy", routed_scaling_factor=1.5,
         first_k_dense_replace=1, num_hidden_layers=3, **MLA),
    case("deepseek_v2", "e6k2-greedy", intermediate_size=48, moe_intermediate_size=16,
         n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1, topk_method="greedy",
         **MLA),
    case("glm4_moe", "e6k2-dense1", intermediate_size=48, moe_intermediate_size=16,
         n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
         num_hidden_layers=3, head_dim=8, routed_scaling_factor=1.5, num_nextn_predict_layers=0),
    case("glm4_moe_lite", "e6k2", intermediate_size=48, moe_intermediate_size=16,
         n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=1.8,
         **MLA),
    case("dots1", "e6k2-nonorm", intermediate_size=48, moe_intermediate_size=16,
         n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1, head_dim=8,
         first_k_dense_replace=1, num_hidden_layers=3, norm_topk_prob=False),
    case("solar_open", "e6k2", moe_intermediate_size=16, n_routed_experts=6,
         num_experts_per_tok=2, n_shared_experts=1, head_dim=8),
    case("exaone_moe", "e6k2", intermediate_size=48, moe_intermediate_size=16, num_experts=6,
         num_experts_per_tok=2, head_dim=8, first_k_dense_replace=1, num_hidden_layers=3,
         sliding_window=16),
    case("mimo_v2_flash", "e6k2", intermediate_size=48, moe_intermediate_size=16,
         n_routed_experts=6, num_experts_per_tok=2, head_dim=8, v_head_dim=8, sliding_window=16),
    case("deepseek_v32", "e8k2-groups", intermediate_size=48, moe_intermediate_size=16,
         n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
         first_k_dense_replace=1, num_hidden_layers=3, index_topk=4, index_head_dim=8,
         index_n_heads=2, **MLA),
    case("glm_moe_dsa", "e6k2", intermediate_size=48, moe_intermediate_size=16,
         n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
         num_hidden_layers=3, index_topk=4, index_head_dim=8, index_n_heads=2, **MLA),
    case("kimi_linear", "e6k2", intermediate_size=48, moe_intermediate_size=16, num_experts=6,
         num_experts_per_token=2, num_shared_experts=1, linear_head_dim=8, linear_num_heads=4,
         head_dim=8, layer_types=["linear_attention", "full_attention"],
         mlp_layer_types=["sparse", "sparse"],
         **{k: v for k, v in MLA.items() if k != "q_lora_rank"}),
    case("bailing_hybrid", "e8k2-groups", intermediate_size=48, moe_intermediate_size=16,
         num_experts=8, num_experts_per_token=2, num_shared_experts=1, num_expert_group=2,
         topk_group=1, first_k_dense_replace=1, num_hidden_layers=3, layer_group_size=2,
         linear_head_dim=8, linear_num_heads=4, head_dim=8, **MLA),
    case("afmoe", "e6k2", intermediate_size=48, moe_intermediate_size=16, num_experts=6,
         num_experts_per_tok=2, num_shared_experts=1, num_dense_layers=1, num_hidden_layers=3,
         head_dim=8, route_scale=1.7, sliding_window=16),
    case("minimax_m2", "e6k2", intermediate_size=16, num_local_experts=6, num_experts_per_tok=2,
         head_dim=8),
    case("hy_v3", "e6k2", intermediate_size=48, moe_intermediate_size=16, num_experts=6,
         num_experts_per_tok=2, num_shared_experts=1, head_dim=8),
    case("flint", "e6k2", intermediate_size=48, moe_intermediate_size=16,
         shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2, head_dim=8,
         mlp_only_layers=[0], num_hidden_layers=3, sliding_window=16),
    case("lfm2_moe", "e6k2-bias", intermediate_size=48, moe_intermediate_size=16, num_experts=6,
         num_experts_per_tok=2, num_dense_layers=1, num_hidden_layers=3,
         layer_types=["full_attention", "conv", "full_attention"]),
    case("cohere2_moe", "e6k2-softmax-average", intermediate_size=16, num_experts=6,
         num_experts_per_tok=2, head_dim=8, num_shared_experts=1, sliding_window=16),
    case("cohere2_moe", "e6k3-sigmoid", intermediate_size=16, num_experts=6,
         num_experts_per_tok=3, head_dim=8, expert_selection_fn="sigmoid", sliding_window=16),
    case("gpt_oss", "e6k2", intermediate_size=16, num_local_experts=6, num_experts_per_tok=2,
         head_dim=8, layer_types=["sliding_attention", "full_attention"], sliding_window=8),
    case("phimoe", "e6k2", intermediate_size=16, num_local_experts=6, num_experts_per_tok=2),
    case("phimoe", "e5k2-wide-margin", intermediate_size=16, num_local_experts=5,
         num_experts_per_tok=2, router_jitter_noise=0.3),
    case("granitemoe", "e6k2", intermediate_size=16, num_local_experts=6, num_experts_per_tok=2),
    case("granitemoeshared", "e6k1", intermediate_size=16, num_local_experts=6,
         num_experts_per_tok=1, shared_intermediate_size=24),
    case("granitemoehybrid", "e6k2", intermediate_size=16, num_local_experts=6,
         num_experts_per_tok=2, shared_intermediate_size=24, mamba_n_heads=4, mamba_d_state=8,
         mamba_d_head=16, mamba_chunk_size=8, layer_types=["mamba", "attention"]),
    case("granitemoe_swa", "e6k2", intermediate_size=16, num_local_experts=6,
         num_experts_per_tok=2, sliding_window=16),
    case("jetmoe", "e6k2", intermediate_size=16, num_local_experts=6, num_experts_per_tok=2,
         kv_channels=8),
    case("dbrx", "e6k2-jitter", d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
         attn_config=dict(kv_n_heads=2, clip_qkv=8.0),
         ffn_config=dict(ffn_hidden_size=16, moe_num_experts=6, moe_top_k=2, moe_jitter_eps=0.1)),
    case("dbrx", "e6k1", d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
         attn_config=dict(kv_n_heads=2, clip_qkv=8.0),
         ffn_config=dict(ffn_hidden_size=16, moe_num_experts=6, moe_top_k=1)),
    case("dbrx", "e5k3-unnormalised", d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
         attn_config=dict(kv_n_heads=2, clip_qkv=8.0),
         ffn_config=dict(ffn_hidden_size=16, moe_num_experts=5, moe_top_k=3,
                         moe_normalize_expert_weights=None)),
    case("ernie4_5_moe", "e6k2-shared2-bias", intermediate_size=48, moe_intermediate_size=16,
         moe_num_experts=6, moe_k=2, moe_num_shared_experts=2, moe_layer_start_index=1,
         num_hidden_layers=3, head_dim=8),
    case("ernie4_5_moe", "e5k3-usebias", intermediate_size=48, moe_intermediate_size=16,
         moe_num_experts=5, moe_k=3, moe_num_shared_experts=1, moe_layer_start_index=0,
         use_bias=True, head_dim=8),
    case("kolibri1", "e6k2-norm", moe_intermediate_size=16, num_experts=6,
         num_experts_per_tok=2, norm_topk_prob=True, shared_expert_intermediate_size=24,
         head_dim=8),
    case("kolibri1", "e7k3-nonorm", moe_intermediate_size=16, num_experts=7,
         num_experts_per_tok=3, norm_topk_prob=False, shared_expert_intermediate_size=24,
         head_dim=8),
    case("laguna", "e6k2", intermediate_size=48, moe_intermediate_size=16,
         shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2, head_dim=8,
         moe_routed_scaling_factor=2.0),
    case("laguna", "e6k3-softcap", intermediate_size=48, moe_intermediate_size=16,
         shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=3, head_dim=8,
         moe_router_logit_softcapping=1.5),
    case("llama4_text", "e6k1-interleaved", intermediate_size=16, intermediate_size_mlp=48,
         num_local_experts=6, num_experts_per_tok=1, head_dim=8, interleave_moe_layer_step=2,
         num_hidden_layers=4),
    # top-2 with the weights on the input, as transformers' own Llama 4 tester config runs it
    # (every expert sees sigmoid(logit) * x; unchosen experts see 0 and give 0).
    case("llama4_text", "e6k2", intermediate_size=16, intermediate_size_mlp=48,
         num_local_experts=6, num_experts_per_tok=2, head_dim=8),
]
# Families whose training-mode routing cannot be compared draw for draw: their gradients are
# compared in eval mode. (Phi-3.5-MoE samples its experts in training; smoe draws the same
# random numbers in the same order, so it is compared in training mode like the others.)
RANDOM_IN_TRAINING: set[str] = set()


def _init_(model: nn.Module) -> None:
    """Non-trivial random weights: the MoE output must matter for the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(std=0.2)
        for name, b in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                b.normal_(std=0.1)


_CHECKPOINTS: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (on a busy 2-core machine a
    2-thread index_add takes milliseconds instead of microseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_patch")


def _checkpoint(root, family: str, kwargs: dict) -> str:
    """A saved tiny random model of the family (built once per module)."""
    key = f"{family}-{sorted(kwargs.items())!r}"
    if key not in _CHECKPOINTS:
        config_kw = dict(BASE) if family != "dbrx" else dict(vocab_size=VOCAB, pad_token_id=0,
                                                             bos_token_id=1, eos_token_id=2)
        config_kw.update(kwargs)
        config = AutoConfig.for_model(family, **config_kw)
        if family == "dbrx":  # transformers 5.23's DBRX attention reads a field its config lacks
            config.attn_config.rope_theta = 10000.0
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        _init_(model)
        path = root / f"m{len(_CHECKPOINTS)}"
        model.save_pretrained(path)
        _CHECKPOINTS[key] = str(path)
    return _CHECKPOINTS[key]


def _load(path: str, dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if type(model).__name__.startswith("Dbrx"):
        model.config.attn_config.rope_theta = 10000.0
    return model.eval()


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    labels = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    return ids, labels


def _run(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, train: bool):
    """Logits, recorded router logits, aux loss and the gradient of every parameter."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    wants_router_logits = hasattr(model.config, "output_router_logits")
    kwargs = {"output_router_logits": True} if wants_router_logits else {}
    torch.manual_seed(1234)  # training-mode input jitter draws the same numbers in both runs
    out = model(ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    router_logits = tuple(t.detach() for t in (out.get("router_logits") or ()))
    aux = out.get("aux_loss")
    model.eval()
    return out.logits.detach(), router_logits, aux, grads


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("family,kwargs", CASES)
def test_patched_model_equals_original_fp32(ckpt_root, family, kwargs):
    model = _load(_checkpoint(ckpt_root, family, kwargs))
    ids, labels = _inputs()
    train = family not in RANDOM_IN_TRAINING
    params_before = dict(model.named_parameters())
    blocks_before = dict(model.named_modules())
    logits, router_logits, aux, grads = _run(model, ids, labels, train)
    gen = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        eval_logits = model(ids).logits

    smoe.hf.patch(model)
    layers = smoe.hf.patched_layers(model)
    assert layers, "no block was patched"
    assert all(type(m).__name__ in BLOCKS for m in map(model.get_submodule, layers))
    # The smoe layers hold the model's own Parameter objects: nothing is copied.
    model_params = {id(p) for p in model.parameters()}
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    for name, layer in layers.items():
        for pname, p in layer.named_parameters():
            assert id(p) in model_params, f"{name}: {pname} is not one of the model's parameters"
            assert p.data_ptr() in model_ptrs
    assert dict(model.named_parameters()) == params_before  # same names, same objects
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1))
             for layer in layers.values()]

    p_logits, p_router_logits, p_aux, p_grads = _run(model, ids, labels, train)
    assert len(calls) >= len(layers), "the smoe layers did not run"
    assert _max_diff(logits, p_logits) <= 1e-5
    assert len(p_router_logits) == len(router_logits)
    if hasattr(model.config, "output_router_logits"):
        assert router_logits, "the original model recorded no router logits"
    for a, b in zip(router_logits, p_router_logits):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _max_diff(a, b) <= 1e-5
    if aux is not None:
        assert abs(aux.item() - p_aux.item()) <= 1e-6 * max(1.0, abs(aux.item()))
    assert grads.keys() == p_grads.keys()
    for n, g in grads.items():
        tol = 1e-4 * max(1.0, g.abs().max().item())
        assert _max_diff(g, p_grads[n]) <= tol, f"gradient of {n} differs"
    p_gen = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    assert torch.equal(gen, p_gen)

    for h in hooks:
        h.remove()
    smoe.hf.unpatch(model)
    assert not smoe.hf.is_patched(model)
    assert dict(model.named_modules()) == blocks_before  # same module objects
    assert dict(model.named_parameters()) == params_before
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, eval_logits)


@pytest.mark.parametrize("family,kwargs", CASES)
def test_patched_model_close_to_original_bf16(ckpt_root, family, kwargs):
    """bfloat16 rounds to 8 significant bits (a relative step of 2^-8 to 2^-7). The two paths
    round in different places: smoe casts the float32 routing weights to bfloat16 before the
    weighted combine and accumulates in bfloat16, where Mixtral- and DeepSeek-style blocks keep
    the weights in float32; smoe's softmax/sigmoid run in float32 where gpt-oss and Phi-3.5 use
    bfloat16. So:

    * each block, fed the same input, agrees within 4 * 2^-8 of its largest output (2 to 4
      bf16 steps there; measured at most 2.5; another expert would be far outside this);
    * the logits agree within 2e-2 of the largest logit (~5 bf16 steps at that scale), or
      within the original's own bfloat16 error (its distance from the float32 model) when that
      is larger: a one-step difference upstream can flip a near-tie expert choice in a later
      layer, which bfloat16 routing does to the original model too (MiniMax's case here).
    A wrong expert or weight moves outputs by tens of percent (a 5% weight error already moves
    these logits by 2-4%).
    """
    path = _checkpoint(ckpt_root, family, kwargs)
    ids, _ = _inputs()
    with torch.no_grad():
        fp32 = _load(path)(ids).logits
        model = _load(path, torch.bfloat16)
        seen = []
        hooks = [m.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
                 for m in model.modules() if type(m).__name__ in BLOCKS]
        ref = model(ids).logits
        for h in hooks:
            h.remove()
        smoe.hf.patch(model)
        for block, x, y in seen:
            y_ref = y[0] if isinstance(y, tuple) else y
            y_new = block(x)
            y_new = y_new[0] if isinstance(y_new, tuple) else y_new
            assert y_new.dtype == torch.bfloat16
            assert _max_diff(y_ref, y_new) <= 4 * 2**-8 * y_ref.float().abs().max().item()
        out = model(ids).logits
    scale = ref.float().abs().max().item()
    assert _max_diff(ref, out) <= max(2e-2 * scale, _max_diff(ref, fp32))


def _case(case_id: str) -> tuple[str, dict]:
    (param,) = [p for p in CASES if p.id == case_id]
    return param.values


def test_router_logits_hooks_installed_after_patch(ckpt_root):
    """transformers installs its output-recording hooks lazily: patching a fresh model and
    asking for router logits only afterwards records them too."""
    path = _checkpoint(ckpt_root, *_case("mixtral-e6k2"))
    ids, _ = _inputs()
    with torch.no_grad():
        ref = _load(path)(ids, output_router_logits=True)
        out = smoe.hf.patch(_load(path))(ids, output_router_logits=True)
    assert len(out.router_logits) == len(ref.router_logits) > 0
    for a, b in zip(ref.router_logits, out.router_logits):
        assert _max_diff(a, b) <= 1e-6
    assert abs(ref.aux_loss.item() - out.aux_loss.item()) <= 1e-6


def test_patched_model_trains(ckpt_root):
    """A few SGD steps on the patched model, with its own aux loss and gradient checkpointing,
    follow the original's trajectory."""
    path = _checkpoint(ckpt_root, *_case("qwen2_moe-e10k3-shared-nonorm"))
    ids, labels = _inputs(1)
    losses = []
    for patched in (False, True):
        model = _load(path)
        if patched:
            smoe.hf.patch(model)
        model.activation_checkpointing_enable()
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run = []
        for _ in range(3):
            opt.zero_grad()
            loss = model(ids, labels=labels, output_router_logits=True).loss
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    assert losses[0][-1] < losses[0][0]


def test_patched_model_follows_dtype_changes(ckpt_root):
    """``model.to()`` replaces buffers (the selection biases): the patched layers pick up the
    new tensors on their next call."""
    ids, _ = _inputs()
    for case_id in ("deepseek_v3-e8k3-groups-dense1", "lfm2_moe-e6k2-bias"):
        path = _checkpoint(ckpt_root, *_case(case_id))
        with torch.no_grad():  # transformers' grouped_mm experts have no float64 path
            ref = _load(path, experts_implementation="eager").double()(ids).logits
            model = smoe.hf.patch(_load(path)).double()
            # DeepSeek-style routers upcast to float32, smoe routes float64 inputs in float64.
            assert _max_diff(model(ids).logits, ref) <= 1e-6
            for name, layer in smoe.hf.patched_layers(model).items():
                bias = layer.router.expert_bias
                assert bias.dtype == torch.float64
                assert any(bias is b for b in model.get_submodule(name).buffers())


def test_patched_model_saves_the_original_checkpoint(ckpt_root, tmp_path):
    model = _load(_checkpoint(ckpt_root, *_case("mixtral-e6k2")))
    keys = set(model.state_dict())
    smoe.hf.patch(model)
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    ids, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(_load(str(tmp_path))(ids).logits, model(ids).logits)


def _unpatched_or_skip(forward, what: str):
    """Run the *unpatched* model's forward; if transformers itself fails there (a release that
    breaks its own model, e.g. 5.24's Llama 4 composite output), skip with the reason. Only the
    original's forward is guarded: a failure after smoe patches the model is never hidden."""
    try:
        return forward()
    except Exception as err:  # noqa: BLE001 - any failure of the original is upstream's
        pytest.skip(f"transformers {transformers.__version__}: the unpatched {what} model fails "
                    f"before smoe is involved ({type(err).__name__}: {err})")


def test_composite_models():
    """Llama 4 and Qwen3.5-MoE vision-language models: their text decoders are patched."""
    text = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    configs = [
        transformers.Llama4Config(
            text_config=dict(text, intermediate_size=16, intermediate_size_mlp=48,
                             num_local_experts=6, num_experts_per_tok=1, head_dim=8),
            vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=32, image_size=32, patch_size=16,
                               vision_output_dim=32, projector_input_dim=32,
                               projector_output_dim=32, pixel_shuffle_ratio=0.5),
            image_token_index=VOCAB - 1),
        AutoConfig.for_model(
            "qwen3_5_moe", vision_config=dict(depth=1, hidden_size=32, num_heads=4,
                                              intermediate_size=32, out_hidden_size=32),
            text_config=dict(text, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                             num_experts=6, num_experts_per_tok=2, **LINEAR_ATTN)),
    ]
    ids, _ = _inputs()
    for config in configs:
        assert config.model_type in smoe.hf.SUPPORTED_FAMILIES
        torch.manual_seed(0)
        model = transformers.AutoModelForImageTextToText.from_config(config).eval()
        _init_(model)
        with torch.no_grad():
            ref = _unpatched_or_skip(lambda: model(input_ids=ids).logits, config.model_type)
            smoe.hf.patch(model)
            assert len(smoe.hf.patched_layers(model)) == 2
            assert _max_diff(model(input_ids=ids).logits, ref) <= 1e-5


def test_sparsemixer_matches_transformers():
    """smoe's sparsemixer router is transformers' Phi-3.5-MoE ``sparsemixer`` in eval mode:
    same picks, same weights, same gradients, over margins that keep 1 to all experts."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    from smoe import MoEConfig
    from smoe.nn import Router

    g = torch.Generator().manual_seed(0)
    for eps in (0.0, 0.01, 0.1, 0.5):
        router = Router(MoEConfig(hidden_size=8, expert_size=4, num_experts=7, top_k=2,
                                  router="sparsemixer", sparsemixer_jitter_eps=eps))
        logits = torch.randn(256, 7, generator=g)
        logits[:32, 1] = logits[:32, 0]  # exact ties
        a = logits.clone().requires_grad_()
        b = logits.clone().requires_grad_()
        w_ref, e_ref = sparsemixer(a, jitter_eps=eps, training=False)
        route = router._sparsemixer(b)
        assert torch.equal(route.experts_TK, e_ref)
        torch.testing.assert_close(route.weights_TK, w_ref, rtol=0, atol=1e-7)
        probe = torch.randn(256, 2, generator=g)
        (w_ref * probe).sum().backward()
        (route.weights_TK * probe).sum().backward()
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-7)


def test_unsupported_and_repeated_patch_are_refused(ckpt_root):
    config = AutoConfig.for_model("llama", **BASE, intermediate_size=16)
    dense = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="supported families: .*mixtral"):
        smoe.hf.patch(dense)
    model = smoe.hf.patch(_load(_checkpoint(ckpt_root, *_case("mixtral-e6k2"))))
    with pytest.raises(ValueError, match="already patched"):
        smoe.hf.patch(model)


def test_supported_families_are_all_tested():
    required = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "phimoe",
                "granitemoe", "dbrx", "llama4_text"}
    assert required <= set(smoe.hf.SUPPORTED_FAMILIES)
    from test_hf_patch_families import BLOCK_CASES, MODEL_CASES, OTHER_TESTED

    tested = {p.values[0] for p in CASES + MODEL_CASES + BLOCK_CASES} | OTHER_TESTED
    tested |= {"llama4", "qwen3_5_moe"}  # test_composite_models
    # A composite model_type whose text decoder's block rows are a tested family's.
    tested |= {f for f in smoe.hf.SUPPORTED_FAMILIES
               if any(FAMILIES[f] is FAMILIES[t] for t in tested)}
    assert set(smoe.hf.SUPPORTED_FAMILIES) == tested


def test_import_smoe_does_not_import_transformers():
    code = ("import sys, smoe, smoe.hf; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family,kwargs,feature", [
    ("hy_v4", dict(moe_intermediate_size=16, n_routed_experts=6, num_experts_per_tok=2,
                   head_dim=8), "clamped SwiGLU"),
    ("nemotron_h", dict(moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
                        n_routed_experts=6, num_experts_per_tok=2, head_dim=8,
                        layers_block_type=["moe", "attention"]), "squared-ReLU"),
])
def test_families_refused_name_the_missing_feature(family, kwargs, feature):
    """transformers MoE families smoe cannot compute exactly: the refusal names the feature and
    nothing is patched (built on meta: only the module tree matters here)."""
    config = AutoConfig.for_model(family, **{**BASE, **kwargs})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=f"cannot run on smoe: .*{feature}"):
        smoe.hf.patch(model)
    assert not smoe.hf.is_patched(model)
