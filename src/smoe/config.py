"""Typed, validated configuration for smoe's components.

Every field is checked when the dataclass is built: a bad value raises ``ValueError`` naming the
field and what is allowed. Configs carry no device or dtype; those are the caller's choice.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "ROUTERS",
    "ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "MoEConfig",
    "ModelConfig",
    "PRESETS",
    "preset",
    "config_error",
]

#: Router names accepted by :class:`MoEConfig`. ``sparsemixer`` exists for Phi-3.5-MoE interop.
ROUTERS = (
    "softmax_topk",
    "topk_softmax",
    "noisy_topk",
    "switch",
    "expert_choice",
    "sigmoid_bias",
    "sparsemixer",
)
#: Gated activations need a gate and an up projection; the others only an up projection.
GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "swiglu_oai")
ACTIVATIONS = GATED_ACTIVATIONS + ("gelu", "gelu_tanh", "relu", "silu")
GROUP_SCORES = ("top2_sum", "max")


def config_error(name: str, value: Any, allowed: str) -> ValueError:
    """A uniform error for a bad config field: names the field, the value and what is allowed."""
    return ValueError(f"{name}={value!r} is invalid: {allowed}")


def check_known_fields(cls: type, data: dict[str, Any]) -> None:
    """Refuse keys that are not fields of the dataclass ``cls`` (a typo must not vanish)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise config_error(name, value, "must be a positive integer")


def _non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise config_error(name, value, "must be a non-negative integer")


