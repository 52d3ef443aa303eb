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
==========================================  =============================================

"Softmax router" is ``softmax_topk`` (renormalised when ``norm_topk_prob`` and K > 1),
``topk_softmax`` (a softmax over the K best logits equals the renormalised top-K of the full
softmax) or ``switch`` without capacity (top-1 probability). Refused, with a ``ValueError``
naming the feature: expert_choice, noisy_topk, sparsemixer, a capacity factor (token
dropping), expert or router biases, weights_on_input, activations other than SwiGLU,
routed_scaling_factor or groups with a softmax router (DeepSeek-V2 needs MLA attention), a
gated shared expert or ``moe_every`` > 1 with sigmoid_bias, shared experts with qk-norm and a
softmax router, and ``max`` group scores.

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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from smoe.config import ModelConfig, MoEConfig
from smoe.hf.keymaps import KeyContext

__all__ = ["HFFormat", "EXPORT_FAMILIES", "IMPORT_FAMILIES", "hf_format_for",
           "model_config_from_hf"]

#: The families export writes and import reads.
EXPORT_FAMILIES = ("llama", "qwen3", "mixtral", "qwen3_moe", "qwen2_moe", "glm4_moe")
IMPORT_FAMILIES = EXPORT_FAMILIES
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}
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
    if m.activation != "swiglu":
        out.append(f"moe.activation={m.activation!r}: the HF families use SwiGLU (silu) experts")
    if m.router in ("expert_choice", "noisy_topk", "sparsemixer"):
        why = {"expert_choice": "experts choose tokens (not causal); no HF family does",
               "noisy_topk": "no HF family has a noise projection",
               "sparsemixer": "Phi-3.5-MoE (phimoe) also has LayerNorm and attention biases"}
        out.append(f"router={m.router!r}: {why[m.router]}")
    if m.capacity_factor is not None:
        out.append(f"capacity_factor={m.capacity_factor!r} (token dropping): transformers' MoE "
                   "blocks are dropless")
    if m.expert_bias:
        out.append("expert_bias=True: only gpt_oss has expert biases, and it also has attention "
                   "sinks")
    if m.router_bias:
        out.append("router_bias=True: only gpt_oss has a router bias, and it also has attention "
                   "sinks")
    if m.weights_on_input:
        out.append("weights_on_input=True: Llama 4 scales the expert input, but its attention "
                   "differs")
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
    return HFFormat(family, _ARCHITECTURES[family], hf, frozenset(flags))


def _key_context(c: ModelConfig, flags: frozenset[str]) -> KeyContext:
    return KeyContext(num_layers=c.num_layers, moe_layers=c.moe_layer_indices(),
                      num_experts=c.moe.num_experts if c.moe else 0, hidden_size=c.hidden_size,
                      flags=flags)


# -- HF config -> smoe config -----------------------------------------------------------------
_MISSING = object()


def _attr(cfg: Any, *names: str, default: Any = _MISSING) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    if default is _MISSING:
        raise ValueError(f"the HF config has no {' / '.join(names)}")
    return default


def _rope(cfg: Any) -> float:
    rp = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind != "default":
        raise ValueError(f"rope_type={kind!r} (scaled RoPE): smoe's RoPE is the default one")
    partial = rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
    if partial is not None and partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial!r}: smoe rotates the whole head")
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise ValueError("the HF config has no rope_theta")
    return float(theta)


def _moe_layout(num_layers: int, moe_layers: set[int]) -> tuple[int, int]:
    """(moe_every, first_dense_layers) giving exactly ``moe_layers``, or ValueError."""
    for every in range(1, num_layers + 1):
        for first in range(num_layers + 1):
            got = {i for i in range(num_layers) if i >= first and (i + 1) % every == 0}
            if got == moe_layers:
                return every, first
    raise ValueError(f"MoE layers {sorted(moe_layers)}: smoe places MoE layers by "
                     "first_dense_layers and moe_every, which cannot give this set")


