"""The sparse mixture-of-experts layer: router + dispatch + experts (+ shared experts).

Legend: T tokens (all leading dims flattened), D hidden, E routed experts, K per token,
A kept (token, expert) assignments sorted by expert.

    route = router(x_TD)                       # who goes where, float32
    plan = plan_assignments(route, E, cap)     # expert-sorted rows, capacity applied
    y_AD = experts(x_TD[plan.token_A], plan.counts_E)
    out_TD = combine(y_AD, plan)               # weighted scatter back to tokens
    out_TD += shared_experts(x_TD)

Each component can be replaced after build (``layer.experts.backend = "loop"``, a distributed
dispatcher, quantized experts) without touching this forward.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe.config import MoEConfig
from smoe.nn import losses
from smoe.nn.dispatch import Assignments, combine, plan_assignments, plan_assignments_reference
from smoe.nn.experts import DenseMLP, Experts
from smoe.nn.router import Router, RouterOutput

__all__ = ["MoELayer", "MoEInfo"]


class MoEInfo:
    """Statistics of one forward, as tensors: nothing here syncs with the device until read,
    and the losses and counts are only computed when first read (inference pays nothing).

    tokens_per_expert: LongTensor [E], rows each expert processed (after capacity).
    aux_loss: weighted balance losses (Switch/GShard, sequence-wise, noisy importance+load).
    z_loss: weighted router z-loss.
    dropped_tokens: tokens that got no expert at all (capacity or expert choice), 0-d.
    dropped_assignments: (token, expert) pairs removed by capacity, 0-d.
    capacity: per-expert capacity of this batch, None when dropless.
    router_logits: [T, E] float32; expert_indices / expert_weights: [T, K] (token choice).
    """

    def __init__(self, layer: "MoELayer", route: RouterOutput, plan: Assignments | None,
                 num_sequences: int) -> None:
        self._layer = layer
        self._route = route
        self._plan = plan
        self._num_sequences = num_sequences
        self._cache: dict[str, torch.Tensor] = {}

    def _cached(self, key: str, compute) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @property
    def router_logits(self) -> torch.Tensor:
        return self._route.logits_TE

    @property
    def expert_indices(self) -> torch.Tensor | None:
        return self._route.experts_TK

    @property
    def expert_weights(self) -> torch.Tensor | None:
        return self._route.weights_TK

    @property
    def capacity(self) -> int | None:
        return None if self._plan is None else self._plan.capacity

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        if self._plan is not None:
            return self._plan.counts_E
        E = self._layer.config.num_experts
        return self._cached("counts", lambda: torch.bincount(
            self._route.experts_TK.reshape(-1), minlength=E))

    @property
    def dropped_tokens(self) -> torch.Tensor:
        if self._plan is not None:
            return self._plan.dropped_tokens
        return torch.zeros((), dtype=torch.long, device=self._route.logits_TE.device)

    @property
    def dropped_assignments(self) -> torch.Tensor:
        if self._plan is not None:
            return self._plan.dropped_assignments
        return torch.zeros((), dtype=torch.long, device=self._route.logits_TE.device)

    @property
    def aux_loss(self) -> torch.Tensor:
        return self._cached("aux", lambda: self._layer._aux_loss(self._route,
                                                                 self._num_sequences))

    @property
    def z_loss(self) -> torch.Tensor:
        return self._cached("z", lambda: self._layer._z_loss(self._route))

    @property
    def loss(self) -> torch.Tensor:
        """aux_loss + z_loss: what a training loop adds to its objective."""
        return self.aux_loss + self.z_loss

    def __repr__(self) -> str:
        return (f"MoEInfo(tokens={self._route.logits_TE.shape[0]}, "
                f"experts={self._layer.config.num_experts}, capacity={self.capacity})")


class MoELayer(nn.Module):
    """A sparse MoE feed-forward layer: ``y, info = layer(x)``, x: (..., hidden_size).

    Only the experts a token chose run on it; the cost grows with K, not with N.
    ``use_reference = True`` switches to the slow, obviously correct implementation (dense
    combine over all experts, capacity applied by a Python walk) that tests hold the fast
    path equal to.
    """

    def __init__(self, config: MoEConfig, backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.router = Router(config)
        self.experts = Experts(config, backend=backend)
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
        # Up to this many tokens without autograd on CPU, the per-(token, expert) decode path
        # runs instead of sort + grouped GEMM (see benchmarks/layer.py for the crossover).
        self.decode_max_tokens = 1

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
        if self.use_reference:
            plan = plan_assignments_reference(route, cfg.num_experts, capacity)
            out_TD = self._experts_reference(x_TD, plan)
        elif self._decode_path_applies(x_TD, route, capacity):
            plan = None
            out_TD = self.experts.forward_decode(x_TD, route.experts_TK, route.weights_TK,
                                                 weighted=not cfg.weights_on_input)
        else:
            plan = plan_assignments(route, cfg.num_experts, capacity)
            out_TD = self._experts_sparse(x_TD, plan)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD

        info = MoEInfo(self, route, plan, num_sequences)
        if self.load_since_update is not None and self.training:
            self.load_since_update += info.tokens_per_expert.detach()
        return out_TD.reshape(shape), info

    def _decode_path_applies(self, x_TD: torch.Tensor, route: RouterOutput,
                             capacity: int | None) -> bool:
        """Decoding (a few tokens, no autograd, CPU): read only the chosen experts' weights.
        On accelerators the grouped path is used instead: it needs no host sync."""
        return (x_TD.shape[0] <= self.decode_max_tokens and route.token_choice
                and capacity is None and not torch.is_grad_enabled()
                and x_TD.device.type == "cpu")

    def _experts_sparse(self, x_TD: torch.Tensor, plan: Assignments) -> torch.Tensor:
        x_AD = x_TD.index_select(0, plan.token_A)
        if self.config.weights_on_input:
            x_AD = x_AD * plan.weight_A.to(x_AD.dtype).unsqueeze(-1)
        y_AD = self.experts(x_AD, plan.counts_E, plan.expert_A)
        return combine(y_AD, plan, x_TD.shape[0], weighted=not self.config.weights_on_input)

    def _experts_reference(self, x_TD: torch.Tensor, plan: Assignments) -> torch.Tensor:
        """Every expert on every token, masked by a dense [T, E] combine matrix."""
        T, E = x_TD.shape[0], self.config.num_experts
        weight_TE = x_TD.new_zeros(T, E, dtype=plan.weight_A.dtype).index_put(
            (plan.token_A, plan.expert_A), plan.weight_A, accumulate=True)
        chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TD.device)
        chosen_TE[plan.token_A, plan.expert_A] = True
        out_TD = torch.zeros_like(x_TD)
        for e in range(E):
            w_T1 = weight_TE[:, e:e + 1].to(x_TD.dtype)
            mask_T1 = chosen_TE[:, e:e + 1].to(x_TD.dtype)
            if self.config.weights_on_input:
                y = self.experts.expert_forward(x_TD * w_T1, e) * mask_T1
            else:
                y = self.experts.expert_forward(x_TD, e) * w_T1
            out_TD = out_TD + y
        return out_TD

    # -- losses -------------------------------------------------------------------------
    def _aux_loss(self, route: RouterOutput, num_sequences: int) -> torch.Tensor:
        cfg = self.config
        total = route.logits_TE.new_zeros(())
        if not route.token_choice:  # expert choice is balanced by construction
            return total
        if cfg.router == "noisy_topk":
            if cfg.aux_loss_coef:
                imp, load = losses.noisy_topk_losses(route.logits_TE, route.noisy_TE,
                                                     route.noise_std_TE, route.experts_TK,
                                                     route.weights_TK)
                total = total + cfg.aux_loss_coef * (imp + load)
        elif cfg.aux_loss_coef:
            total = total + cfg.aux_loss_coef * losses.load_balancing_loss(route.probs_TE,
                                                                           route.experts_TK)
        if cfg.seq_aux_loss_coef:
            total = total + cfg.seq_aux_loss_coef * losses.sequence_balance_loss(
                route.probs_TE, route.experts_TK, num_sequences)
        return total

    def _z_loss(self, route: RouterOutput) -> torch.Tensor:
        if not self.config.z_loss_coef:
            return route.logits_TE.new_zeros(())
        return self.config.z_loss_coef * losses.z_loss(route.logits_TE)

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
