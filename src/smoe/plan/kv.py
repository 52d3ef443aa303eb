"""What decoding keeps per sequence: the KV cache per attention type, and the fixed state of
linear-attention and Mamba layers.

Per layer and token, in elements (times the cache dtype's bytes):

* GQA / MHA / MQA: ``2 * kv_heads * head_dim`` (keys and values; ``v_head_dim`` when it differs).
* MLA (DeepSeek-V2/V3; DeepSeek-AI 2024, arXiv 2405.04434, sec. 2.1): the compressed latent
  ``kv_lora_rank`` plus the decoupled RoPE key ``qk_rope_head_dim`` -- what inference engines
  cache with the up-projections absorbed (576 per layer and token for V3, against 40,960 for its
  128 decompressed heads, which is what transformers' eager implementation caches). DeepSeek's
  sparse attention (V3.2, GLM-DSA) adds its indexer's key of ``index_head_dim``.
* Sliding-window (and Llama 4's chunked) layers: as GQA, but at most ``window`` tokens are kept.
* Linear-attention and Mamba layers keep a state of fixed size whatever the context:
  Mamba ``d_inner * (d_state + d_conv)``; gated DeltaNet / KDA / lightning attention
  ``heads * d_k * d_v`` plus the short-convolution window. Counted at the cache dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from smoe.plan.count import Reader, uses_mla
from smoe.plan.families import Family

__all__ = ["KV_DTYPES", "KVGroup", "kv_bytes", "kv_bytes_per_token", "kv_groups"]

#: Bytes per cached element.
KV_DTYPES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class KVGroup:
    """``layers`` layers of one kind: ``per_token`` cached elements per token each, at most
    ``window`` tokens (``None``: the whole context), and ``state`` elements per sequence."""

    kind: str  # "gqa" | "mla" | "sliding" | "state"
    layers: int
    per_token: int
    window: int | None = None
    state: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _linear_state(r: Reader, heads: int, head_dim: int, hidden: int) -> int:
    """Fixed per-sequence state of one linear-attention layer (see the module docstring)."""
    if r.get("linear_num_value_heads", None) is not None:  # Qwen3-Next / Qwen3.5 gated DeltaNet
        hv, hk = r.int("linear_num_value_heads"), r.int("linear_num_key_heads")
        dk, dv = r.int("linear_key_head_dim"), r.int("linear_value_head_dim")
        conv = r.int("linear_conv_kernel_dim", 4)
        return hv * dk * dv + (2 * hk * dk + hv * dv) * (conv - 1)
    if r.get("linear_num_heads", None) is not None:  # Kimi KDA, Bailing
        h, d = r.int("linear_num_heads"), r.int("linear_head_dim")
        return h * d * d + 3 * h * d * (r.int("linear_conv_kernel_dim", 4) - 1)
    if r.get("mamba_n_heads", None) is not None:  # Mamba-2 (GraniteMoE-hybrid)
        h, d, n = r.int("mamba_n_heads"), r.int("mamba_d_head"), r.int("mamba_d_state")
        groups = r.int("mamba_n_groups", 1)
        return h * d * n + (h * d + 2 * groups * n) * (r.int("mamba_d_conv", 4) - 1)
    return heads * head_dim * head_dim  # lightning attention (MiniMax): one d x d per head


def kv_groups(r: Reader, fam: Family, *, n_layers: int, n_attn: int, hidden: int, heads: int,
              kv_heads: int, head_dim: int) -> list[KVGroup]:
    """The decoder's layers grouped by what they cache (see the module docstring)."""
    if uses_mla(r, fam):
        per = r.int("kv_lora_rank") + r.int("qk_rope_head_dim")
        per += r.int("index_head_dim", 0) if "indexed_attention" in (r.get("layer_types", None)
                                                                      or []) else 0
        kinds = r.get("layer_types", None)
        n_lin = sum(t == "linear_attention" for t in kinds) if isinstance(kinds, list) else 0
        out = [KVGroup("mla", n_layers - n_lin, per)]
        if n_lin:
            out.append(KVGroup("state", n_lin, 0, None, _linear_state(r, heads, head_dim, hidden)))
        return out
    v_dim = r.int("v_head_dim", head_dim) if fam.attention == "auto" else head_dim
    per_gqa = kv_heads * (head_dim + v_dim)
    if fam.mamba:  # Jamba: attention on n_attn layers, Mamba on the rest
        inner = r.int("mamba_expand") * hidden
        state = inner * (r.int("mamba_d_state") + r.int("mamba_d_conv"))
        return [g for g in (KVGroup("gqa", n_attn, per_gqa),
                            KVGroup("state", n_layers - n_attn, 0, None, state)) if g.layers]
    window = r.get("sliding_window", None)
    window = window if isinstance(window, int) and not isinstance(window, bool) else None
    chunk = r.get("attention_chunk_size", None)
    kinds = r.get("layer_types", None)
    if isinstance(chunk, int) and (not isinstance(kinds, list) or len(kinds) != n_layers):
        # Llama 4: RoPE layers attend within chunks, every no_rope_layer_interval-th is global
        rope = r.get("no_rope_layers", None)
        if not isinstance(rope, list) or len(rope) != n_layers:
            every = r.int("no_rope_layer_interval", 4, minimum=1)
            rope = [int((i + 1) % every != 0) for i in range(n_layers)]
        kinds = ["chunked_attention" if x else "full_attention" for x in rope]
    if not isinstance(kinds, list) or len(kinds) != n_layers:
        if window and fam.sliding_all:  # Mistral-style: every layer slides
            return [KVGroup("sliding", n_layers, per_gqa, window)]
        return [KVGroup("gqa", n_layers, per_gqa)]
    counts: dict[str, int] = {}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    out = []
    for kind, n in counts.items():
        if kind == "sliding_attention" and window:
            out.append(KVGroup("sliding", n, per_gqa, window))
        elif kind == "chunked_attention" and isinstance(chunk, int):
            out.append(KVGroup("sliding", n, per_gqa, chunk))
        elif kind in ("linear_attention", "mamba", "conv"):
            out.append(KVGroup("state", n, 0, None, _linear_state(r, heads, head_dim, hidden)))
        else:
            out.append(KVGroup("gqa", n, per_gqa))
    return out


def kv_bytes_per_token(groups: list[KVGroup], dtype_bytes: float) -> float:
    """Bytes one more token adds to the cache (while every window is still filling)."""
    return sum(g.layers * g.per_token for g in groups) * dtype_bytes


def kv_bytes(groups: list[KVGroup], dtype_bytes: float, context: int, batch: int = 1) -> float:
    """Bytes of the cache (and fixed states) for ``batch`` sequences of ``context`` tokens."""
    per_seq = sum(g.layers * (g.per_token * min(context, g.window or context) + g.state)
                  for g in groups)
    return per_seq * dtype_bytes * batch
