"""The counting machinery: a ledger of tensor shapes, a typed config reader, the rules for which
layers are MoE layers, and the per-block counts (attention, MLA, Mamba, MLP, MoE)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from smoe.plan.families import QUANT_FORMATS, QUANTIZED_GROUPS, Family

__all__ = ["MOE_LAYER_RULES", "Ledger", "Reader", "add_attention", "add_gated_mlp", "add_mamba",
           "add_moe"]


@dataclass
class _Item:
    """``count`` copies of a ``rows x cols`` tensor, ``active`` of them used per token."""

    group: str
    rows: int
    cols: int
    count: int
    active: int
    linear: bool  # a weight matrix that the quantized formats quantize

    @property
    def numel(self) -> int:
        return self.rows * self.cols


class Ledger:
    """Every parameter tensor of the model as (group, shape, copies, copies used per token)."""

    def __init__(self) -> None:
        self.items: list[_Item] = []

    def matrix(self, group: str, out: int, inp: int, n: int = 1, *, bias: bool = False,
               active: int | None = None, linear: bool = True) -> None:
        if n:
            act = n if active is None else active
            self.items.append(_Item(group, out, inp, n, act, linear and group in QUANTIZED_GROUPS))
            if bias:
                self.items.append(_Item(group, 1, out, n, act, False))

    def vector(self, group: str, size: int, n: int = 1, active: int | None = None) -> None:
        self.matrix(group, 1, size, n, active=active, linear=False)

    def total(self, group: str | None = None) -> int:
        return sum(i.numel * i.count for i in self.items if group in (None, i.group))

    def active(self) -> int:
        return sum(i.numel * i.active for i in self.items)

    def nbytes(self, fmt: str, group: str | None = None) -> int:
        if fmt in ("fp32", "bf16"):
            return self.total(group) * (4 if fmt == "fp32" else 2)
        q = QUANT_FORMATS[fmt]
        out = 0
        for i in self.items:
            if group not in (None, i.group):
                continue
            if not i.linear:
                out += 2 * i.numel * i.count
                continue
            scales = i.rows * (1 if q.group_size is None else math.ceil(i.cols / q.group_size))
            out += (math.ceil(i.numel * q.bits / 8) + scales * q.scale_bytes) * i.count
        return out


_MISSING = object()


class Reader:
    """Typed access to the config dict; every error names the source path and the field."""

    def __init__(self, cfg: Mapping[str, Any], model_type: str, family: Family, source: str):
        self.cfg, self.model_type, self.family, self.source = cfg, model_type, family, source

    def _raw(self, key: str) -> Any:
        node: Any = self.cfg
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return _MISSING
            node = node[part]
        return node

    def get(self, keys: tuple[str, ...] | str, default: Any = _MISSING, *, nullable: bool = False):
        keys = (keys,) if isinstance(keys, str) else keys
        for key in keys:
            value = self._raw(key)
            if value is not _MISSING and (value is not None or nullable):
                return value
        for key in keys:
            if key in self.family.defaults:
                return self.family.defaults[key]
        if default is not _MISSING:
            return default
        names = " / ".join(repr(k) for k in keys) or "(none)"
        raise ValueError(f"{self.source}: missing required field {names} "
                         f"for model_type {self.model_type!r}")

    def int(self, keys: tuple[str, ...] | str, default: Any = _MISSING, minimum: int = 0,
            nullable: bool = False) -> int | None:
        value = self.get(keys, default, nullable=nullable)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            key = keys if isinstance(keys, str) else keys[0]
            raise ValueError(f"{self.source}: field {key!r} must be an integer >= {minimum}, "
                             f"got {value!r}")
        return value

    def flag(self, spec: str | bool) -> bool:
        return spec if isinstance(spec, bool) else bool(self.get(spec, False))


def _every(r: Reader, n_layers: int) -> list[bool]:
    return [True] * n_layers


def _qwen(r: Reader, n_layers: int) -> list[bool]:
    step = r.int("decoder_sparse_step", minimum=1)
    dense = set(r.get("mlp_only_layers", []) or [])
    return [i not in dense and (i + 1) % step == 0 for i in range(n_layers)]


def _deepseek(r: Reader, n_layers: int) -> list[bool]:
    # transformers ignores ``moe_layer_freq``; DeepSeek's own code honours it (1 in every release)
    first, freq = r.int("first_k_dense_replace"), r.int("moe_layer_freq", 1, minimum=1)
    return [i >= first and i % freq == 0 for i in range(n_layers)]


def _llama4(r: Reader, n_layers: int) -> list[bool]:
    explicit = r.get("moe_layers", None)
    if explicit is not None:
        return [i in set(explicit) for i in range(n_layers)]
    step = r.int("interleave_moe_layer_step", minimum=1)
    return [(i + 1) % step == 0 for i in range(n_layers)]


def _auto(r: Reader, n_layers: int) -> list[bool]:
    """The generic rule: ``mlp_layer_types`` when given, else the first dense layers
    (``first_k_dense_replace`` / ``num_dense_layers``), every ``decoder_sparse_step``-th layer,
    minus ``mlp_only_layers``."""
    types = r.get("mlp_layer_types", None)
    if isinstance(types, list) and len(types) == n_layers:
        return [t != "dense" for t in types]
    first = r.int(("first_k_dense_replace", "num_dense_layers"), 0)
    step = r.int("decoder_sparse_step", 1, minimum=1)
    dense = set(r.get("mlp_only_layers", []) or [])
    return [i >= first and i not in dense and (i + 1) % step == 0 for i in range(n_layers)]


def _jamba(r: Reader, n_layers: int) -> list[bool]:
    period, offset = r.int("expert_layer_period", minimum=1), r.int("expert_layer_offset")
    return [i % period == offset for i in range(n_layers)]


#: ``Family.moe_layers`` -> which decoder layers hold a MoE block (the others a dense MLP).
MOE_LAYER_RULES = {"all": _every, "qwen": _qwen, "deepseek": _deepseek, "llama4": _llama4,
                   "jamba": _jamba, "auto": _auto}


# --- per-block counts ---------------------------------------------------------------------------


def add_gated_mlp(led: Ledger, group: str, hidden: int, inter: int, n: int, bias: bool,
                  gated: bool = True) -> None:
    led.matrix(group, (2 if gated else 1) * inter, hidden, n, bias=bias)  # gate_proj and up_proj
    led.matrix(group, hidden, inter, n, bias=bias)      # down_proj


def uses_mla(r: Reader, fam: Family) -> bool:
    """DeepSeek's multi-head latent attention (``auto``: when the config has ``kv_lora_rank``)."""
    if fam.attention == "auto":
        return r.get("kv_lora_rank", None) is not None
    return fam.attention == "mla"


