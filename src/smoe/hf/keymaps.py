"""Where each smoe parameter lives in a Hugging Face checkpoint, written as data.

One table per ``model_type`` (:data:`KEYMAPS`); each row is a :class:`KeyRule`::

    KeyRule(smoe="layers.{i}.ffn.experts.down_proj",
            hf=("model.layers.{i}.mlp.experts.{e}.down_proj.weight",),
            transform="experts", layers="moe")

reads: the smoe tensor ``layers.{i}.ffn.experts.down_proj`` of every MoE layer ``i`` is stored
as one HF tensor per expert ``e``. ``{i}`` is the layer index, ``{e}`` the expert index.

The transforms are named data too (:data:`TRANSFORMS`); each has an export direction (smoe ->
HF) and an import direction (HF -> smoe), both exact:

* ``copy``: the same tensor.
* ``experts``: smoe's stacked ``[E, ...]`` <-> one HF tensor per expert (``hf[0]`` with ``{e}``).
* ``experts_gate_up``: smoe's fused ``[E, 2F, D]`` (gate rows, then up rows) <-> two HF tensors
  per expert, ``hf[0]`` the gate ``[F, D]`` and ``hf[1]`` the up projection ``[F, D]``.
* ``times_two``: HF = 2 x smoe (exact: a power of two), with ``zeros_1xD`` on the HF gate.
  Qwen2-MoE always multiplies its shared expert by ``sigmoid(gate(x))``; a zero gate gives
  exactly 0.5, so an ungated smoe shared expert is written with its down projection doubled.
* ``zero_bias``: no smoe tensor; HF gets a zero bias as long as the smoe weight's rows
  (Qwen2-MoE's q/k/v biases). Import requires the bias to be zero.
* ``zeros_1xD``, ``zeros_0xD``, ``zeros_Dx0``: no smoe tensor; HF gets a zero tensor of that
  shape (D = hidden size): an unused gate, or a zero-width shared expert. Import requires the
  shape, and for ``strict`` rows the zeros; ``optional`` rows may also be absent.
* ``oai_gate_up`` / ``oai_gate_up_bias``: smoe's fused ``[E, 2F, D]`` (gate rows, then up
  rows) and its ``[E, 2F]`` bias <-> gpt-oss's ``[E, D, 2F]`` (input x output) and ``[E, 2F]``
  with gate and up interleaved (even columns gate, odd columns up).
* ``transposed``: smoe's ``[E, out, in]`` <-> gpt-oss's ``[E, in, out]`` (``down_proj``).
* ``zeros_E``, ``zeros_Ex2F``, ``zeros_ExD``: gpt-oss's router and expert biases for an smoe
  model without them (F = expert width, E = experts).
* ``no_sinks``: no smoe tensor; gpt-oss gets attention sinks of ``-inf`` (``[num_heads]``):
  ``exp(-inf) = 0`` adds nothing to the softmax denominator, so the attention is exactly
  smoe's. Import requires every sink to be ``-inf`` (a learned sink has no smoe counterpart).

Export writes the per-expert keys that ``save_pretrained`` of transformers 5.x writes on disk
(its conversion mapping turns them into the fused ``gate_up_proj`` / ``down_proj`` it holds in
memory, and older readers understand them too). Import also accepts the fused in-memory form
(``KeyRule.fused``), which some tools write.

Rows with ``when`` apply only when the model has that flag (:class:`KeyContext.flags`):
``untied``, ``qk_norm``, ``qkv_bias`` (Qwen2-MoE's zero q/k/v biases are stored), ``shared``
(shared experts, any), ``shared_gate``, ``shared_ungated``, ``no_shared``; gpt-oss:
``attn_bias`` (zero q/k/v/o biases are stored), ``expert_bias`` / ``no_expert_bias``,
``router_bias`` / ``no_router_bias``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["KeyRule", "KeyContext", "KEYMAPS", "IGNORED", "TRANSFORMS", "LAYER_SETS", "FLAGS",
           "to_hf", "from_hf"]

LAYER_SETS = ("none", "all", "moe", "dense")
FLAGS = ("untied", "qk_norm", "qkv_bias", "shared", "shared_gate", "shared_ungated", "no_shared",
         "attn_bias", "expert_bias", "no_expert_bias", "router_bias", "no_router_bias")


@dataclass(frozen=True)
class KeyRule:
    """One smoe tensor (pattern) and the HF tensor(s) it is stored as; see the module docstring.

    smoe: the smoe state-dict key (``None`` for HF-only tensors such as zero biases).
    hf: the HF key pattern(s). transform: a key of :data:`TRANSFORMS`. layers: which layer
    indices ``{i}`` runs over (:data:`LAYER_SETS`). when: a flag that must hold.
    fused: the HF key of the stacked in-memory form, also accepted on import.
    strict: for zero tensors, whether import requires them to be zero (not only the shape).
    keep_float32: never cast (a float32 buffer such as the selection bias).
    optional: import accepts the HF tensor's absence (zero-width shared experts).
    """

    smoe: str | None
    hf: tuple[str, ...]
    transform: str = "copy"
    layers: str = "none"
    when: str | None = None
    fused: str | None = None
    strict: bool = True
    keep_float32: bool = False
    optional: bool = False

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform={self.transform!r} is invalid: must be one of "
                             f"{', '.join(TRANSFORMS)}")
        if self.layers not in LAYER_SETS:
            raise ValueError(f"layers={self.layers!r} is invalid: must be one of "
                             f"{', '.join(LAYER_SETS)}")
        if self.when is not None and self.when not in FLAGS:
            raise ValueError(f"when={self.when!r} is invalid: must be one of {', '.join(FLAGS)}")


@dataclass(frozen=True)
class KeyContext:
    """What a table needs to know about one model: its layers, experts, widths, heads and
    flags."""

    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    hidden_size: int
    flags: frozenset[str] = field(default_factory=frozenset)
    expert_size: int = 0
    num_heads: int = 0

    def layer_indices(self, which: str) -> tuple[int, ...]:
        if which == "none":
            return (-1,)
        if which == "all":
            return tuple(range(self.num_layers))
        if which == "moe":
            return self.moe_layers
        return tuple(i for i in range(self.num_layers) if i not in self.moe_layers)

    def applies(self, rule: KeyRule) -> bool:
        return rule.when is None or rule.when in self.flags


# -- transforms -------------------------------------------------------------------------------
# export(smoe_tensor or None, ctx, hf_keys) -> {hf key: tensor}
# import(get, ctx, hf_keys, rule) -> smoe tensor or None; ``get(key)`` reads an HF tensor.
Getter = Callable[[str], torch.Tensor]


def _copy_out(t, ctx, keys):
    return {keys[0]: t}


def _copy_in(get, ctx, keys, rule):
    return get(keys[0])


def _expert_keys(pattern: str, ctx: KeyContext) -> list[str]:
    return [pattern.replace("{e}", str(e)) for e in range(ctx.num_experts)]


def _experts_out(t, ctx, keys):
    return dict(zip(_expert_keys(keys[0], ctx), t.unbind(0)))


def _experts_in(get, ctx, keys, rule):
    return torch.stack([get(k) for k in _expert_keys(keys[0], ctx)])


def _gate_up_out(t, ctx, keys):
    gate, up = t.chunk(2, dim=1)
    out = dict(zip(_expert_keys(keys[0], ctx), gate.unbind(0)))
    out.update(zip(_expert_keys(keys[1], ctx), up.unbind(0)))
    return out


def _gate_up_in(get, ctx, keys, rule):
    gates = [get(k) for k in _expert_keys(keys[0], ctx)]
    ups = [get(k) for k in _expert_keys(keys[1], ctx)]
    return torch.stack([torch.cat((g, u), dim=0) for g, u in zip(gates, ups)])


def _times_two_out(t, ctx, keys):
    return {keys[0]: t * 2}


def _times_two_in(get, ctx, keys, rule):
    return get(keys[0]) / 2


def _zeros(shape_of: Callable[[torch.Tensor | None, KeyContext], tuple[int, ...]]):
    def out(t, ctx, keys):
        dtype = t.dtype if t is not None else torch.float32
        return {keys[0]: torch.zeros(shape_of(t, ctx), dtype=dtype)}

    def inp(get, ctx, keys, rule):
        x = get(keys[0])
        want = shape_of(None, ctx) if rule.smoe is None else None
        if want is not None and tuple(x.shape) != want:
            raise ValueError(f"{keys[0]} has shape {tuple(x.shape)}, expected {want}")
        if rule.strict and x.numel() and bool(x.ne(0).any()):
            raise ValueError(f"{keys[0]} is not zero: smoe has no such tensor, so only a zero "
                             "one can be imported exactly")
        return None

    return out, inp


def _oai_gate_up_out(t, ctx, keys):
    gate, up = t.chunk(2, dim=1)                               # [E, F, D] each
    E, F, D = gate.shape
    rows = torch.stack((gate, up), dim=2).reshape(E, 2 * F, D)  # rows g0 u0 g1 u1 ...
    return {keys[0]: rows.transpose(1, 2)}                     # [E, D, 2F]


def _oai_gate_up_in(get, ctx, keys, rule):
    rows = get(keys[0]).transpose(1, 2)                        # [E, 2F, D]
    return torch.cat((rows[:, 0::2], rows[:, 1::2]), dim=1)


def _oai_bias_out(t, ctx, keys):
    gate, up = t.chunk(2, dim=1)                               # [E, F] each
    return {keys[0]: torch.stack((gate, up), dim=2).reshape(t.shape)}


def _oai_bias_in(get, ctx, keys, rule):
    b = get(keys[0])
    return torch.cat((b[:, 0::2], b[:, 1::2]), dim=1)


def _transposed_out(t, ctx, keys):
    return {keys[0]: t.transpose(1, 2)}


def _transposed_in(get, ctx, keys, rule):
    return get(keys[0]).transpose(1, 2)


def _no_sinks_out(t, ctx, keys):
    return {keys[0]: torch.full((ctx.num_heads,), float("-inf"))}


def _no_sinks_in(get, ctx, keys, rule):
    x = get(keys[0])
    if tuple(x.shape) != (ctx.num_heads,):
        raise ValueError(f"{keys[0]} has shape {tuple(x.shape)}, expected ({ctx.num_heads},)")
    if not bool(torch.isneginf(x).all()):
        raise ValueError(f"{keys[0]} holds learned attention sinks: smoe's attention has no "
                         "sink logit, so only sinks of -inf (no sink) can be imported exactly")
    return None


_zero_bias = _zeros(lambda t, ctx: (t.shape[0],) if t is not None else None)
_zeros_E = _zeros(lambda t, ctx: (ctx.num_experts,))
_zeros_Ex2F = _zeros(lambda t, ctx: (ctx.num_experts, 2 * ctx.expert_size))
_zeros_ExD = _zeros(lambda t, ctx: (ctx.num_experts, ctx.hidden_size))
_zeros_1xD = _zeros(lambda t, ctx: (1, ctx.hidden_size))
_zeros_0xD = _zeros(lambda t, ctx: (0, ctx.hidden_size))
_zeros_Dx0 = _zeros(lambda t, ctx: (ctx.hidden_size, 0))

#: name -> (export, import); see the module docstring.
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (_copy_out, _copy_in),
    "experts": (_experts_out, _experts_in),
    "experts_gate_up": (_gate_up_out, _gate_up_in),
    "times_two": (_times_two_out, _times_two_in),
    "zero_bias": _zero_bias,
    "zeros_1xD": _zeros_1xD,
    "zeros_0xD": _zeros_0xD,
    "zeros_Dx0": _zeros_Dx0,
    "oai_gate_up": (_oai_gate_up_out, _oai_gate_up_in),
    "oai_gate_up_bias": (_oai_bias_out, _oai_bias_in),
    "transposed": (_transposed_out, _transposed_in),
    "zeros_E": _zeros_E,
    "zeros_Ex2F": _zeros_Ex2F,
    "zeros_ExD": _zeros_ExD,
    "no_sinks": (_no_sinks_out, _no_sinks_in),
}


# -- the tables -------------------------------------------------------------------------------
def _attention(bias: bool = False) -> tuple[KeyRule, ...]:
    rows = [
        KeyRule("embed.weight", ("model.embed_tokens.weight",)),
        KeyRule("norm.weight", ("model.norm.weight",)),
        KeyRule("lm_head.weight", ("lm_head.weight",), when="untied"),
        KeyRule("layers.{i}.attn_norm.weight", ("model.layers.{i}.input_layernorm.weight",),
                layers="all"),
        KeyRule("layers.{i}.ffn_norm.weight",
                ("model.layers.{i}.post_attention_layernorm.weight",), layers="all"),
    ]
    for p in ("q", "k", "v", "o"):
        rows.append(KeyRule(f"layers.{{i}}.attn.{p}_proj.weight",
                            (f"model.layers.{{i}}.self_attn.{p}_proj.weight",), layers="all"))
    for p in ("q", "k"):
        rows.append(KeyRule(f"layers.{{i}}.attn.{p}_norm.weight",
                            (f"model.layers.{{i}}.self_attn.{p}_norm.weight",), layers="all",
                            when="qk_norm"))
    if bias:  # Qwen2-MoE: q/k/v biases, zero
        for p in ("q", "k", "v"):
            rows.append(KeyRule(f"layers.{{i}}.attn.{p}_proj.weight",
                                (f"model.layers.{{i}}.self_attn.{p}_proj.bias",), "zero_bias",
                                layers="all", when="qkv_bias"))
    return tuple(rows)


def _mlp(smoe: str, hf: str, layers: str, when: str | None = None) -> tuple[KeyRule, ...]:
    """A gated MLP stored as gate/up/down Linear weights under the same names in both."""
    return tuple(KeyRule(f"{smoe}.{p}_proj.weight", (f"{hf}.{p}_proj.weight",), layers=layers,
                         when=when) for p in ("gate", "up", "down"))


_DENSE = _mlp("layers.{i}.ffn", "model.layers.{i}.mlp", "dense")


def _experts(block: str, gate: str, up: str, down: str) -> tuple[KeyRule, ...]:
    """Router and routed experts of an MoE block at ``model.layers.{i}.<block>``."""
    pre = f"model.layers.{{i}}.{block}"
    return (
        KeyRule("layers.{i}.ffn.router.weight", (f"{pre}.gate.weight",), layers="moe"),
        KeyRule("layers.{i}.ffn.experts.gate_up_proj",
                (f"{pre}.experts.{{e}}.{gate}.weight", f"{pre}.experts.{{e}}.{up}.weight"),
                "experts_gate_up", layers="moe", fused=f"{pre}.experts.gate_up_proj"),
        KeyRule("layers.{i}.ffn.experts.down_proj", (f"{pre}.experts.{{e}}.{down}.weight",),
                "experts", layers="moe", fused=f"{pre}.experts.down_proj"),
    )


def _zero_width(hf: str) -> tuple[KeyRule, ...]:
    """The empty gate/up/down weights of a shared MLP of width 0 (a family that always builds
    one, for a model that has none)."""
    return tuple(KeyRule(None, (f"{hf}.{p}_proj.weight",), t, layers="moe", when="no_shared",
                         optional=True)
                 for p, t in (("gate", "zeros_0xD"), ("up", "zeros_0xD"), ("down", "zeros_Dx0")))


_QWEN_EXPERTS = _experts("mlp", "gate_proj", "up_proj", "down_proj")


def _gpt_oss() -> tuple[KeyRule, ...]:
    """gpt-oss: zero q/k/v/o biases, sinks of -inf, a router with a bias, and experts stored
    input x output with gate/up interleaved and biases (zeros when the smoe model has none)."""
    attn = "model.layers.{i}.self_attn"
    rows = [KeyRule(f"layers.{{i}}.attn.{p}_proj.weight", (f"{attn}.{p}_proj.bias",),
                    "zero_bias", layers="all", when="attn_bias") for p in ("q", "k", "v", "o")]
    rows.append(KeyRule(None, (f"{attn}.sinks",), "no_sinks", layers="all"))
    mlp, ex = "model.layers.{i}.mlp", "layers.{i}.ffn"
    rows += [
        KeyRule(f"{ex}.router.weight", (f"{mlp}.router.weight",), layers="moe"),
        KeyRule(f"{ex}.router.bias", (f"{mlp}.router.bias",), layers="moe", when="router_bias"),
        KeyRule(None, (f"{mlp}.router.bias",), "zeros_E", layers="moe", when="no_router_bias"),
        KeyRule(f"{ex}.experts.gate_up_proj", (f"{mlp}.experts.gate_up_proj",), "oai_gate_up",
                layers="moe"),
        KeyRule(f"{ex}.experts.down_proj", (f"{mlp}.experts.down_proj",), "transposed",
                layers="moe"),
        KeyRule(f"{ex}.experts.gate_up_proj_bias", (f"{mlp}.experts.gate_up_proj_bias",),
                "oai_gate_up_bias", layers="moe", when="expert_bias"),
        KeyRule(f"{ex}.experts.down_proj_bias", (f"{mlp}.experts.down_proj_bias",),
                layers="moe", when="expert_bias"),
        KeyRule(None, (f"{mlp}.experts.gate_up_proj_bias",), "zeros_Ex2F", layers="moe",
                when="no_expert_bias"),
        KeyRule(None, (f"{mlp}.experts.down_proj_bias",), "zeros_ExD", layers="moe",
                when="no_expert_bias"),
    ]
    return tuple(rows)
_SHARED = "layers.{i}.ffn.shared_experts"
_QWEN2_SHARED = "model.layers.{i}.mlp.shared_expert"

#: model_type -> the rows of its table.
KEYMAPS: dict[str, tuple[KeyRule, ...]] = {
    "llama": _attention() + _DENSE,
    "qwen3": _attention() + _DENSE,
    "mixtral": _attention() + _experts("block_sparse_moe", "w1", "w3", "w2"),
    "qwen3_moe": _attention() + _DENSE + _QWEN_EXPERTS,
    "qwen2_moe": _attention(bias=True) + _DENSE + _QWEN_EXPERTS + (
        # gated shared expert: as is
        *_mlp(_SHARED, _QWEN2_SHARED, "moe", when="shared_gate"),
        KeyRule("layers.{i}.ffn.shared_expert_gate.weight",
                ("model.layers.{i}.mlp.shared_expert_gate.weight",), layers="moe",
                when="shared_gate"),
        # ungated shared expert: zero gate (sigmoid(0) = 0.5), down projection doubled
        *_mlp(_SHARED, _QWEN2_SHARED, "moe", when="shared_ungated")[:2],
        KeyRule(f"{_SHARED}.down_proj.weight", (f"{_QWEN2_SHARED}.down_proj.weight",),
                "times_two", layers="moe", when="shared_ungated"),
        KeyRule(None, ("model.layers.{i}.mlp.shared_expert_gate.weight",), "zeros_1xD",
                layers="moe", when="shared_ungated"),
        # no shared expert: a zero-width one (its output is exactly 0 whatever the gate)
        *_zero_width(_QWEN2_SHARED),
        KeyRule(None, ("model.layers.{i}.mlp.shared_expert_gate.weight",), "zeros_1xD",
                layers="moe", when="no_shared", strict=False, optional=True),
    ),
    "glm4_moe": _attention() + _DENSE + _QWEN_EXPERTS + (
        KeyRule("layers.{i}.ffn.router.expert_bias",
                ("model.layers.{i}.mlp.gate.e_score_correction_bias",), layers="moe",
                keep_float32=True),
        *_mlp(_SHARED, "model.layers.{i}.mlp.shared_experts", "moe", when="shared"),
        *_zero_width("model.layers.{i}.mlp.shared_experts"),
    ),
    "gpt_oss": _attention() + _gpt_oss(),
}

#: model_type -> regular expressions of HF tensors that import may skip: RoPE tables some
#: writers store, and GLM-4.5's multi-token-prediction layers (after the last decoder layer;
#: the causal LM never runs them). ``{L}`` is replaced by a pattern matching indices >= L.
IGNORED: dict[str, tuple[str, ...]] = {
    family: (r"\.rotary_emb\.inv_freq$",) for family in KEYMAPS
}
IGNORED["glm4_moe"] = IGNORED["glm4_moe"] + (r"^model\.layers\.{L}\.",)


def _layer_at_least(n: int) -> str:
    """A regular expression matching the decimal integers >= n."""
    s = str(n)
    alts = [rf"\d{{{len(s) + 1},}}"]  # more digits
    for k, ch in enumerate(s):
        d = int(ch)
        if d < 9:
            rest = len(s) - k - 1
            alts.append(re.escape(s[:k]) + f"[{d + 1}-9]" + (rf"\d{{{rest}}}" if rest else ""))
    alts.append(re.escape(s))
    return "(?:" + "|".join(alts) + ")"


def _expand(pattern: str, i: int) -> str:
    return pattern if i < 0 else pattern.replace("{i}", str(i))


def _rules(family: str, ctx: KeyContext) -> Iterator[tuple[KeyRule, int]]:
    if family not in KEYMAPS:
        raise ValueError(f"no key map for model_type {family!r}: known are "
                         f"{', '.join(KEYMAPS)}")
    for rule in KEYMAPS[family]:
        if ctx.applies(rule):
            for i in ctx.layer_indices(rule.layers):
                yield rule, i


# -- the engine -------------------------------------------------------------------------------
def to_hf(family: str, state: Mapping[str, torch.Tensor], ctx: KeyContext,
          dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) pairs of an smoe state dict, in table order, each a fresh contiguous
    tensor (cast to ``dtype`` if given, except ``keep_float32`` rows). Raises ``ValueError``
    naming any smoe tensor the table has no place for, before yielding anything."""
    used: set[str] = set()
    plan = []
    for rule, i in _rules(family, ctx):
        key = _expand(rule.smoe, i) if rule.smoe is not None else None
        if key is not None and key not in state:
            raise ValueError(f"the smoe state has no {key!r}, which the {family} table needs")
        if key is not None:
            used.add(key)
        plan.append((rule, i, key))
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"{len(left)} smoe tensor(s) have no place in the {family} format: "
                         f"{', '.join(left[:6])}{' ...' if len(left) > 6 else ''}")
    export = {name: fns[0] for name, fns in TRANSFORMS.items()}
    for rule, i, key in plan:
        t = state[key].detach().cpu() if key is not None else None
        keys = tuple(_expand(p, i) for p in rule.hf)
        for hf_key, value in export[rule.transform](t, ctx, keys).items():
            if dtype is not None and value.is_floating_point() and not rule.keep_float32:
                value = value.to(dtype)
            yield hf_key, value.contiguous().clone()