def _as_hf_config(hf_config: Any) -> Any:
    if isinstance(hf_config, Mapping):
        from transformers import AutoConfig

        data = dict(hf_config)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ValueError("the HF config has no model_type")
        return AutoConfig.for_model(model_type, **data)
    return hf_config


def _check_attention(cfg: Any, family: str, max_pos: int) -> list[str]:
    """What the HF attention and MLPs have that smoe's do not."""
    problems = []
    act = _attr(cfg, "hidden_act", default="silu")
    if act != "silu":
        problems.append(f"hidden_act={act!r}: smoe's MLPs are SwiGLU (silu)")
    if family != "qwen2_moe" and getattr(cfg, "attention_bias", False):
        problems.append("attention_bias=True: smoe's attention has no biases")
    if getattr(cfg, "mlp_bias", False):
        problems.append("mlp_bias=True: smoe's MLPs have no biases")
    window = getattr(cfg, "sliding_window", None)
    sliding = getattr(cfg, "use_sliding_window", window is not None)
    if sliding and window and window < max_pos:
        problems.append(f"sliding_window={window}: smoe's attention is full")
    return problems


def _moe_mixtral(cfg: Any, L: int, kw: dict[str, Any], flags: set[str]) -> set[int]:
    kw.update(expert_size=int(_attr(cfg, "intermediate_size")), router="softmax_topk",
              norm_topk_prob=True)
    return set(range(L))


def _moe_qwen(cfg: Any, L: int, kw: dict[str, Any], flags: set[str]) -> set[int]:
    """Qwen2-MoE and Qwen3-MoE: ``mlp_only_layers``, ``decoder_sparse_step``,
    ``norm_topk_prob``; Qwen2-MoE's gated shared expert and q/k/v biases."""
    step = int(_attr(cfg, "decoder_sparse_step", default=1))
    only = set(_attr(cfg, "mlp_only_layers", default=[]))
    norm = bool(_attr(cfg, "norm_topk_prob", default=False))
    kw.update(expert_size=int(_attr(cfg, "moe_intermediate_size")), router="softmax_topk",
              norm_topk_prob=norm)
    if norm and kw["top_k"] == 1:  # HF renormalises one weight to 1, as smoe's topk_softmax
        kw["router"] = "topk_softmax"
    if cfg.model_type == "qwen2_moe":
        if getattr(cfg, "qkv_bias", True):
            flags.add("qkv_bias")
        shared = int(_attr(cfg, "shared_expert_intermediate_size", default=0))
        if shared:
            kw.update(num_shared_experts=1, shared_expert_gate=True)
            if shared != kw["expert_size"]:
                kw["shared_expert_size"] = shared
            flags.add("shared_gate")
        else:
            flags.add("no_shared")
    return {i for i in range(L) if i not in only and (i + 1) % step == 0}


def _moe_glm4(cfg: Any, L: int, kw: dict[str, Any], flags: set[str]) -> set[int]:
    """GLM-4.5: sigmoid scores, selection bias, groups, routed scaling, ungated shared
    experts, dense layers first; no auxiliary loss (balanced by the selection bias)."""
    n_shared = int(_attr(cfg, "n_shared_experts", default=0))
    kw.update(expert_size=int(_attr(cfg, "moe_intermediate_size")), router="sigmoid_bias",
              norm_topk_prob=bool(_attr(cfg, "norm_topk_prob", default=True)),
              routed_scaling_factor=float(_attr(cfg, "routed_scaling_factor", default=1.0)),
              n_groups=int(_attr(cfg, "n_group", default=1)),
              topk_groups=int(_attr(cfg, "topk_group", default=1)),
              num_shared_experts=n_shared, aux_loss_coef=0.0)
    flags.add("shared" if n_shared else "no_shared")
    return set(range(int(_attr(cfg, "first_k_dense_replace", default=1)), L))


