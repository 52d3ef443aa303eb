"""Which family a config belongs to, when it says so (``model_type``), when it only names its
class (``architectures``), when it says neither (its keys), or when it is a native smoe run.

The family list is :data:`smoe.hf.families.SUPPORTED_FAMILIES` -- one list for the whole
library -- read as data: the module is loaded from its file on its own, so neither transformers
nor torch is imported (``smoe plan`` answers on a machine with neither). Families with a row in
:data:`smoe.plan.families.FAMILIES` are counted exactly; the others through the generic row.
Export/import (:mod:`smoe.hf.convert`) cover fewer families, because converting weights needs a
key map per family while counting parameters only needs the config.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smoe.plan.families import ALIASES, DENSE_FAMILIES, FAMILIES, Family, family_for

__all__ = ["ARCHITECTURES", "hf_families", "known_model_types", "resolve", "smoe_run_to_hf"]

#: Architecture class names whose ``model_type`` is not their CamelCase name in snake case.
ARCHITECTURES = {
    "Grok1ModelForCausalLM": "grok-1", "Grok1ForCausalLM": "grok-1", "GrokForCausalLM": "grok-1",
    "SwitchTransformersForConditionalGeneration": "switch_transformers",
    "SwitchTransformersModel": "switch_transformers",
    "DeepseekV3ForCausalLM": "deepseek_v3", "DeepseekV2ForCausalLM": "deepseek_v2",
    "PhiMoEForCausalLM": "phimoe", "Llama4ForConditionalGeneration": "llama4",
}


@functools.lru_cache(maxsize=1)
def hf_families() -> tuple[str, ...]:
    """``smoe.hf.families.SUPPORTED_FAMILIES``, loaded from its file without the ``smoe.hf``
    package (whose ``__init__`` imports the torch-based patcher)."""
    spec = importlib.util.find_spec("smoe")
    assert spec is not None and spec.submodule_search_locations  # we are inside smoe
    path = Path(next(iter(spec.submodule_search_locations))) / "hf" / "families.py"
    file_spec = importlib.util.spec_from_file_location("_smoe_plan_hf_families", path)
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[file_spec.name] = module  # dataclasses look their module up while being built
    try:
        file_spec.loader.exec_module(module)  # pure data: dataclasses only
    finally:
        del sys.modules[file_spec.name]
    return tuple(module.SUPPORTED_FAMILIES)


def known_model_types() -> tuple[str, ...]:
    """Every ``model_type`` the planner reads (own rows, aliases, smoe.hf's families, Switch)."""
    return tuple(sorted({*FAMILIES, *ALIASES, *hf_families(), "switch_transformers"}))


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _from_architectures(archs: Any) -> str | None:
    if not isinstance(archs, list):
        return None
    by_norm = {_norm(mt): mt for mt in known_model_types()}
    for arch in archs:
        if not isinstance(arch, str):
            continue
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
        stem = re.sub(r"(ForCausalLM|ForConditionalGeneration|Model|LMHeadModel)+$", "", arch)
        if _norm(stem) in by_norm:
            return by_norm[_norm(stem)]
    return None


def _from_shape(cfg: Mapping[str, Any]) -> str | None:
    """A family from the keys alone, for configs with neither model_type nor architectures."""
    if "kv_lora_rank" in cfg:
        return "deepseek_v3" if "n_group" in cfg or "topk_method" in cfg else "deepseek_v2"
    if "ffn_config" in cfg and "attn_config" in cfg:
        return "dbrx"
    if "d_ff" in cfg and "num_experts" in cfg:
        return "switch_transformers"
    if "num_local_experts" in cfg:
        if "sliding_window" in cfg and "head_dim" in cfg and cfg.get("attention_bias", True):
            return "gpt_oss"
        return "mixtral"
    if "num_experts" in cfg and "moe_intermediate_size" in cfg:
        return "qwen2_moe" if "shared_expert_intermediate_size" in cfg else "qwen3_moe"
    if "num_experts" in cfg and "intermediate_size" in cfg:
        return "olmoe"
    return None


def smoe_run_to_hf(run: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A native smoe run's ``config.json`` (``{"format": "smoe-run", "model": ...}``) as the
    config dict of the ``smoe`` family (validated by :class:`smoe.config.ModelConfig`)."""
    from smoe.config import GATED_ACTIVATIONS, ModelConfig

    try:
        mc = ModelConfig.from_dict(dict(run["model"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{source}: invalid smoe run config: {exc}") from None
    m = mc.moe
    cfg: dict[str, Any] = {
        "model_type": "smoe", "hidden_size": mc.hidden_size, "num_hidden_layers": mc.num_layers,
        "num_attention_heads": mc.num_heads, "num_key_value_heads": mc.num_kv_heads,
        "head_dim": mc.head_size, "vocab_size": mc.vocab_size,
        "tie_word_embeddings": mc.tie_embeddings, "qk_norm": mc.qk_norm,
        "intermediate_size": mc.ffn_size or 0, "max_position_embeddings": mc.max_seq_len,
        "mlp_gated": mc.ffn_activation in GATED_ACTIVATIONS,
        "first_k_dense_replace": mc.first_dense_layers, "decoder_sparse_step": mc.moe_every,
        "num_experts": 0, "num_experts_per_tok": 1,
    }
    if m is not None:
        cfg.update(num_experts=m.num_experts, num_experts_per_tok=m.top_k,
                   moe_intermediate_size=m.expert_size, expert_bias=m.expert_bias,
                   router_bias=m.router_bias, shared_expert_intermediate_size=m.shared_size,
                   n_shared_experts=m.num_shared_experts, shared_expert_gate=m.shared_expert_gate,
                   mlp_gated=m.gated)
        if mc.ffn_size and (mc.ffn_activation in GATED_ACTIVATIONS) != m.gated:
            raise ValueError(f"{source}: smoe plan counts dense FFN and experts with one "
                             "activation kind; this run mixes gated and non-gated")
    return cfg


def resolve(cfg: Mapping[str, Any], source: str) -> tuple[str, Family, list[str]]:
    """``(model_type, family row, notes)`` for a config dict (already unwrapped from
    ``text_config``). Raises ``ValueError`` naming the field when no family fits."""
    notes: list[str] = []
    model_type = cfg.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ValueError(f"{source}: field 'model_type' must be a string, got {model_type!r}")
    if not model_type:
        model_type = _from_architectures(cfg.get("architectures"))
        if model_type:
            notes.append(f"no model_type: resolved {model_type!r} from architectures "
                         f"{cfg.get('architectures')}")
        else:
            model_type = _from_shape(cfg)
            if model_type is None:
                raise ValueError(f"{source}: no 'model_type' field, no known 'architectures' and "
                                 "no recognisable MoE keys; add model_type (one of: "
                                 f"{', '.join(known_model_types())})")
            notes.append(f"no model_type or architectures: resolved {model_type!r} from the "
                         "config's keys")
    model_type = ALIASES.get(model_type, model_type)
    if model_type == "switch_transformers":
        return model_type, FAMILIES["mixtral"], notes  # counted by smoe.plan.t5
    fam = family_for(model_type, hf_families())
    if fam is None:
        raise ValueError(f"{source}: model_type {model_type!r} is not a supported family; "
                         f"supported: {', '.join(known_model_types())}")
    if not fam.exact and model_type != "grok-1":
        notes.append(f"{model_type}: counted with the generic MoE layout (not a per-family row): "
                     "an estimate; see smoe.plan.families.GENERIC")
    if model_type in DENSE_FAMILIES:
        notes.append(f"{model_type}: a dense model (no experts)")
    return model_type, fam, notes
