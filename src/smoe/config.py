"""Typed, validated configuration for smoe's components.

Every field is checked when the dataclass is built: a bad value raises ``ValueError`` naming the
field and what is allowed. Configs carry no device or dtype; those are the caller's choice.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ROUTERS",
    "ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "MoEConfig",
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
        routed_scaling_factor: multiplies the routed experts' weights (DeepSeek-V3: 2.5).
        router_bias: a learned bias on the router logits (gpt-oss).
        n_groups, topk_groups: group-limited routing (DeepSeek-V3): experts are split into
            ``n_groups`` groups and only the best ``topk_groups`` groups are searched.
        group_score: how a group is scored: ``top2_sum`` (DeepSeek-V3) or ``max`` (DeepSeek-V2).
        capacity_factor: ``None`` is dropless (default). Otherwise each expert takes at most
            ``ceil(capacity_factor * T * K / N)`` tokens; the rest are dropped by router priority.
            For ``expert_choice`` it is the paper's c (C = T * c / N); ``None`` means c = K.
        weights_on_input: multiply the router weight into the expert's input instead of its
            output (Llama 4, top-1).
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
        if self.weights_on_input and self.top_k != 1:
            raise config_error("weights_on_input", True, "is only exact with top_k=1")
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoEConfig field(s): {', '.join(unknown)}")
        return cls(**data)

