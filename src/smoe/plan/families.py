"""The per-family table: which config keys hold which sizes and which optional parts each
transformers ``*ForCausalLM`` builds, plus the weight-only quantization formats."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ALIASES", "FAMILIES", "KEPT_BF16", "QUANTIZED_GROUPS", "QUANT_FORMATS",
           "SUPPORTED_MODEL_TYPES", "Family", "QuantFormat"]


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
    kv_heads: tuple[str, ...] = ("num_key_value_heads",)
    head_dim: tuple[str, ...] = ("head_dim",)   # () -> always hidden_size // num_attention_heads
    attention: str = "gqa"                      # "gqa" | "mla"
    qkv_bias: str | bool = "attention_bias"
    o_bias: str | bool = "attention_bias"
    qk_norm: str = "none"                       # "none" | "per_head" | "olmoe"
    sinks: bool = False                         # one learned sink logit per head (gpt_oss)
    norm_bias: bool = False                     # LayerNorm with a bias (phimoe)
    moe_layers: str = "all"                     # key of count.MOE_LAYER_RULES
    shared: str = "none"                        # "none" | "deepseek" | "qwen2" | "llama4"
    expert_bias: bool = False
    router_bias: bool = False
    mlp_bias: str | bool = False                # dense and shared MLPs
    lm_head_bias: str | bool = False
    mamba: bool = False                         # Jamba: Mamba mixers on non-attention layers
    defaults: Mapping[str, Any] = field(default_factory=dict)


_DEEPSEEK = dict(expert_ffn=("moe_intermediate_size",), attention="mla",
                 moe_layers="deepseek", shared="deepseek")
_QWEN = dict(expert_ffn=("moe_intermediate_size",), moe_layers="qwen")

#: The supported families, keyed by ``model_type``.
FAMILIES: dict[str, Family] = {
    "mixtral": Family(qkv_bias=False, o_bias=False),
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
}
ALIASES = {"llama4": "llama4_text"}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted([*FAMILIES, *ALIASES]))


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
