"""The sparse mixture-of-experts layer: router + dispatcher + experts (+ shared experts).

Legend: T tokens (all leading dims flattened), D hidden, E routed experts, K per token,
A kept (token, expert) assignments sorted by expert.

    route = router(x_TD)                                   # who goes where, float32
    out_TD, plan = dispatcher(x_TD, route, experts, ...)   # plan, permute, experts, combine
    out_TD += shared_experts(x_TD)

Each component is replaced after build without touching this forward: ``layer.experts`` (any
module implementing the experts protocol of :mod:`smoe.nn.experts`: another backend, quantized
or offloaded experts), ``layer.dispatcher`` (an expert-parallel all-to-all dispatcher), and
``layer.use_reference = True`` routes through the slow reference of :mod:`smoe.nn.reference`.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe.config import MoEConfig
from smoe.nn import losses
from smoe.nn.dispatch import Assignments, LocalDispatcher
from smoe.nn.experts import DenseMLP, Experts
from smoe.nn.reference import reference_routed
from smoe.nn.router import Router, RouterOutput

__all__ = ["MoELayer", "MoEInfo"]


class MoEInfo:
    """Statistics of one forward, as tensors: nothing here syncs with the device until read,
    and the losses and counts are only computed when first read (inference pays nothing).

    Holds the layer's config, the router's decision and the global plan -- not the layer.

    tokens_per_expert: LongTensor [E] (global experts), rows each expert processed (after
        capacity).
    aux_loss: weighted balance losses (Switch/GShard, sequence-wise, noisy importance+load).
    z_loss: weighted router z-loss.
    dropped_tokens: tokens that got no expert at all (capacity or expert choice), 0-d.
    dropped_assignments: (token, expert) pairs removed by capacity, 0-d.
    capacity: per-expert capacity of this batch, None when dropless.
    router_logits: [T, E] float32; expert_indices / expert_weights: [T, K] (token choice).

    Memory: the [T, E] router tensors live as long as the info (the losses are computed from
    them on read, with autograd). Code that keeps infos beyond a step (recorders, logs) calls
    :meth:`release` first: it keeps the counts, the [T, K] choices and any loss already read,
    and drops the [T, E] tensors.
    """

    def __init__(self, config: MoEConfig, route: RouterOutput, plan: Assignments | None,
                 num_sequences: int) -> None:
        self.config = config
        self._route: RouterOutput | None = route
        self._plan = plan
        self._num_sequences = num_sequences
        self._cache: dict[str, torch.Tensor] = {}
        self._num_tokens = (route.experts_TK.shape[0] if route.token_choice
                            else route.logits_TE.shape[0])
        self._choices = (route.experts_TK, route.weights_TK)
        self._device = route.logits_TE.device

    def _cached(self, key: str, compute) -> torch.Tensor:
        if key not in self._cache:
            if self._route is None:
                raise ValueError(f"MoEInfo.{key} was not read before release(): read it first")
            self._cache[key] = compute(self._route)
        return self._cache[key]

    def release(self) -> MoEInfo:
        """Drop the [T, E] router tensors (logits, probabilities, noise); keep the counts, the
        [T, K] choices and the losses already read. Returns self."""
        self.tokens_per_expert  # noqa: B018 -- computed (on device) before the route goes
        self._route = None
        return self

    @property
    def router_logits(self) -> torch.Tensor | None:
        """[T, E] float32 logits (None after :meth:`release`)."""
        return None if self._route is None else self._route.logits_TE

    @property
    def expert_indices(self) -> torch.Tensor | None:
        return self._choices[0]

    @property
    def expert_weights(self) -> torch.Tensor | None:
        return self._choices[1]

    @property
    def capacity(self) -> int | None:
        return None if self._plan is None else self._plan.capacity

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        if self._plan is not None:
            return self._plan.counts_E
        E = self.config.num_experts
        return self._cached("tokens_per_expert", lambda route: torch.bincount(
            route.experts_TK.reshape(-1), minlength=E))

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.long, device=self._device)

    @property
    def dropped_tokens(self) -> torch.Tensor:
        return self._zero() if self._plan is None else self._plan.dropped_tokens

    @property
    def dropped_assignments(self) -> torch.Tensor:
        return self._zero() if self._plan is None else self._plan.dropped_assignments

    @property
    def aux_loss(self) -> torch.Tensor:
        return self._cached("aux_loss", lambda route: losses.router_aux_loss(
            self.config, route, self._num_sequences))

    @property
    def z_loss(self) -> torch.Tensor:
        return self._cached("z_loss", lambda route: losses.router_z_loss(self.config, route))

    @property
    def loss(self) -> torch.Tensor:
        """aux_loss + z_loss: what a training loop adds to its objective."""
        return self.aux_loss + self.z_loss

    def __repr__(self) -> str:
        return (f"MoEInfo(tokens={self._num_tokens}, experts={self.config.num_experts}, "
                f"capacity={self.capacity})")


class MoELayer(nn.Module):
    """A sparse MoE feed-forward layer: ``y, info = layer(x)``, x: (..., hidden_size).

    Only the experts a token chose run on it; the cost grows with K, not with N.
    ``use_reference = True`` switches to the slow, obviously correct implementation
    (:func:`smoe.nn.reference.reference_routed`: dense combine over all experts, capacity
    applied by a Python walk) that tests hold the fast path equal to.
    """

    def __init__(self, config: MoEConfig, backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.router = Router(config)
        self.experts = Experts(config, backend=backend)
        self.dispatcher = LocalDispatcher()
        if config.num_shared_experts:
            self.shared_experts = DenseMLP(config.hidden_size, config.shared_size,
                                           config.activation, init_std=config.init_std)
            self.shared_expert_gate = (nn.Linear(config.hidden_size, 1, bias=False)
                                       if config.shared_expert_gate else None)
        else:
            self.shared_experts = None
            self.shared_expert_gate = None
        if config.router == "sigmoid_bias":
            self.register_buffer("load_since_update",
                                 torch.zeros(config.num_experts, dtype=torch.long),
                                 persistent=False)
        else:
            self.load_since_update = None
        self.use_reference = False

    @property
    def decode_max_tokens(self) -> int:
        """The dispatcher's decode-shortcut threshold (see :class:`LocalDispatcher`)."""
        return self.dispatcher.decode_max_tokens

    @decode_max_tokens.setter
    def decode_max_tokens(self, n: int) -> None:
        self.dispatcher.decode_max_tokens = n

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, causal: bool = False) -> tuple[torch.Tensor, MoEInfo]:
        cfg = self.config
        if x.shape[-1] != cfg.hidden_size:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, expected hidden_size="
                             f"{cfg.hidden_size}")
        if causal and cfg.router == "expert_choice":
            raise ValueError("router='expert_choice' is not causal (an expert's choice depends on "
                             "the whole batch): it cannot be used for causal decoding; use a "
                             "token-choice router such as softmax_topk")
        shape = x.shape
        x_TD = x.reshape(-1, cfg.hidden_size)
        T = x_TD.shape[0]
        # The sequence-wise balance loss treats dim -2 as the sequence: (..., S_len, D).
        num_sequences = T // shape[-2] if x.dim() >= 3 and shape[-2] > 0 else 1

        route = self.router(x_TD)
        capacity = None if cfg.dropless else cfg.capacity(T)
        dispatcher = reference_routed if self.use_reference else self.dispatcher
        out_TD, plan = dispatcher(x_TD, route, self.experts, capacity=capacity,
                                  weights_on_input=cfg.weights_on_input)
        shared_TD = self.shared_forward(x_TD)
        if shared_TD is not None:
            out_TD = out_TD + shared_TD

        info = MoEInfo(cfg, route, plan, num_sequences)
        if self.load_since_update is not None and self.training:
            self.load_since_update += info.tokens_per_expert.detach()
        return out_TD.reshape(shape), info

    def shared_forward(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        """The shared experts' output (sigmoid-gated when configured), None without any."""
        if self.shared_experts is None:
            return None
        shared_TD = self.shared_experts(x_TD)
        if self.shared_expert_gate is not None:
            shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
        return shared_TD

    # -- balancing ----------------------------------------------------------------------
    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor | None = None) -> None:
        """One auxiliary-loss-free balancing step (``sigmoid_bias`` only; DeepSeek-V3).

        Uses ``tokens_per_expert`` when given, else the load accumulated by training-mode
        forwards since the last update (then resets it). Call it from the training loop after
        the optimizer step.
        """
        if self.load_since_update is None:
            raise ValueError("update_bias needs router='sigmoid_bias', "
                             f"not {self.config.router!r}")
        if tokens_per_expert is None:
            tokens_per_expert = self.load_since_update.clone()
            self.load_since_update.zero_()
        self.router.update_bias(tokens_per_expert)