#: model_type -> reader of its MoE settings into MoEConfig fields; returns the MoE layers.
_MOE_READERS = {"mixtral": _moe_mixtral, "qwen3_moe": _moe_qwen, "qwen2_moe": _moe_qwen,
                "glm4_moe": _moe_glm4}


def model_config_from_hf(hf_config: Any) -> tuple[ModelConfig, frozenset[str]]:
    """The smoe config (and key-table flags) of an HF config (a ``PretrainedConfig`` or a
    config.json dict). Raises ``ValueError`` naming what smoe cannot express.

    Loss weights: ``aux_loss_coef = router_aux_loss_coef * K / L_moe`` (see the module
    docstring), none for glm4_moe; ``z_loss_coef = 0`` (these families have no z-loss)."""
    cfg = _as_hf_config(hf_config)
    family = getattr(cfg, "model_type", None)
    if family not in IMPORT_FAMILIES:
        raise ValueError(f"model_type {family!r} cannot be imported: smoe reads "
                         f"{', '.join(IMPORT_FAMILIES)}")
    L, D = int(_attr(cfg, "num_hidden_layers")), int(_attr(cfg, "hidden_size"))
    heads = int(_attr(cfg, "num_attention_heads"))
    head_dim = int(_attr(cfg, "head_dim", default=D // heads))
    max_pos = int(_attr(cfg, "max_position_embeddings"))
    problems = _check_attention(cfg, family, max_pos)
    theta = 1.0
    try:
        theta = _rope(cfg)
    except ValueError as e:
        problems.append(str(e))
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    qk_norm = family in ("qwen3", "qwen3_moe") or bool(getattr(cfg, "use_qk_norm", False))
    flags = ({"untied"} if not tied else set()) | ({"qk_norm"} if qk_norm else set())
    init_std = float(_attr(cfg, "initializer_range", default=0.02))
    moe, moe_every, first_dense = None, 1, 0
    if family in _MOE_READERS:
        kw: dict[str, Any] = dict(
            hidden_size=D, num_experts=int(_attr(cfg, "num_local_experts", "num_experts",
                                                 "n_routed_experts")),
            top_k=int(_attr(cfg, "num_experts_per_tok")), z_loss_coef=0.0, init_std=init_std)
        moe_layers = _MOE_READERS[family](cfg, L, kw, flags)
        if kw.get("n_groups", 1) > 1 and kw["num_experts"] // kw["n_groups"] < 2:
            problems.append(f"n_group={kw['n_groups']} leaves fewer than 2 experts per group")
        if moe_layers:
            if "aux_loss_coef" not in kw:
                aux = float(_attr(cfg, "router_aux_loss_coef", default=0.001))
                kw["aux_loss_coef"] = _clean(aux * kw["top_k"] / len(moe_layers))
            try:
                moe_every, first_dense = _moe_layout(L, moe_layers)
            except ValueError as e:
                problems.append(str(e))
    if problems:
        raise ValueError(f"the {family} model cannot be imported exactly: " + "; ".join(problems))
    if family in _MOE_READERS and moe_layers:
        moe = MoEConfig(**kw)
    has_dense = moe is None or first_dense > 0 or moe_every > 1
    ffn_size = _attr(cfg, "intermediate_size", default=None) if has_dense else None
    config = ModelConfig(
        vocab_size=int(_attr(cfg, "vocab_size")), hidden_size=D, num_layers=L, num_heads=heads,
        num_kv_heads=int(_attr(cfg, "num_key_value_heads", default=heads)), max_seq_len=max_pos,
        head_dim=None if head_dim * heads == D else head_dim, rope_theta=theta,
        norm_eps=float(_attr(cfg, "rms_norm_eps")), qk_norm=qk_norm, tie_embeddings=tied,
        ffn_size=int(ffn_size) if ffn_size is not None else None, moe=moe,
        moe_every=moe_every, first_dense_layers=first_dense, init_std=init_std)
    return config, frozenset(flags)