def from_hf(family: str, get: Getter, hf_keys: set[str] | frozenset[str], ctx: KeyContext,
            dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """The smoe state dict of an HF checkpoint whose tensors ``get(key)`` reads.

    Raises ``ValueError`` naming missing HF tensors and HF tensors the table does not know
    (other than the family's :data:`IGNORED` ones), so nothing is silently dropped."""
    state: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()

    def read(key: str) -> torch.Tensor:
        if key not in hf_keys:
            raise ValueError(f"the HF checkpoint has no tensor {key!r}")
        consumed.add(key)
        return get(key)

    for rule, i in _rules(family, ctx):
        keys = tuple(_expand(p, i) for p in rule.hf)
        fused = _expand(rule.fused, i) if rule.fused is not None else None
        try:
            if (fused is not None and fused in hf_keys
                    and keys[0].replace("{e}", "0") not in hf_keys):
                value = read(fused)  # the stacked in-memory layout, as smoe holds it
            elif rule.optional and not any(k in hf_keys for k in keys):
                continue
            else:
                value = TRANSFORMS[rule.transform][1](read, ctx, keys, rule)
        except (RuntimeError, IndexError) as e:  # tensors of the wrong rank or shape
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{keys[0].replace('{e}', '*')} does not have the shape the config "
                             f"implies ({reason})") from None
        if value is None or rule.smoe is None:
            continue
        if rule.keep_float32:
            value = value.to(torch.float32)
        elif dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[_expand(rule.smoe, i)] = value.contiguous()
    patterns = IGNORED.get(family, ())
    if "untied" not in ctx.flags:  # tied: transformers ignores a stored lm_head, and so do we
        patterns += (r"^lm_head\.weight$",)
    ignored = [re.compile(p.replace("{L}", _layer_at_least(ctx.num_layers))) for p in patterns]
    unknown = sorted(k for k in set(hf_keys) - consumed
                     if not any(p.search(k) for p in ignored))
    if unknown:
        raise ValueError(f"{len(unknown)} HF tensor(s) have no place in smoe's model "
                         f"({family} table): {', '.join(unknown[:6])}"
                         f"{' ...' if len(unknown) > 6 else ''}")
    return state