def add_attention(led: Ledger, r: Reader, fam: Family, n: int, hidden: int, heads: int,
                  kv_heads: int, head_dim: int) -> None:
    qkv_bias, o_bias = r.flag(fam.qkv_bias), r.flag(fam.o_bias)
    if uses_mla(r, fam):  # DeepSeek multi-head latent attention
        q_lora = r.int("q_lora_rank", None, minimum=1, nullable=True)
        kv_lora = r.int("kv_lora_rank", minimum=1)
        nope, rope = r.int("qk_nope_head_dim"), r.int("qk_rope_head_dim")
        v_dim = r.int("v_head_dim", minimum=1)
        if q_lora is None:
            led.matrix("attention", heads * (nope + rope), hidden, n)             # q_proj
        else:
            led.matrix("attention", q_lora, hidden, n, bias=qkv_bias)             # q_a_proj
            led.vector("attention", q_lora, n)                                    # q_a_layernorm
            led.matrix("attention", heads * (nope + rope), q_lora, n)             # q_b_proj
        led.matrix("attention", kv_lora + rope, hidden, n, bias=qkv_bias)         # kv_a_proj
        led.vector("attention", kv_lora, n)                                       # kv_a_layernorm
        led.matrix("attention", heads * (nope + v_dim), kv_lora, n)               # kv_b_proj
        led.matrix("attention", hidden, heads * v_dim, n, bias=o_bias)            # o_proj
        return
    led.matrix("attention", heads * head_dim, hidden, n, bias=qkv_bias)           # q_proj
    led.matrix("attention", kv_heads * head_dim, hidden, 2 * n, bias=qkv_bias)    # k_proj, v_proj
    led.matrix("attention", hidden, heads * head_dim, n, bias=o_bias)             # o_proj
    qk_norm = fam.qk_norm
    if qk_norm.startswith("flag:"):
        qk_norm = "per_head" if r.flag(qk_norm[5:]) else "none"
    if qk_norm == "per_head":
        led.vector("attention", 2 * head_dim, n)
    elif qk_norm == "olmoe":  # over the full projected width (k with hidden // heads)
        led.vector("attention", hidden + hidden // heads * kv_heads, n)
    if fam.sinks:
        led.vector("attention", heads, n)


def add_mamba(led: Ledger, r: Reader, n: int, hidden: int) -> None:
    inner = r.int("mamba_expand", minimum=1) * hidden
    state, conv = r.int("mamba_d_state", minimum=1), r.int("mamba_d_conv", minimum=1)
    rank = r.get("mamba_dt_rank")
    rank = math.ceil(hidden / 16) if rank == "auto" else r.int("mamba_dt_rank", minimum=1)
    proj_bias = r.flag("mamba_proj_bias")
    led.matrix("mamba", 2 * inner, hidden, n, bias=proj_bias)                     # in_proj
    led.matrix("mamba", inner, conv, n, bias=r.flag("mamba_conv_bias"), linear=False)  # conv1d
    led.matrix("mamba", rank + 2 * state, inner, n)                               # x_proj
    led.matrix("mamba", inner, rank, n, bias=True)                                # dt_proj
    led.matrix("mamba", inner, state, n, linear=False)                            # A_log
    led.vector("mamba", inner, n)                                                 # D
    led.matrix("mamba", hidden, inner, n, bias=proj_bias)                         # out_proj
    led.vector("mamba", rank + 2 * state, n)                                      # dt/B/C norms


def add_moe(led: Ledger, r: Reader, fam: Family, n: int, hidden: int, n_exp: int,
            top_k: int) -> int:
    """Add ``n`` MoE blocks; returns the number of shared experts per block."""
    inter = r.int(fam.expert_ffn, minimum=1)
    gated = r.flag(fam.gated)
    led.matrix("router", n_exp, hidden, n, bias=r.flag(fam.router_bias), linear=False)
    for rows, cols in (((2 if gated else 1) * inter, hidden), (hidden, inter)):  # gate+up, down
        led.matrix("routed_experts", rows, cols, n * n_exp, bias=r.flag(fam.expert_bias), active=n * top_k)
    if fam.shared == "deepseek":
        n_shared = r.int("n_shared_experts")
        add_gated_mlp(led, "shared_experts", hidden, n_shared * inter, n, r.flag(fam.mlp_bias))
        return n_shared
    if fam.shared == "qwen2":
        shared = r.int("shared_expert_intermediate_size")
        add_gated_mlp(led, "shared_experts", hidden, shared, n, False)
        led.matrix("router", 1, hidden, n, linear=False)  # shared_expert_gate
        return 1
    if fam.shared == "llama4":
        add_gated_mlp(led, "shared_experts", hidden, inter, n, False)
        return 1
    if fam.shared == "sized":  # smoe: the total inner width of the shared experts
        width = r.int("shared_expert_intermediate_size", 0)
        if width:
            add_gated_mlp(led, "shared_experts", hidden, width, n, False, gated)
            if r.flag("shared_expert_gate"):
                led.matrix("router", 1, hidden, n, linear=False)
        return r.int("n_shared_experts", 1 if width else 0)
    if fam.shared == "auto":
        count = r.int(("n_shared_experts", "num_shared_experts"), 0)
        width = count * inter or r.int(("shared_expert_intermediate_size",
                                        "shared_intermediate_size"), 0)
        if width:
            add_gated_mlp(led, "shared_experts", hidden, width, n, False)
        return count or int(width > 0)
    return 0


# --- human output -------------------------------------------------------------------------------