def _finite_number(name: str, value: Any, *, minimum: float | None = None, strict: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise config_error(name, value, "must be a finite number")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        op = ">" if strict else ">="
        raise config_error(name, value, f"must be a number {op} {minimum}")


@dataclass
class MoEConfig:
    """One sparse mixture-of-experts layer.

    Sizes:
        hidden_size: model width D.
        expert_size: inner width F of one routed expert.
        num_experts: routed experts N.
        top_k: experts chosen per token K (for ``expert_choice``: the average, see below).
    Routing:
        router: one of :data:`ROUTERS`.
        norm_topk_prob: renormalise the K chosen weights to sum to 1 (Mixtral: yes; Qwen/OLMoE:
            config flag; DeepSeek-V3: yes). Used by ``softmax_topk``, ``sigmoid_bias``.
        norm_topk_eps: added to the sum of the K sigmoid scores before renormalising
            (``sigmoid_bias``; DeepSeek-V3: 1e-20, LFM2-MoE: 1e-6).
        routed_scaling_factor: multiplies the routed experts' weights (DeepSeek-V3: 2.5).
        router_bias: a learned bias on the router logits (gpt-oss).
        n_groups, topk_groups: group-limited routing (DeepSeek-V3): experts are split into
            ``n_groups`` groups and only the best ``topk_groups`` groups are searched.
        group_score: how a group is scored: ``top2_sum`` (DeepSeek-V3) or ``max`` (DeepSeek-V2).
        capacity_factor: ``None`` is dropless (default). Otherwise each expert takes at most
            ``ceil(capacity_factor * T * K / N)`` tokens; the rest are dropped by router priority.
            For ``expert_choice`` it is the paper's c (C = T * c / N); ``None`` means c = K.
        weights_on_input: multiply the router weight into the expert's input instead of its
            output: each chosen (token, expert) pair computes ``expert(w * x)`` (Llama 4; any
            top_k, as transformers runs it).
    Experts:
        activation: one of :data:`ACTIVATIONS`; gated ones use a fused gate/up projection.
        expert_bias: biases on the expert projections (gpt-oss).
        activation_alpha, activation_limit: the clamped SwiGLU of gpt-oss (``swiglu_oai``).
        num_shared_experts, shared_expert_size, shared_expert_gate: experts every token goes
            through (DeepSeek, Qwen2-MoE); ``shared_expert_size`` is the total inner width of the
            shared MLP (default ``num_shared_experts * expert_size``); the optional gate is a
            sigmoid of a learned projection (Qwen2-MoE).
    Losses and balancing:
        aux_loss_coef: Switch/GShard load-balancing loss weight (also weights the noisy_topk
            importance and load losses).
        z_loss_coef: router z-loss weight (ST-MoE).
        seq_aux_loss_coef: DeepSeek-V3 sequence-wise balance loss weight.
        bias_update_rate: gamma of auxiliary-loss-free balancing (``sigmoid_bias``).
    """

    hidden_size: int
    expert_size: int
    num_experts: int
    top_k: int = 2
    router: str = "softmax_topk"
    activation: str = "swiglu"
    expert_bias: bool = False
    router_bias: bool = False
    capacity_factor: float | None = None
    num_shared_experts: int = 0
    shared_expert_size: int | None = None
    shared_expert_gate: bool = False
    norm_topk_prob: bool = True
    norm_topk_eps: float = 1e-20
    routed_scaling_factor: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    group_score: str = "top2_sum"
    weights_on_input: bool = False
    activation_alpha: float = 1.702
    activation_limit: float = 7.0
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    seq_aux_loss_coef: float = 0.0
    bias_update_rate: float = 1e-3
    sparsemixer_jitter_eps: float = 0.01
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _positive_int("hidden_size", self.hidden_size)
        _positive_int("expert_size", self.expert_size)
        _positive_int("num_experts", self.num_experts)
        _positive_int("top_k", self.top_k)
        if self.router not in ROUTERS:
            raise config_error("router", self.router, f"must be one of {', '.join(ROUTERS)}")
        if self.activation not in ACTIVATIONS:
            raise config_error("activation", self.activation,
                               f"must be one of {', '.join(ACTIVATIONS)}")
        if self.top_k > self.num_experts:
            raise config_error("top_k", self.top_k,
                               f"must be <= num_experts ({self.num_experts})")
        if self.router == "switch" and self.top_k != 1:
            raise config_error("top_k", self.top_k, "the switch router is top-1: use top_k=1")
        if self.router == "sparsemixer" and self.top_k != 2:
            raise config_error("top_k", self.top_k, "the sparsemixer router is top-2: use top_k=2")
        if self.capacity_factor is not None:
            _finite_number("capacity_factor", self.capacity_factor, minimum=0.0, strict=True)
        for name in ("expert_bias", "router_bias", "shared_expert_gate", "norm_topk_prob",
                     "weights_on_input"):
            if not isinstance(getattr(self, name), bool):
                raise config_error(name, getattr(self, name), "must be True or False")
        _non_negative_int("num_shared_experts", self.num_shared_experts)
        if self.shared_expert_size is not None:
            _positive_int("shared_expert_size", self.shared_expert_size)
            if self.num_shared_experts == 0:
                raise config_error("shared_expert_size", self.shared_expert_size,
                                   "needs num_shared_experts >= 1")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise config_error("shared_expert_gate", True, "needs num_shared_experts >= 1")
        _finite_number("norm_topk_eps", self.norm_topk_eps, minimum=0.0)
        _finite_number("routed_scaling_factor", self.routed_scaling_factor, minimum=0.0,
                       strict=True)
        _positive_int("n_groups", self.n_groups)
        _positive_int("topk_groups", self.topk_groups)
        if self.num_experts % self.n_groups:
            raise config_error("n_groups", self.n_groups,
                               f"must divide num_experts ({self.num_experts})")
        if self.topk_groups > self.n_groups:
            raise config_error("topk_groups", self.topk_groups,
                               f"must be <= n_groups ({self.n_groups})")
        if self.n_groups > 1:
            if self.router not in ("softmax_topk", "sigmoid_bias"):
                raise config_error("n_groups", self.n_groups,
                                   "group-limited routing needs router softmax_topk or sigmoid_bias")
            if self.top_k > self.topk_groups * (self.num_experts // self.n_groups):
                raise config_error("top_k", self.top_k,
                                   "must be <= topk_groups * experts per group")
        if self.group_score not in GROUP_SCORES:
            raise config_error("group_score", self.group_score,
                               f"must be one of {', '.join(GROUP_SCORES)}")
        _finite_number("activation_alpha", self.activation_alpha)
        _finite_number("activation_limit", self.activation_limit, minimum=0.0, strict=True)
        for name in ("aux_loss_coef", "z_loss_coef", "seq_aux_loss_coef", "bias_update_rate"):
            _finite_number(name, getattr(self, name), minimum=0.0)
        _finite_number("sparsemixer_jitter_eps", self.sparsemixer_jitter_eps, minimum=0.0)
        _finite_number("init_std", self.init_std, minimum=0.0, strict=True)

    # -- derived values -------------------------------------------------------------------
    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def shared_size(self) -> int:
        """Total inner width of the shared-expert MLP (0 when there is none)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_expert_size or self.num_shared_experts * self.expert_size

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None and self.router != "expert_choice"

    def capacity(self, num_tokens: int) -> int:
        """Tokens one expert may take for a batch of ``num_tokens`` (capacity modes only)."""
        if self.router == "expert_choice":
            c = self.capacity_factor if self.capacity_factor is not None else self.top_k
            return min(num_tokens, math.ceil(num_tokens * c / self.num_experts))
        if self.capacity_factor is None:
            return num_tokens
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def replace(self, **changes: Any) -> "MoEConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoEConfig":
        check_known_fields(cls, data)
        return cls(**data)



@dataclass
class ModelConfig:
    """The SMoE decoder-only transformer language model (:class:`smoe.model.SMoETransformer`).

    Shape:
        vocab_size, hidden_size (D), num_layers (L), max_seq_len (longest sequence, also the
        length of a KV cache).
    Attention (pre-norm, rotary positions, no biases):
        num_heads, num_kv_heads: grouped-query attention; ``num_kv_heads`` must divide
            ``num_heads`` (equal: multi-head, 1: multi-query).
        head_dim: per-head width; ``None`` means ``hidden_size // num_heads``. Must be even (RoPE).
        rope_theta: RoPE base; inv_freq = 1 / theta^(arange(0, hd, 2) / hd).
        qk_norm: an RMSNorm over each head of q and k before RoPE (Qwen3).
    Feed-forward:
        ffn_size, ffn_activation: the inner width and activation of the dense FFN layers
            (needed whenever a layer is dense).
        moe: the MoE layer's config, or ``None`` for a dense model. ``moe.hidden_size`` must be
            ``hidden_size``.
        moe_every, first_dense_layers: layer i (0-based) is MoE when
            ``i >= first_dense_layers and (i + 1) % moe_every == 0`` -- the Qwen-MoE rule
            (``decoder_sparse_step``, ``mlp_only_layers``) plus DeepSeek's
            ``first_k_dense_replace``; see :meth:`moe_layer_indices`.
    Rest:
        norm_eps: RMSNorm epsilon. tie_embeddings: the lm_head reuses the embedding matrix.
        init_std: std of the normal init of every weight in the model (this, not
            ``moe.init_std``, is what the model uses); residual out-projections get
            ``init_std / sqrt(2 * num_layers)`` (GPT-2).
        dropout: on attention probabilities and on each residual branch (training only).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_seq_len: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qk_norm: bool = False
    tie_embeddings: bool = False
    ffn_size: int | None = None
    ffn_activation: str = "swiglu"
    moe: MoEConfig | None = None
    moe_every: int = 1
    first_dense_layers: int = 0
    init_std: float = 0.02
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "max_seq_len", "moe_every"):
            _positive_int(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise config_error("num_kv_heads", self.num_kv_heads,
                               f"must divide num_heads ({self.num_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise config_error("num_heads", self.num_heads,
                                   f"must divide hidden_size ({self.hidden_size}), or set head_dim")
        else:
            _positive_int("head_dim", self.head_dim)
        if self.head_size % 2:
            raise config_error("head_dim", self.head_size, "must be even (rotary embedding)")
        _finite_number("rope_theta", self.rope_theta, minimum=0.0, strict=True)
        _finite_number("norm_eps", self.norm_eps, minimum=0.0, strict=True)
        for name in ("qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise config_error(name, getattr(self, name), "must be True or False")
        if self.ffn_size is not None:
            _positive_int("ffn_size", self.ffn_size)
        if self.ffn_activation not in ACTIVATIONS:
            raise config_error("ffn_activation", self.ffn_activation,
                               f"must be one of {', '.join(ACTIVATIONS)}")
        _non_negative_int("first_dense_layers", self.first_dense_layers)
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise config_error("moe", self.moe, "must be a MoEConfig or None")
            if self.moe.hidden_size != self.hidden_size:
                raise config_error("moe.hidden_size", self.moe.hidden_size,
                                   f"must equal hidden_size ({self.hidden_size})")
            if not self.moe_layer_indices():
                raise config_error("first_dense_layers", self.first_dense_layers,
                                   f"with moe_every={self.moe_every} and num_layers="
                                   f"{self.num_layers} no layer is MoE; set moe=None for a "
                                   "dense model")
        if self.ffn_size is None and len(self.moe_layer_indices()) < self.num_layers:
            raise config_error("ffn_size", None, "is needed: the model has dense FFN layers")
        _finite_number("init_std", self.init_std, minimum=0.0, strict=True)
        _finite_number("dropout", self.dropout, minimum=0.0)
        if self.dropout >= 1:
            raise config_error("dropout", self.dropout, "must be in [0, 1)")

    # -- derived values -------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        """The resolved per-head width: ``head_dim`` or ``hidden_size // num_heads``."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def is_moe_layer(self, i: int) -> bool:
        return (self.moe is not None and i >= self.first_dense_layers
                and (i + 1) % self.moe_every == 0)

    def moe_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    # -- parameter and compute counts -----------------------------------------------------
    def _counts(self) -> dict[str, int]:
        """Parameters by part, mirroring the modules of :mod:`smoe.model` (tests hold them
        equal)."""
        D, V, hs = self.hidden_size, self.vocab_size, self.head_size
        attn = D * hs * 2 * (self.num_heads + self.num_kv_heads)  # q, o; k, v
        attn += 2 * hs if self.qk_norm else 0
        dense = (3 if self.ffn_activation in GATED_ACTIVATIONS else 2) * D * (self.ffn_size or 0)
        per_expert = other_moe = 0
        if self.moe is not None:
            m, E = self.moe, self.moe.num_experts
            in_rows = 2 * m.expert_size if m.gated else m.expert_size
            per_expert = in_rows * D + D * m.expert_size
            if m.expert_bias:
                per_expert += in_rows + D
            other_moe = E * D + (E if m.router_bias else 0)  # router
            other_moe += E * D if m.router == "noisy_topk" else 0
            other_moe += (3 if m.gated else 2) * D * m.shared_size  # shared experts
            other_moe += D if m.shared_expert_gate else 0
        n_moe = len(self.moe_layer_indices())
        return {
            "embedding": V * D,
            "lm_head": 0 if self.tie_embeddings else V * D,
            "attention": self.num_layers * attn,
            "norms": (2 * self.num_layers + 1) * D,
            "dense_ffn": (self.num_layers - n_moe) * dense,
            "routed_experts": n_moe * (self.moe.num_experts if self.moe else 0) * per_expert,
            "active_routed_experts": n_moe * (self.moe.top_k if self.moe else 0) * per_expert,
            "routers_and_shared": n_moe * other_moe,
        }

    def num_params(self) -> int:
        """Total parameters (tied embeddings counted once)."""
        c = self._counts()
        return sum(v for k, v in c.items() if k != "active_routed_experts")

    def num_active_params(self, include_embedding: bool = True) -> int:
        """Parameters one token uses: everything but the N - K routed experts it skips per MoE
        layer. ``include_embedding=False`` drops the input-embedding table (a lookup, no FLOPs);
        with tied embeddings the matrix stays, since the lm_head still multiplies by it. Same
        convention as :mod:`smoe.plan`."""
        c = self._counts()
        active = self.num_params() - c["routed_experts"] + c["active_routed_experts"]
        if not include_embedding and not self.tie_embeddings:
            active -= c["embedding"]
        return active

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), ``6 * N + 12 * L * H * hd * S``.

        N = :meth:`num_active_params` without the input embedding (a lookup), with the lm_head
        (its matmul is real work); 2 FLOPs per weight per token forward, x3 with backward
        (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", arXiv 2001.08361,
        Table 1; Hoffmann et al. 2022, Chinchilla, arXiv 2203.15556, Appendix F). The attention
        term counts q.k^T and attn.v over all S = ``seq_len`` (default ``max_seq_len``) keys,
        2 * 2 * H * hd * S per layer forward, without halving for the causal mask (the PaLM /
        nanoGPT estimate). The router's E logits are in N; dispatch and softmax are not counted.
        """
        S = self.max_seq_len if seq_len is None else seq_len
        attn = 12 * self.num_layers * self.num_heads * self.head_size * S
        return 6 * self.num_active_params(include_embedding=False) + attn

    # -- (de)serialisation ----------------------------------------------------------------
    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``moe`` becomes a nested dict (or None)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        check_known_fields(cls, data)
        data = dict(data)
        if isinstance(data.get("moe"), dict):
            data["moe"] = MoEConfig.from_dict(data["moe"])
        return cls(**data)


# -- presets ----------------------------------------------------------------------------------
# Each family has three members: "-moe" (N experts, top-K), "-dense" (a dense FFN as wide as the
# K active experts: the same active parameters and FLOPs per token) and "-dense-wide" (a dense
# FFN as wide as all N experts: about the same total parameters).
#: smoe.data's ByteTokenizer: ids 0-255 are the bytes, 256 is eos. For a BPE, pass
#: ``preset(name, vocab_size=tokenizer.vocab_size)``.
BYTE_VOCAB_SIZE = 257


def _family(kind: str, *, hidden: int, layers: int, heads: int, kv_heads: int, expert: int,
            experts: int, top_k: int, seq: int) -> ModelConfig:
    width = {"moe": top_k * expert, "dense": top_k * expert, "dense-wide": experts * expert}[kind]
    moe = None
    if kind == "moe":
        moe = MoEConfig(hidden_size=hidden, expert_size=expert, num_experts=experts, top_k=top_k,
                        router="softmax_topk", norm_topk_prob=True)
    return ModelConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=hidden, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, max_seq_len=seq, ffn_size=width,
                       moe=moe)


_TINY = dict(hidden=128, layers=4, heads=4, kv_heads=2, expert=256, experts=8, top_k=2, seq=256)
_SMALL = dict(hidden=256, layers=6, heads=4, kv_heads=2, expert=384, experts=8, top_k=2, seq=512)

# The capacity experiment's models (benchmarks/capacity.py): small enough that ~15M training
# tokens put the dense baseline far past its data-limited regime, so extra capacity can show.
_MICRO = dict(hidden=64, layers=4, heads=4, kv_heads=2, expert=128, experts=8, top_k=2, seq=128)

#: name -> function returning a fresh :class:`ModelConfig`.
PRESETS: dict[str, Callable[[], ModelConfig]] = {
    f"{size}-{kind}": functools.partial(_family, kind, **dims)
    for size, dims in (("tiny", _TINY), ("small", _SMALL), ("micro", _MICRO))
    for kind in ("moe", "dense", "dense-wide")
}
#: 32 experts of the same size and top-2: the same active compute as micro-moe, 4x its experts.
PRESETS["micro-moe32"] = functools.partial(_family, "moe", **dict(_MICRO, experts=32))


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset's config, with ``overrides`` applied through :meth:`ModelConfig.replace`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: known presets are {', '.join(PRESETS)}")
    config = PRESETS[name]()
    return config.replace(**overrides) if overrides else config
