"""The per-family table: which config keys hold which sizes and which optional parts each
transformers ``*ForCausalLM`` builds, plus the weight-only quantization formats."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ALIASES", "DENSE_FAMILIES", "EXTRA_FAMILIES", "FAMILIES", "GENERIC",
           "GENERIC_MAX_ERROR", "KEPT_BF16", "QUANTIZED_GROUPS", "QUANT_FORMATS",
           "SUPPORTED_MODEL_TYPES", "Family", "QuantFormat", "family_for"]


@dataclass(frozen=True)
class Family:
    """How one HF ``model_type`` lays out its parameters.

    Key tuples list the config names tried in order (dotted paths reach nested dicts, e.g. DBRX's
    ``ffn_config.moe_num_experts``); a ``str`` flag names a boolean config key, a ``bool`` is fixed.
    ``defaults`` are transformers' config-class defaults for optional keys; sizes have none and
    are required.
    """

    expert_ffn: tuple[str, ...] = ("intermediate_size",)
    dense_ffn: tuple[str, ...] = ("intermediate_size",)
    num_experts: tuple[str, ...] = ("num_local_experts", "num_experts", "n_routed_experts")
    top_k: tuple[str, ...] = ("num_experts_per_tok",)
    heads: tuple[str, ...] = ("num_attention_heads", "n_heads")
    kv_heads: tuple[str, ...] = ("num_key_value_heads",)
    head_dim: tuple[str, ...] = ("head_dim",)   # () -> always hidden_size // num_attention_heads
    attention: str = "gqa"                      # "gqa" | "mla" | "auto" (MLA if kv_lora_rank)
    qkv_bias: str | bool = "attention_bias"
    o_bias: str | bool = "attention_bias"
    qk_norm: str = "none"                       # "none" | "per_head" | "olmoe"
    sinks: bool = False                         # one learned sink logit per head (gpt_oss)
    norm_bias: bool = False                     # LayerNorm with a bias (phimoe)
    moe_layers: str = "all"                     # key of count.MOE_LAYER_RULES
    shared: str = "none"            # "none" | "deepseek" | "qwen2" | "llama4" | "sized" | "auto"
    expert_bias: str | bool = False
    router_bias: str | bool = False
    mlp_bias: str | bool = False                # dense and shared MLPs
    lm_head_bias: str | bool = False
    mamba: bool = False                         # Jamba: Mamba mixers on non-attention layers
    sliding_all: bool = False                   # a ``sliding_window`` applies to every layer
    gated: str | bool = True                    # gated (SwiGLU) MLPs: 3 matrices, else 2
    exact: bool = True                          # counts verified equal to transformers' (tests)
    defaults: Mapping[str, Any] = field(default_factory=dict)


_DEEPSEEK = dict(expert_ffn=("moe_intermediate_size",), attention="mla",
                 moe_layers="deepseek", shared="deepseek")
_QWEN = dict(expert_ffn=("moe_intermediate_size",), moe_layers="qwen")

#: Families whose counts the tests hold equal to transformers', keyed by ``model_type``.
FAMILIES: dict[str, Family] = {
    "mixtral": Family(qkv_bias=False, o_bias=False, sliding_all=True),
    "qwen2_moe": Family(**_QWEN, qkv_bias="qkv_bias", o_bias=False, shared="qwen2",
                        defaults={"qkv_bias": True, "decoder_sparse_step": 1}),
    "qwen3_moe": Family(**_QWEN, qk_norm="per_head", defaults={"decoder_sparse_step": 1}),
    "olmoe": Family(qk_norm="olmoe"),
    "deepseek_v2": Family(**_DEEPSEEK, mlp_bias="mlp_bias",
                          defaults={"first_k_dense_replace": 0, "n_shared_experts": 2,
                                    "q_lora_rank": 1536}),
    "deepseek_v3": Family(**_DEEPSEEK, defaults={"first_k_dense_replace": 3, "n_shared_experts": 1,
                                                 "q_lora_rank": 1536}),
    "gpt_oss": Family(sinks=True, expert_bias=True, router_bias=True,
                      defaults={"attention_bias": True, "head_dim": 64}),
    "phimoe": Family(norm_bias=True, lm_head_bias="lm_head_bias"),
    "granitemoe": Family(),
    "dbrx": Family(expert_ffn=("ffn_config.ffn_hidden_size",),
                   num_experts=("ffn_config.moe_num_experts",), top_k=("ffn_config.moe_top_k",),
                   kv_heads=("attn_config.kv_n_heads",), head_dim=(), qkv_bias=False, o_bias=False,
                   defaults={"attn_config.kv_n_heads": 1}),
    # Llama 4 proper nests this under text_config; only the text model is counted
    "llama4_text": Family(dense_ffn=("intermediate_size_mlp",), moe_layers="llama4",
                          shared="llama4",
                          defaults={"head_dim": 128, "interleave_moe_layer_step": 1}),
    "jamba": Family(qkv_bias=False, o_bias=False, moe_layers="jamba", mamba=True,
                    defaults={"expert_layer_period": 2, "expert_layer_offset": 1,
                              "attn_layer_period": 8, "attn_layer_offset": 4, "mamba_d_state": 16,
                              "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": "auto",
                              "mamba_conv_bias": True, "mamba_proj_bias": False}),
    # HunYuan-MoE-V1: a shared MLP of intermediate_size beside the experts, QK norms
    "hunyuan_v1_moe": Family(top_k=("moe_topk",), qk_norm="per_head", shared="llama4"),
    # dense models (no experts), for comparisons such as "a 70B dense model in fp16"
    "llama": Family(mlp_bias="mlp_bias"),
    "mistral": Family(qkv_bias=False, o_bias=False, sliding_all=True),
    "qwen3": Family(qk_norm="per_head"),
}
#: Families outside transformers' MoE classes, counted from their published architecture.
#: Grok-1 has no transformers class (config of the hpcai-tech/grok-1 port; 4 norms per layer are
#: counted as 2: 2 x 6144 x 64 parameters, 0.0003% of 314B); ``smoe`` is a native smoe run folder
#: (its ``model`` section translated by :mod:`smoe.plan.resolve`).
EXTRA_FAMILIES: dict[str, Family] = {
    "grok-1": Family(qkv_bias=False, o_bias=False, exact=False),
    "smoe": Family(expert_ffn=("moe_intermediate_size",), qkv_bias=False, o_bias=False,
                   qk_norm="flag:qk_norm", moe_layers="qwen", shared="sized",
                   gated="mlp_gated", expert_bias="expert_bias", router_bias="router_bias",
                   defaults={"decoder_sparse_step": 1}),
}
FAMILIES.update(EXTRA_FAMILIES)

#: Every other family :mod:`smoe.hf` supports is read through this row: GQA attention (MLA when
#: the config has ``kv_lora_rank``), gated-MLP experts of ``moe_intermediate_size``, shared
#: experts from ``n_shared_experts`` / ``num_shared_experts`` / ``shared_expert_intermediate_size``
#: / ``shared_intermediate_size``, and dense layers from ``mlp_layer_types``,
#: ``first_k_dense_replace`` / ``num_dense_layers``, ``decoder_sparse_step`` or
#: ``mlp_only_layers``. What it does not model -- QK norms, linear-attention (gated DeltaNet,
#: KDA, MiniMax lightning, Mamba-2) and indexer parameters, per-family biases -- is a small part
#: of a MoE model; tests measure its error against transformers for every such family on its
#: default config (see ``GENERIC_MAX_ERROR``) and the result carries a note saying it is an
#: estimate.
GENERIC = Family(
    expert_ffn=("moe_intermediate_size", "expert_intermediate_size", "intermediate_size"),
    num_experts=("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"),
    top_k=("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_top_k"),
    attention="auto", moe_layers="auto", shared="auto", exact=False)
#: Largest relative error of the generic row's total against transformers on the default configs
#: of the families it reads (held by tests/test_plan_families.py). Measured with transformers
#: 5.23: under 0.05% for the plain GQA/MLA families (cohere2_moe, dots1, exaone_moe, flex_olmo,
#: flint, glm4_moe, glm4_moe_lite, granitemoe_swa, granitemoeshared, hy_v3, lfm2_moe, mellum,
#: minimax_m2, solar_open), -0.1% deepseek_v32 / glm_moe_dsa (indexer), +0.2% mimo_v2_flash,
#: -0.4% to -0.9% kimi_linear / afmoe / qwen3_next / bailing_hybrid, -1.4% minimax, -1.5%
#: qwen3_5_moe, -3.0% granitemoehybrid (linear-attention / Mamba-2 parameters), and -17.6% for
#: jetmoe, whose attention is itself a mixture of experts (allowed 20% in the test).
GENERIC_MAX_ERROR = 0.10

ALIASES = {"llama4": "llama4_text", "qwen3_5_moe": "qwen3_5_moe_text", "grok1": "grok-1",
           "grok": "grok-1"}
#: Dense families: accepted (0 experts), everything else must have experts.
DENSE_FAMILIES = ("llama", "mistral", "qwen3")
#: The model types with a row of their own (exact counts); see :func:`family_for`.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted([*FAMILIES, *ALIASES]))


def family_for(model_type: str, hf_families: tuple[str, ...] = ()) -> Family | None:
    """The row for ``model_type``: its own, the generic one for a family :mod:`smoe.hf` patches
    (``hf_families``), else ``None``."""
    model_type = ALIASES.get(model_type, model_type)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in hf_families:
        return GENERIC
    return None


@dataclass(frozen=True)
class QuantFormat:
    """A weight-only format: ``bits`` per quantized weight plus ``scale_bytes`` per scale, one
    scale per output channel (``group_size=None``) or per ``group_size`` input elements."""

    bits: int
    group_size: int | None
    scale_bytes: int
    description: str
    label: str  # short form for the table


#: Formats that quantize the linear weights; everything else is counted in bf16.
QUANT_FORMATS: dict[str, QuantFormat] = {
    "fp8": QuantFormat(8, None, 4, "8-bit float weights, one fp32 scale per output channel",
                       "8-bit float + fp32 scale per output channel"),
    "int8": QuantFormat(8, None, 4, "8-bit integer weights, one fp32 scale per output channel",
                        "8-bit int + fp32 scale per output channel"),
    "int4": QuantFormat(4, 128, 2, "4-bit symmetric integer weights, one bf16 scale per group of "
                                   "128 input elements (4.125 bits/weight, no zero point)",
                        "4-bit int + bf16 scale per 128 inputs (4.125 bits/weight)"),
}
#: ``breakdown`` groups whose weight matrices the quantized formats quantize.
QUANTIZED_GROUPS = ("attention", "mamba", "dense_mlp", "shared_experts", "routed_experts")
KEPT_BF16 = "embeddings, lm_head, routers, norms, biases, sinks and SSM parameters kept in bf16"
