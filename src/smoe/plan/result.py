"""The planner's entry points (:func:`plan_from_config`, :func:`plan_from_path`), its result
and the human-readable table."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from smoe.plan.count import (MOE_LAYER_RULES, Ledger, Reader, add_attention, add_gated_mlp,
                             add_mamba, add_moe, uses_mla)
from smoe.plan.families import DENSE_FAMILIES, KEPT_BF16, QUANT_FORMATS
from smoe.plan.kv import KVGroup, kv_groups
from smoe.plan.resolve import resolve, smoe_run_to_hf

#: ``breakdown`` / ``weight_bytes_by_part`` groups, in table order.
GROUPS = ("embedding", "lm_head", "attention", "mamba", "dense_mlp", "shared_experts",
          "routed_experts", "router", "norms")

__all__ = ["PlanResult", "format_plan", "plan_from_config", "plan_from_path"]


@dataclass
class PlanResult:
    """What :func:`plan_from_config` computed; :meth:`to_dict` is the ``--json`` output."""

    model_type: str
    source: str
    num_layers: int
    num_moe_layers: int
    num_experts: int
    top_k: int
    num_shared_experts: int
    hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool
    total_params: int
    active_params: int
    active_params_no_embedding: int
    expert_params: int
    non_expert_params: int
    embedding_params: int
    lm_head_params: int
    mtp_params: int
    breakdown: dict[str, int]
    weight_bytes: dict[str, int]
    notes: list[str]
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    max_position_embeddings: int | None = None
    exact: bool = True
    weight_bytes_by_part: dict[str, dict[str, int]] | None = None
    kv_layers: list[KVGroup] | None = None

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kv_layers"] = [g.to_dict() for g in self.kv_layers or []]
        out["num_dense_layers"] = self.num_dense_layers
        out["quantization"] = {**{k: q.description for k, q in QUANT_FORMATS.items()},
                               "kept_in_bf16": KEPT_BF16}
        out["conventions"] = {
            "active_params": "non-expert params incl. input embedding and lm_head + top_k routed "
                             "experts per MoE layer",
            "active_params_no_embedding": "active_params without the input-embedding table "
                                          "(kept when tied, as it is the lm_head)",
            "expert_params": "routed experts only; shared experts count as non-expert",
        }
        return out


def _unwrap(cfg: Mapping[str, Any], source: str) -> tuple[Mapping[str, Any], list[str]]:
    """The dict to read: a nested ``text_config`` is used on its own, a smoe run's ``model``
    section is translated."""
    notes: list[str] = []
    if cfg.get("format") == "smoe-run" and isinstance(cfg.get("model"), Mapping):
        return smoe_run_to_hf(cfg, source), ["a native smoe run"]
    outer = cfg.get("model_type")
    text = cfg.get("text_config")
    if isinstance(text, Mapping):
        inner = dict(text)
        if inner.get("tie_word_embeddings") is None and "tie_word_embeddings" in cfg:
            inner["tie_word_embeddings"] = cfg["tie_word_embeddings"]
        notes.append(f"{outer or 'model'}: counted the language model in text_config only "
                     "(vision/audio towers and projectors are not counted)")
        if not inner.get("model_type") and outer:
            inner["model_type"] = outer
        cfg = inner
    return cfg, notes


def _check_attention(source: str, hidden: int, heads: int, kv_heads: int,
                     head_dim_given: bool) -> None:
    """Shapes no attention layer can have, refused with the field named."""
    if not head_dim_given and hidden % heads:
        raise ValueError(f"{source}: num_attention_heads={heads} does not divide hidden_size="
                         f"{hidden}; fix num_attention_heads or give head_dim")
    if kv_heads > heads:
        raise ValueError(f"{source}: num_key_value_heads={kv_heads} is larger than "
                         f"num_attention_heads={heads}")
    if heads % kv_heads:
        raise ValueError(f"{source}: num_key_value_heads={kv_heads} does not divide "
                         f"num_attention_heads={heads}")


def plan_from_config(config: Mapping[str, Any], *, source: str = "config") -> PlanResult:
    """Count the parameters and weight bytes of the model a HF ``config.json`` dict describes
    (or a smoe run's ``config.json``).

    ``source`` names the config in error messages. Raises ``ValueError`` for an unknown
    ``model_type``, for missing or malformed fields and for shapes no model can have (the message
    names the field).
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    cfg, notes = _unwrap(config, source)
    model_type, fam, more = resolve(cfg, source)
    notes += more
    if model_type == "switch_transformers":
        from smoe.plan.t5 import plan_switch

        return plan_switch(cfg, source, notes)
    r = Reader(cfg, model_type, fam, source)

    hidden = r.int(("hidden_size", "d_model"), minimum=1)
    n_layers = r.int(("num_hidden_layers", "n_layers"), minimum=1)
    heads = r.int(fam.heads, minimum=1)
    vocab = r.int("vocab_size", minimum=1)
    kv_heads = r.int(fam.kv_heads, heads, minimum=1)
    if uses_mla(r, fam):  # heads of their own widths; key/value heads are the query heads
        kv_heads = heads
    else:
        _check_attention(source, hidden, heads, kv_heads,
                         bool(fam.head_dim) and r.get(fam.head_dim, None) is not None)
    head_dim = r.int(fam.head_dim, hidden // heads, minimum=1) if fam.head_dim else hidden // heads
    dense_model = model_type in DENSE_FAMILIES
    n_exp = r.int(fam.num_experts, 0) if dense_model else r.int(fam.num_experts, minimum=1)
    top_k = r.int(fam.top_k, 1, minimum=1) if dense_model else r.int(fam.top_k, minimum=1)
    if n_exp and top_k > n_exp:
        key = fam.top_k[0] if isinstance(fam.top_k, tuple) else fam.top_k
        raise ValueError(f"{source}: {key}: top_k={top_k} is larger than the number of experts "
                         f"{n_exp}")
    tied = bool(r.get("tie_word_embeddings", False))
    max_pos = r.int(("max_position_embeddings", "max_seq_len", "n_positions"), None,
                    nullable=True)

    is_moe = MOE_LAYER_RULES[fam.moe_layers](r, n_layers) if n_exp else [False] * n_layers
    n_moe = sum(is_moe)
    n_attn = n_layers
    if fam.mamba:
        period, offset = r.int("attn_layer_period", minimum=1), r.int("attn_layer_offset")
        n_attn = sum(i % period == offset for i in range(n_layers))

    led = Ledger()
    norm = 2 if fam.norm_bias else 1  # LayerNorm with bias stores weight and bias
    led.matrix("embedding", vocab, hidden, linear=False)
    if not tied:
        led.matrix("lm_head", vocab, hidden, linear=False)
    if r.flag(fam.lm_head_bias):
        led.vector("lm_head", vocab)
    led.vector("norms", norm * hidden, 2 * n_layers + 1)  # two per layer + final

    add_attention(led, r, fam, n_attn, hidden, heads, kv_heads, head_dim)
    if fam.mamba:
        add_mamba(led, r, n_layers - n_attn, hidden)
    if n_layers - n_moe:
        add_gated_mlp(led, "dense_mlp", hidden, r.int(fam.dense_ffn), n_layers - n_moe,
                      r.flag(fam.mlp_bias), r.flag(fam.gated))
    n_shared = 0
    if n_moe:
        n_shared = add_moe(led, r, fam, n_moe, hidden, n_exp, top_k)

    mtp = 0
    n_mtp = r.int("num_nextn_predict_layers", 0) if fam.attention == "mla" else 0
    if n_mtp and n_moe:
        # DeepSeek's MTP block: one MoE decoder layer, enorm, hnorm, eh_proj (2H -> H),
        # shared_head.norm, and its own copies of the embedding and the head.
        moe = sum(led.total(g) for g in ("routed_experts", "router", "shared_experts")) // n_moe
        layer = led.total("attention") // n_attn + moe + 2 * hidden
        mtp = n_mtp * (layer + 3 * hidden + 2 * hidden * hidden + 2 * vocab * hidden)
        notes.append(f"num_nextn_predict_layers={n_mtp}: the multi-token-prediction module "
                     f"({mtp:,} params as stored in the checkpoint) is not in the totals")
    if model_type == "deepseek_v3" and n_moe:
        notes.append(f"router e_score_correction_bias buffers ({n_moe * n_exp:,} fp32 values) are "
                     "buffers, not parameters, and are not counted")

    breakdown = {g: led.total(g) for g in GROUPS}
    formats = ("fp32", "bf16", *QUANT_FORMATS)
    total, active = led.total(), led.active()
    embedding = breakdown["embedding"]
    return PlanResult(
        model_type=model_type, source=source, num_layers=n_layers, num_moe_layers=n_moe,
        num_experts=n_exp, top_k=top_k, num_shared_experts=n_shared, hidden_size=hidden,
        vocab_size=vocab, tie_word_embeddings=tied, total_params=total, active_params=active,
        active_params_no_embedding=active - (0 if tied else embedding),
        expert_params=breakdown["routed_experts"],
        non_expert_params=total - breakdown["routed_experts"], embedding_params=embedding,
        lm_head_params=breakdown["lm_head"] + (embedding if tied else 0), mtp_params=mtp,
        breakdown=breakdown,
        weight_bytes={f: led.nbytes(f) for f in formats}, notes=notes,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_pos, exact=fam.exact,
        weight_bytes_by_part={g: {f: led.nbytes(f, g) for f in formats} for g in GROUPS
                              if breakdown[g]},
        kv_layers=kv_groups(r, fam, n_layers=n_layers, n_attn=n_attn, hidden=hidden,
                            heads=heads, kv_heads=kv_heads, head_dim=head_dim))


def plan_from_path(path: str | Path) -> PlanResult:
    """:func:`plan_from_config` on a ``config.json`` file, a folder holding one (a HF model or a
    smoe run), or a catalog name (:func:`smoe.plan.models.catalog_names`, e.g. ``mixtral-8x7b``).

    Raises ``FileNotFoundError`` for a missing file that is no catalog name or a folder without
    ``config.json``, and ``ValueError`` for unreadable or invalid JSON (both name the path).
    """
    from smoe.plan.models import CATALOG_DIR, catalog_names, load_named

    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"{path}: folder has no config.json")
    elif not p.exists():
        named = load_named(str(path)) if "/" not in str(path) else None
        if named is None:
            raise FileNotFoundError(f"{path}: no such file or folder, and not a catalog name "
                                    f"({', '.join(catalog_names())})")
        source = f"{path} (catalog: {named.get('_source_url', CATALOG_DIR)})"
        return plan_from_config(named, source=source)
    try:
        config = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: invalid JSON: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: cannot read: {exc}") from None
    return plan_from_config(config, source=str(p))


def _short(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_plan(result: PlanResult) -> str:
    """A small human-readable table of a :class:`PlanResult`."""
    d = result
    shared = f" + {d.num_shared_experts} shared" if d.num_shared_experts else ""
    head = [f"{d.model_type}  ({d.source})",
            f"{d.num_layers} layers ({d.num_moe_layers} MoE, {d.num_dense_layers} dense), "
            f"{d.num_experts} experts{shared}, top-{d.top_k}, hidden {d.hidden_size}, "
            f"vocab {d.vocab_size}, {'tied' if d.tie_word_embeddings else 'untied'} embeddings", ""]
    rows = [("total parameters", d.total_params),
            ("active / token (with input embedding + lm_head)", d.active_params),
            ("active / token (without input embedding)", d.active_params_no_embedding),
            ("routed experts", d.expert_params),
            ("non-expert", d.non_expert_params)]
    rows += [(f"  {k.replace('_', ' ')}", v) for k, v in d.breakdown.items()
             if v and k != "routed_experts"]
    if d.mtp_params:
        rows.append(("MTP module (not in total)", d.mtp_params))
    width = max(len(k) for k, _ in rows)
    out = head + [f"{k:<{width}}  {v:>19,}  {_short(v):>8}" for k, v in rows]
    out += ["", f"{'weights':<8}{'GB':>10}{'GiB':>10}  format"]
    desc = {"fp32": "all parameters at 4 bytes", "bf16": "all parameters at 2 bytes",
            **{k: q.label for k, q in QUANT_FORMATS.items()}}
    for fmt, b in d.weight_bytes.items():
        out.append(f"{fmt:<8}{b / 1e9:>10.2f}{b / 2**30:>10.2f}  {desc[fmt]}")
    out.append(f"(fp8/int8/int4: {KEPT_BF16})")
    out += [f"note: {n}" for n in d.notes]
    return "\n".join(out)
