"""Switch Transformers (Fedus, Zoph & Shazeer 2021, arXiv 2101.03961): the T5-style
encoder-decoder MoE, counted as transformers' ``SwitchTransformersForConditionalGeneration``
builds it (the tests hold the total equal).

Every ``sparse_step``-th layer (``i % step == 1``, or all when the step is 1) replaces its
feed-forward (``wi``, ``wo``; ReLU, not gated) by ``num_experts`` such experts and a bias-free
router; top-1 routing. The decoder adds cross-attention; the first layer of each stack holds the
relative-position bias. Decoding caches the decoder's self-attention keys and values (the
cross-attention cache over the encoder's output is not counted).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smoe.plan.count import Ledger, Reader
from smoe.plan.families import QUANT_FORMATS, Family
from smoe.plan.kv import KVGroup

__all__ = ["plan_switch"]


def _sparse(step: int, n: int) -> list[bool]:
    return [step > 0 and (i % step == 1 or step == 1) for i in range(n)]


def plan_switch(cfg: Mapping[str, Any], source: str, notes: list[str]):
    from smoe.plan.result import GROUPS, PlanResult

    r = Reader(cfg, "switch_transformers", Family(), source)
    d, d_ff, heads = r.int("d_model", minimum=1), r.int("d_ff", minimum=1), r.int("num_heads",
                                                                                    minimum=1)
    d_kv, vocab = r.int("d_kv", minimum=1), r.int("vocab_size", minimum=1)
    n_exp = r.int("num_experts", minimum=1)
    n_enc = r.int("num_layers", minimum=1)
    n_dec = r.int("num_decoder_layers", n_enc, minimum=1)
    buckets = r.int("relative_attention_num_buckets", 32, minimum=1)
    tied = bool(r.get("tie_word_embeddings", True))
    router_bias = bool(r.get("router_bias", False))

    def step(which: str, n: int) -> int:
        given = r.int(f"{which}_sparse_step", None, nullable=True)
        if given is not None:
            return given
        sparse = r.int(f"num_sparse_{which}_layers", 3)
        return n // sparse if sparse else n

    led = Ledger()
    inner = heads * d_kv
    led.matrix("embedding", vocab, d, linear=False)
    if not tied:
        led.matrix("lm_head", vocab, d, linear=False)
    n_moe = 0
    for stack, n, attn_blocks in (("encoder", n_enc, 1), ("decoder", n_dec, 2)):
        led.matrix("attention", buckets, heads, linear=False)           # relative bias, layer 0
        led.matrix("attention", inner, d, 4 * attn_blocks * n)          # q, k, v, o (+ cross)
        led.vector("norms", d, (attn_blocks + 1) * n + 1)               # + final norm
        sparse = _sparse(step(stack, n), n)
        n_sp = sum(sparse)
        n_moe += n_sp
        led.matrix("dense_mlp", d_ff, d, n - n_sp)
        led.matrix("dense_mlp", d, d_ff, n - n_sp)
        led.matrix("router", n_exp, d, n_sp, bias=router_bias, linear=False)
        led.matrix("routed_experts", d_ff, d, n_sp * n_exp, active=n_sp)
        led.matrix("routed_experts", d, d_ff, n_sp * n_exp, active=n_sp)
    notes = notes + ["switch_transformers: encoder-decoder; layers, MoE layers and the KV cache "
                     "count both stacks' layers and the decoder's self-attention"]
    breakdown = {g: led.total(g) for g in GROUPS}
    formats = ("fp32", "bf16", *QUANT_FORMATS)
    total, active = led.total(), led.active()
    emb = breakdown["embedding"]
    return PlanResult(
        model_type="switch_transformers", source=source, num_layers=n_enc + n_dec,
        num_moe_layers=n_moe, num_experts=n_exp, top_k=1, num_shared_experts=0, hidden_size=d,
        vocab_size=vocab, tie_word_embeddings=tied, total_params=total, active_params=active,
        active_params_no_embedding=active - (0 if tied else emb),
        expert_params=breakdown["routed_experts"],
        non_expert_params=total - breakdown["routed_experts"], embedding_params=emb,
        lm_head_params=breakdown["lm_head"] + (emb if tied else 0), mtp_params=0,
        breakdown=breakdown, weight_bytes={f: led.nbytes(f) for f in formats}, notes=notes,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=d_kv,
        max_position_embeddings=None, exact=True,
        weight_bytes_by_part={g: {f: led.nbytes(f, g) for f in formats} for g in GROUPS
                              if breakdown[g]},
        kv_layers=[KVGroup("gqa", n_dec, 2 * inner)])
