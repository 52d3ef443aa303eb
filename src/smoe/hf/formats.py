"""Choosing the Hugging Face family and mapping configs: an smoe ``ModelConfig`` as an HF
``config.json`` (:func:`hf_format_for`) and back (:func:`model_config_from_hf`). The weights and
files are :mod:`smoe.hf.convert`'s.

Which architecture (:func:`hf_format_for`): the one standard family that computes exactly what
the smoe config computes.

==========================================  =============================================
smoe model                                  ``model_type``
==========================================  =============================================
dense (``moe=None``), no qk-norm            ``llama``
dense, qk-norm                              ``qwen3``
softmax router, every layer MoE, weights    ``mixtral``
renormalised, no qk-norm, no shared expert
softmax router with qk-norm, no shared      ``qwen3_moe`` (``mlp_only_layers`` =
expert (any dense layers, any norm)         first_dense_layers, ``decoder_sparse_step`` =
                                            moe_every, ``norm_topk_prob``)
softmax router, no qk-norm, otherwise       ``qwen2_moe``: zero q/k/v biases; a shared
not Mixtral                                 expert as is (gated), or with a zero gate and
                                            its down projection doubled (ungated:
                                            sigmoid(0) * 2 = 1, exactly), or zero-width
sigmoid_bias router (DeepSeek-V3 style)     ``glm4_moe``: ``e_score_correction_bias``,
                                            groups (top2_sum), routed scaling, qk-norm
                                            flag, ungated shared experts, full RoPE
clamped SwiGLU experts (``swiglu_oai``), or ``gpt_oss``: topk_softmax router, every layer
expert or router biases                     MoE; zero q/k/v/o biases, attention sinks of
                                            -inf (none), ``layer_types`` all full attention
==========================================  =============================================

DeepSeek-V3 (``deepseek_v3``) is not a target: its attention is multi-head latent attention
(MLA: q/kv projected through a low-rank latent that is RMS-normalised, and a rotary key part
shared by all heads), and the RMSNorm on the latent makes it impossible to write smoe's
grouped-query attention as MLA weights, or MLA as smoe's. Its MoE block, though, is exactly
smoe's ``sigmoid_bias`` router (sigmoid scores, ``e_score_correction_bias`` for selection only,
``n_group``/``topk_group`` with top-2-sum group scores, ``routed_scaling_factor``,
``norm_topk_prob``, ungated shared experts, ``first_k_dense_replace`` dense layers): transformers'
``Glm4MoeMoE`` is the same code as ``DeepseekV3MoE`` on standard attention, so a DeepSeek-V3-style
smoe model exports as ``glm4_moe``. Import refuses every config with ``kv_lora_rank`` (MLA:
deepseek_v2/v3/v32, Kimi K2, GLM-4.7-Flash, LongCat, ...) with that one-line reason
(:func:`mla_refusal`).

gpt-oss (``gpt_oss``) is a target where it is exact. Its attention has q/k/v/o biases, a
learned per-head sink logit in the softmax denominator, and a 128-token sliding window on every
other layer; smoe's attention has none of these, so export writes zero biases, sinks of ``-inf``
(``exp(-inf) = 0``: no sink) and ``layer_types`` all ``full_attention`` (``sliding_window`` set
to the context length, for readers that ignore ``layer_types``), and import accepts exactly
that, refusing learned sinks, non-zero attention biases, a window shorter than the context, and
YaRN RoPE by name (so the released gpt-oss-20b/120b are refused: smoe cannot run them; use
``smoe.hf.patch`` on transformers' model). Its MoE is smoe's: ``topk_softmax`` router with a
bias, experts with biases and the clamped SwiGLU (``swiglu_oai``, ``swiglu_alpha`` /
``swiglu_limit``), gate/up interleaved on disk (see :mod:`smoe.hf.keymaps`). gpt-oss's RMSNorm
multiplies the weight before casting back (Llama after): the same in float32, a rounding apart
in bfloat16.

"Softmax router" is ``softmax_topk`` (renormalised when ``norm_topk_prob`` and K > 1),
``topk_softmax`` (a softmax over the K best logits equals the renormalised top-K of the full
softmax) or ``switch`` without capacity (top-1 probability). Refused, with a ``ValueError``
naming the feature: expert_choice, noisy_topk, sparsemixer, a capacity factor (token
dropping), expert or router biases, weights_on_input, activations other than SwiGLU,
routed_scaling_factor or groups with a softmax router (DeepSeek-V2 needs MLA attention), a
gated shared expert or ``moe_every`` > 1 with sigmoid_bias, shared experts with qk-norm and a
softmax router, ``max`` group scores; with gpt-oss features (expert or router biases, swiglu_oai):
plain SwiGLU, a router other than a softmax over the K best logits, shared experts, dense layers,
qk-norm, groups or routed scaling.

Training-only settings: transformers' ``router_aux_loss_coef`` multiplies a loss computed
differently from smoe's. smoe divides the expert counts by T*K and sums the per-layer losses;
transformers divides by T (its value is K times ours) and pools the layers before the product
(about the mean of the per-layer losses). Export writes ``aux_loss_coef * L_moe / K`` so that the
same routing gives about the same penalty (exactly when every layer routes alike); import does
the inverse. ``output_router_logits`` is False, as in the released models. z-loss, dropout,
``bias_update_rate`` and ``seq_aux_loss_coef`` have no HF field: the full smoe config travels in
``config.json`` under ``smoe_config``, and import uses it when it describes the same
architecture as the HF config and weights (so smoe -> HF -> smoe gives back the same config).

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smoe.config import ModelConfig, MoEConfig
from smoe.hf.keymaps import KeyContext

__all__ = ["HFFormat", "EXPORT_FAMILIES", "IMPORT_FAMILIES", "hf_format_for",
           "model_config_from_hf"]

#: The families export writes and import reads.
EXPORT_FAMILIES = ("llama", "qwen3", "mixtral", "qwen3_moe", "qwen2_moe", "glm4_moe", "gpt_oss")
IMPORT_FAMILIES = EXPORT_FAMILIES
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM", "glm4_moe": "Glm4MoeForCausalLM",
                  "gpt_oss": "GptOssForCausalLM"}
_SOFTMAX_ROUTERS = ("softmax_topk", "topk_softmax", "switch")
_SIGMOID_NORM_EPS = 1e-20          # glm4_moe's renormalisation epsilon
_SMOE_KEY = "smoe_config"          # the smoe config, inside the HF config.json


@dataclass(frozen=True)
class HFFormat:
    """How an smoe config is written in HF terms: the family, its config.json, and the key
    table flags (:class:`smoe.hf.keymaps.KeyContext`)."""

    family: str
    architecture: str
    config: dict[str, Any]
    flags: frozenset[str]


# -- smoe config -> HF config -----------------------------------------------------------------
def _refusals(c: ModelConfig) -> list[str]:
    """Every feature of ``c`` no supported family can express exactly (empty: exportable)."""
    out = []
    dense_layers = c.num_layers - len(c.moe_layer_indices())
    if dense_layers and c.ffn_activation != "swiglu":
        out.append(f"ffn_activation={c.ffn_activation!r} (dense layers): the HF families use a "
                   "SwiGLU (silu) MLP")
    m = c.moe
    if m is None:
        return out
    if m.activation not in ("swiglu", "swiglu_oai"):
        out.append(f"moe.activation={m.activation!r}: the HF families use SwiGLU (silu) experts "
                   "(gpt_oss: the clamped SwiGLU, swiglu_oai)")
    if m.router in ("expert_choice", "noisy_topk", "sparsemixer"):
        why = {"expert_choice": "experts choose tokens (not causal); no HF family does",
               "noisy_topk": "no HF family has a noise projection",
               "sparsemixer": "Phi-3.5-MoE (phimoe) also has LayerNorm and attention biases"}
        out.append(f"router={m.router!r}: {why[m.router]}")
    if m.capacity_factor is not None:
        out.append(f"capacity_factor={m.capacity_factor!r} (token dropping): transformers' MoE "
                   "blocks are dropless")
    if m.weights_on_input:
        out.append("weights_on_input=True: Llama 4 scales the expert input, but its attention "
                   "differs")
    if _is_gpt_oss(m):
        return out + _gpt_oss_refusals(c)
    if m.router in _SOFTMAX_ROUTERS:
        if m.routed_scaling_factor != 1.0:
            out.append(f"routed_scaling_factor={m.routed_scaling_factor!r} with router="
                       f"{m.router!r}: the softmax families have no routed scaling (DeepSeek-V2 "
                       "needs MLA attention)")
        if m.n_groups > 1:
            out.append(f"n_groups={m.n_groups} with router={m.router!r}: group-limited softmax "
                       "routing is DeepSeek-V2, which needs MLA attention")
        if m.num_shared_experts and c.qk_norm:
            out.append("shared experts with qk_norm and a softmax router: Qwen3-MoE has no "
                       "shared expert and Qwen2-MoE no qk-norm")
    elif m.router == "sigmoid_bias":
        if m.shared_expert_gate:
            out.append("shared_expert_gate=True with router='sigmoid_bias': glm4_moe's shared "
                       "experts have no gate")
        if m.num_shared_experts and m.shared_size % m.expert_size:
            out.append(f"shared_expert_size={m.shared_size} with router='sigmoid_bias': glm4_moe's "
                       f"shared MLP is a multiple of expert_size ({m.expert_size})")
        if c.moe_every != 1:
            out.append(f"moe_every={c.moe_every} with router='sigmoid_bias': glm4_moe only has "
                       "dense layers first (first_k_dense_replace)")
        if m.n_groups > 1 and m.group_score != "top2_sum":
            out.append(f"group_score={m.group_score!r}: glm4_moe scores groups by their top-2 sum")
        if m.num_experts // m.n_groups < 2:
            out.append(f"num_experts={m.num_experts} with n_groups={m.n_groups}: glm4_moe needs "
                       "at least 2 experts per group")
        if m.norm_topk_prob and m.norm_topk_eps != _SIGMOID_NORM_EPS:
            out.append(f"norm_topk_eps={m.norm_topk_eps!r}: glm4_moe renormalises with 1e-20")
    return out


def _is_gpt_oss(m: MoEConfig) -> bool:
    """Whether an MoE config has a feature only gpt_oss expresses."""
    return m.activation == "swiglu_oai" or m.expert_bias or m.router_bias


def _gpt_oss_refusals(c: ModelConfig) -> list[str]:
    m, out = c.moe, []
    if m.activation != "swiglu_oai":
        which = ", ".join(f"{n}=True" for n in ("expert_bias", "router_bias") if getattr(m, n))
        out.append(f"{which} with activation={m.activation!r}: only gpt_oss has expert and "
                   "router biases, and its experts use the clamped SwiGLU (swiglu_oai)")
    if m.router in _SOFTMAX_ROUTERS + ("sigmoid_bias",) and not (
            m.router in _SOFTMAX_ROUTERS and _renormalised(m)):
        out.append(f"router={m.router!r}" + (" without norm_topk_prob" if m.router ==
                                             "softmax_topk" and m.top_k > 1 else "")
                   + ": gpt_oss takes a softmax over the K best logits (topk_softmax)")
    if m.routed_scaling_factor != 1.0:
        out.append(f"routed_scaling_factor={m.routed_scaling_factor!r}: gpt_oss has no routed "
                   "scaling")
    if m.n_groups > 1:
        out.append(f"n_groups={m.n_groups}: gpt_oss has no group-limited routing")
    if m.num_shared_experts:
        out.append(f"num_shared_experts={m.num_shared_experts}: gpt_oss has no shared expert")
    if len(c.moe_layer_indices()) != c.num_layers:
        out.append(f"dense layers (first_dense_layers={c.first_dense_layers}, moe_every="
                   f"{c.moe_every}): gpt_oss has an MoE block in every layer")
    if c.qk_norm:
        out.append("qk_norm=True: gpt_oss has no q/k norm")
    return out


def _renormalised(m: MoEConfig) -> bool:
    """Whether a softmax router's K weights sum to 1 (what HF's ``norm_topk_prob`` means)."""
    if m.router == "topk_softmax":
        return True                # softmax over the K best logits
    if m.router == "switch":
        return False               # top-1 probability
    return m.norm_topk_prob and m.top_k > 1  # smoe does not renormalise one weight


def _family(c: ModelConfig) -> str:
    m = c.moe
    if m is None:
        return "qwen3" if c.qk_norm else "llama"
    if _is_gpt_oss(m):
        return "gpt_oss"
    if m.router == "sigmoid_bias":
        return "glm4_moe"
    if c.qk_norm:
        return "qwen3_moe"
    all_moe = len(c.moe_layer_indices()) == c.num_layers
    if all_moe and _renormalised(m) and not m.num_shared_experts:
        return "mixtral"
    return "qwen2_moe"


def _aux_to_hf(c: ModelConfig) -> float:
    m = c.moe
    return _clean(m.aux_loss_coef * len(c.moe_layer_indices()) / m.top_k)


def _clean(x: float) -> float:
    """Round away the last-bit noise of a scale and its inverse (0.01 * 4 / 2 * 2 / 4)."""
    return float(f"{x:.12g}")


def hf_format_for(config: ModelConfig, *, eos_token_id: int | None = None) -> HFFormat:
    """The HF family, config.json and key-table flags that express ``config`` exactly.

    Raises ``ValueError`` listing every feature no supported family can express."""
    problems = _refusals(config)
    if problems:
        raise ValueError("this smoe model has no exact Hugging Face equivalent: "
                         + "; ".join(problems))
    c, m = config, config.moe
    family = _family(c)
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_size,
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": c.init_std,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "dtype": "float32",
    }
    flags = {"untied"} if not c.tie_embeddings else set()
    if c.qk_norm:
        flags.add("qk_norm")
    dense_size = c.ffn_size if c.ffn_size is not None else (m.expert_size if m else 0)
    if family in ("llama", "qwen3"):
        hf["intermediate_size"] = c.ffn_size
        hf["attention_bias"] = False
        if family == "llama":
            hf["mlp_bias"] = False
        else:
            hf["use_sliding_window"] = False
            hf["sliding_window"] = None
    elif family == "mixtral":
        hf.update(intermediate_size=m.expert_size, num_local_experts=m.num_experts,
                  num_experts_per_tok=m.top_k, router_jitter_noise=0.0, sliding_window=None,
                  output_router_logits=False, router_aux_loss_coef=_aux_to_hf(c))
    elif family in ("qwen3_moe", "qwen2_moe"):
        hf.update(intermediate_size=dense_size, moe_intermediate_size=m.expert_size,
                  num_experts=m.num_experts, num_experts_per_tok=m.top_k,
                  norm_topk_prob=_renormalised(m), decoder_sparse_step=c.moe_every,
                  mlp_only_layers=list(range(c.first_dense_layers)), use_sliding_window=False,
                  sliding_window=None, output_router_logits=False,
                  router_aux_loss_coef=_aux_to_hf(c))
        if family == "qwen3_moe":
            hf["attention_bias"] = False
        else:
            hf["qkv_bias"] = True
            flags.add("qkv_bias")
            hf["shared_expert_intermediate_size"] = m.shared_size
            if not m.num_shared_experts:
                flags.add("no_shared")
            else:
                flags.add("shared_gate" if m.shared_expert_gate else "shared_ungated")
    elif family == "glm4_moe":
        hf.update(intermediate_size=dense_size, moe_intermediate_size=m.expert_size,
                  n_routed_experts=m.num_experts, num_experts_per_tok=m.top_k,
                  n_shared_experts=m.shared_size // m.expert_size,
                  routed_scaling_factor=m.routed_scaling_factor, n_group=m.n_groups,
                  topk_group=m.topk_groups, norm_topk_prob=m.norm_topk_prob,
                  first_k_dense_replace=c.first_dense_layers, use_qk_norm=c.qk_norm,
                  attention_bias=False, partial_rotary_factor=1.0,
                  num_nextn_predict_layers=0, output_router_logits=False)
        hf["rope_parameters"]["partial_rotary_factor"] = 1.0
        flags.add("shared" if m.num_shared_experts else "no_shared")
    elif family == "gpt_oss":
        # Zero attention biases and -inf sinks are written (not attention_bias=False) because
        # gpt-oss readers other than transformers expect them; the window covers the context.
        hf.update(intermediate_size=m.expert_size, num_local_experts=m.num_experts,
                  num_experts_per_tok=m.top_k, swiglu_alpha=m.activation_alpha,
                  swiglu_limit=m.activation_limit, attention_bias=True,
                  sliding_window=c.max_seq_len, layer_types=["full_attention"] * c.num_layers,
                  output_router_logits=False, router_aux_loss_coef=_aux_to_hf(c))
        flags |= {"attn_bias", "expert_bias" if m.expert_bias else "no_expert_bias",
                  "router_bias" if m.router_bias else "no_router_bias"}
    return HFFormat(family, _ARCHITECTURES[family], hf, frozenset(flags))


def _key_context(c: ModelConfig, flags: frozenset[str]) -> KeyContext:
    return KeyContext(num_layers=c.num_layers, moe_layers=c.moe_layer_indices(),
                      num_experts=c.moe.num_experts if c.moe else 0, hidden_size=c.hidden_size,
                      flags=flags, expert_size=c.moe.expert_size if c.moe else 0,
                      num_heads=c.num_heads)


def __getattr__(name: str) -> Any:
    """The HF -> smoe direction lives in :mod:`smoe.hf.import_config` (re-exported here)."""
    if name in ("model_config_from_hf", "mla_refusal", "unknown_family"):
        from smoe.hf import import_config

        return getattr(import_config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
