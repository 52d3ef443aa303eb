"""An HF config as an smoe ``ModelConfig``: the import direction of :mod:`smoe.hf.formats`
(whose docstring has the family table and what is refused).

:func:`model_config_from_hf` reads transformers' config object (so its defaults apply) or a
config.json dict, and refuses, naming each feature, what smoe's model cannot compute exactly;
:func:`mla_refusal` is the one-line reason a DeepSeek-style MLA model is refused, and
:func:`unknown_family` the one for a ``model_type`` smoe does not import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smoe.config import ModelConfig, MoEConfig
from smoe.hf.formats import IMPORT_FAMILIES, _clean

__all__ = ["model_config_from_hf", "mla_refusal", "unknown_family"]

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
        try:
            return AutoConfig.for_model(model_type, **data)
        except Exception as e:  # transformers' strict validation raises several types
            raise ValueError(f"the {model_type} config does not fit transformers' "
                             f"{model_type} config: {_one_line(e)}") from None
    return hf_config


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (its lines joined), at most ``limit`` characters."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    text = text or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_attention(cfg: Any, family: str, max_pos: int) -> list[str]:
    """What the HF attention and MLPs have that smoe's do not."""
    problems = []
    act = _attr(cfg, "hidden_act", default="silu")
    if act != "silu":
        problems.append(f"hidden_act={act!r}: smoe's MLPs are SwiGLU (silu)")
    if family not in ("qwen2_moe", "gpt_oss") and getattr(cfg, "attention_bias", False):
        problems.append("attention_bias=True: smoe's attention has no biases")
    if getattr(cfg, "mlp_bias", False):
        problems.append("mlp_bias=True: smoe's MLPs have no biases")
    window = getattr(cfg, "sliding_window", None)
    if family == "gpt_oss":  # the window applies to the layers layer_types names
        types = list(getattr(cfg, "layer_types", None) or [])
        odd = sorted(set(types) - {"sliding_attention", "full_attention"})
        if odd:
            problems.append(f"layer_types {', '.join(odd)}: smoe's attention is full")
        n = types.count("sliding_attention")
        if n and window and window < max_pos:
            problems.append(f"sliding_window={window} on {n} of {len(types)} layers "
                            "(layer_types): smoe's attention is full")
        return problems
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


def _moe_gpt_oss(cfg: Any, L: int, kw: dict[str, Any], flags: set[str]) -> set[int]:
    """gpt-oss: softmax over the K best biased logits, experts with biases and the clamped
    SwiGLU, every layer MoE; q/k/v/o biases (imported only when zero)."""
    kw.update(expert_size=int(_attr(cfg, "intermediate_size")), router="topk_softmax",
              activation="swiglu_oai", expert_bias=True, router_bias=True,
              activation_alpha=float(_attr(cfg, "swiglu_alpha", default=1.702)),
              activation_limit=float(_attr(cfg, "swiglu_limit", default=7.0)))
    flags |= {"expert_bias", "router_bias"}
    if getattr(cfg, "attention_bias", True):
        flags.add("attn_bias")
    return set(range(L))


#: model_type -> reader of its MoE settings into MoEConfig fields; returns the MoE layers.
_MOE_READERS = {"mixtral": _moe_mixtral, "qwen3_moe": _moe_qwen, "qwen2_moe": _moe_qwen,
                "glm4_moe": _moe_glm4, "gpt_oss": _moe_gpt_oss}


def mla_refusal(hf_config: Mapping[str, Any] | Any) -> str | None:
    """The one-line reason a config with multi-head latent attention (``kv_lora_rank``:
    DeepSeek-V2/V3 and their descendants) cannot be imported, or None for other configs."""
    get = (hf_config.get if isinstance(hf_config, Mapping)
           else lambda k: getattr(hf_config, k, None))
    if get("kv_lora_rank") is None:
        return None
    family = get("model_type")
    dims = ", ".join(f"{k}={get(k)}" for k in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim")
                     if get(k) is not None)
    return (f"model_type {family!r} uses multi-head latent attention (MLA: {dims}), which "
            "smoe's model does not have (its attention is grouped-query with full-head RoPE); "
            "its DeepSeek-V3-style MoE is smoe's sigmoid_bias router, which export writes as "
            "glm4_moe; to run this model on smoe's MoE layers use smoe.hf.patch")


def unknown_family(family: Any) -> str:
    """The one-line reason a ``model_type`` cannot be imported, listing the ones that can."""
    what = "model_type is missing" if family is None else f"model_type {family!r}"
    return (f"{what}: smoe imports {', '.join(IMPORT_FAMILIES)} (smoe.hf.patch runs more "
            "families inside transformers)")


def model_config_from_hf(hf_config: Any) -> tuple[ModelConfig, frozenset[str]]:
    """The smoe config (and key-table flags) of an HF config (a ``PretrainedConfig`` or a
    config.json dict). Raises ``ValueError`` naming what smoe cannot express.

    Loss weights: ``aux_loss_coef = router_aux_loss_coef * K / L_moe`` (see the module
    docstring), none for glm4_moe; ``z_loss_coef = 0`` (these families have no z-loss)."""
    mla = mla_refusal(hf_config)
    if mla:
        raise ValueError(mla)
    family = (hf_config.get("model_type") if isinstance(hf_config, Mapping)
              else getattr(hf_config, "model_type", None))
    if family not in IMPORT_FAMILIES:
        raise ValueError(unknown_family(family))
    cfg = _as_hf_config(hf_config)
    try:
        return _from_hf(cfg, family)
    except (TypeError, ArithmeticError) as e:  # a field of the wrong type or value
        raise ValueError(f"the {family} config is malformed: {_one_line(e)}") from None


def _from_hf(cfg: Any, family: str) -> tuple[ModelConfig, frozenset[str]]:
    for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size",
                 "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value <= 0):
            raise ValueError(f"{name}={value!r} in the {family} config: must be a positive "
                             "integer")
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
        if family == "gpt_oss":
            problems.append("attention sinks (self_attn.sinks) import only when every sink is "
                            "-inf")
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
