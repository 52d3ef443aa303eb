"""Nemotron-H: a stack of single-mixer blocks (``layers_block_type``: Mamba-2, attention, MoE
or MLP, each behind one RMSNorm), counted as transformers' ``NemotronHForCausalLM`` builds it.

Experts and MLPs are not gated (squared ReLU: ``up_proj`` and ``down_proj``); a MoE block has a
router (E x hidden), shared experts of ``moe_shared_expert_intermediate_size``, and with
``moe_latent_size`` its experts work in a smaller latent space behind two projections. Mamba-2
(Dao & Gu 2024, arXiv 2405.21060): ``in_proj`` hidden -> 2 * d_inner + 2 * groups * d_state +
heads, a depthwise conv over d_inner + 2 * groups * d_state channels, dt_bias / A_log / D per
head, a gated RMSNorm over d_inner, ``out_proj``; its decode state is heads x head_dim x d_state
plus the conv window.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smoe.plan.count import Ledger, Reader
from smoe.plan.families import QUANT_FORMATS, Family
from smoe.plan.kv import KVGroup

__all__ = ["plan_nemotron_h"]

_MAMBA = ("mamba", "linear_attention", "M")
_ATTN = ("attention", "full_attention", "*")
_MOE = ("moe", "E")
_MLP = ("mlp", "-")


def plan_nemotron_h(cfg: Mapping[str, Any], source: str, notes: list[str]):
    from smoe.plan.result import GROUPS, PlanResult

    r = Reader(cfg, "nemotron_h", Family(), source)
    blocks = r.get("layers_block_type")
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(f"{source}: field 'layers_block_type' must be a non-empty list")
    unknown = sorted({b for b in blocks if b not in (*_MAMBA, *_ATTN, *_MOE, *_MLP)})
    if unknown:
        raise ValueError(f"{source}: layers_block_type has unknown block types {unknown}")
    hidden, vocab = r.int("hidden_size", minimum=1), r.int("vocab_size", minimum=1)
    heads = r.int("num_attention_heads", minimum=1)
    kv_heads = r.int("num_key_value_heads", heads, minimum=1)
    head_dim = r.int("head_dim", hidden // heads, minimum=1)
    if kv_heads > heads or heads % kv_heads:
        raise ValueError(f"{source}: num_key_value_heads={kv_heads} does not divide "
                         f"num_attention_heads={heads}")
    n = {kind: sum(b in names for b in blocks)
         for kind, names in (("mamba", _MAMBA), ("attn", _ATTN), ("moe", _MOE), ("mlp", _MLP))}
    # transformers' NemotronHForCausalLM declares no tied weights: the lm_head is its own matrix
    # whatever tie_word_embeddings says
    mlp_bias, tied = r.flag("mlp_bias"), False

    led = Ledger()
    led.matrix("embedding", vocab, hidden, linear=False)
    if not tied:
        led.matrix("lm_head", vocab, hidden, linear=False)
    led.vector("norms", hidden, len(blocks) + 1)
    # attention
    led.matrix("attention", heads * head_dim, hidden, n["attn"])
    led.matrix("attention", kv_heads * head_dim, hidden, 2 * n["attn"])
    led.matrix("attention", hidden, heads * head_dim, n["attn"])
    # Mamba-2
    m_heads, m_dim = r.int("mamba_num_heads", minimum=1), r.int("mamba_head_dim", minimum=1)
    groups, state = r.int("n_groups", 1, minimum=1), r.int("ssm_state_size", minimum=1)
    conv_k = r.int("conv_kernel", 4, minimum=1)
    inner = m_heads * m_dim
    conv_dim = inner + 2 * groups * state
    use_bias = r.flag("use_bias")
    led.matrix("mamba", inner + conv_dim + m_heads, hidden, n["mamba"], bias=use_bias)
    led.matrix("mamba", conv_dim, conv_k, n["mamba"], bias=r.flag("use_conv_bias"),
               linear=False)
    led.vector("mamba", 3 * m_heads + inner, n["mamba"])      # dt_bias, A_log, D, gated norm
    led.matrix("mamba", hidden, inner, n["mamba"], bias=use_bias)
    # dense MLP blocks (up, down)
    inter = r.int("intermediate_size", 0)
    led.matrix("dense_mlp", inter, hidden, n["mlp"], bias=mlp_bias)
    led.matrix("dense_mlp", hidden, inter, n["mlp"], bias=mlp_bias)
    # MoE blocks
    n_exp = r.int("n_routed_experts", minimum=1) if n["moe"] else 0
    top_k = r.int("num_experts_per_tok", 1, minimum=1)
    if n_exp and top_k > n_exp:
        raise ValueError(f"{source}: num_experts_per_tok: top_k={top_k} is larger than the "
                         f"number of experts {n_exp}")
    shared = 0
    if n["moe"]:
        e_inter = r.int("moe_intermediate_size", minimum=1)
        latent = r.int("moe_latent_size", None, minimum=1, nullable=True)
        width = latent or hidden
        led.matrix("router", n_exp, hidden, n["moe"], linear=False)
        for rows, cols in ((e_inter, width), (width, e_inter)):
            led.matrix("routed_experts", rows, cols, n["moe"] * n_exp, active=n["moe"] * top_k)
        s_inter = r.int("moe_shared_expert_intermediate_size", 0)
        if s_inter:
            shared = 1
            led.matrix("shared_experts", s_inter, hidden, n["moe"], bias=mlp_bias)
            led.matrix("shared_experts", hidden, s_inter, n["moe"], bias=mlp_bias)
        if latent:
            led.matrix("shared_experts", latent, hidden, n["moe"], bias=mlp_bias)
            led.matrix("shared_experts", hidden, latent, n["moe"], bias=mlp_bias)
    breakdown = {g: led.total(g) for g in GROUPS}
    formats = ("fp32", "bf16", *QUANT_FORMATS)
    total, active = led.total(), led.active()
    emb = breakdown["embedding"]
    kv = [g for g in (KVGroup("gqa", n["attn"], 2 * kv_heads * head_dim),
                      KVGroup("state", n["mamba"], 0, None,
                              inner * state + conv_dim * (conv_k - 1))) if g.layers]
    notes = notes + [f"nemotron_h: {len(blocks)} single-mixer blocks: {n['mamba']} Mamba-2, "
                     f"{n['attn']} attention, {n['moe']} MoE, {n['mlp']} MLP"]
    return PlanResult(
        model_type="nemotron_h", source=source, num_layers=len(blocks), num_moe_layers=n["moe"],
        num_experts=n_exp, top_k=top_k, num_shared_experts=shared, hidden_size=hidden,
        vocab_size=vocab, tie_word_embeddings=tied, total_params=total, active_params=active,
        active_params_no_embedding=active - (0 if tied else emb),
        expert_params=breakdown["routed_experts"],
        non_expert_params=total - breakdown["routed_experts"], embedding_params=emb,
        lm_head_params=breakdown["lm_head"] + (emb if tied else 0), mtp_params=0,
        breakdown=breakdown, weight_bytes={f: led.nbytes(f) for f in formats}, notes=notes,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=r.int("max_position_embeddings", None, nullable=True),
        exact=True,
        weight_bytes_by_part={g: {f: led.nbytes(f, g) for f in formats} for g in GROUPS
                              if breakdown[g]},
        kv_layers=kv)
