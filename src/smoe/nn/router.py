"""Routers: score every token against every expert and choose where it goes.

Legend: T tokens, D hidden size, E (= N) routed experts, K experts chosen per token, C tokens an
expert takes (expert choice). Router math runs in float32 whatever the input dtype (float64
for float64 inputs: never a downcast).

Every router returns a :class:`RouterOutput`. Token-choice routers fill ``experts_TK`` and
``weights_TK``; the expert-choice router fills ``tokens_EC`` and ``weights_EC`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smoe.config import MoEConfig

__all__ = ["RouterOutput", "Router", "build_router", "limit_to_groups"]


@dataclass
class RouterOutput:
    """What a router decided, in float32.

    logits_TE: raw router logits (for the z-loss and for callers that return router logits).
    probs_TE: the scores the load-balancing loss uses (softmax, or normalised sigmoid scores).
    experts_TK, weights_TK: token choice: the K experts of each token and their weights,
        expert order = priority order (slot 0 is the token's first choice).
    tokens_EC, weights_EC: expert choice: the C tokens each expert took and their weights.
    noisy_TE, noise_std_TE: noisy top-K only, for its load loss.
    """

    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    experts_TK: torch.Tensor | None = None
    weights_TK: torch.Tensor | None = None
    tokens_EC: torch.Tensor | None = None
    weights_EC: torch.Tensor | None = None
    noisy_TE: torch.Tensor | None = None
    noise_std_TE: torch.Tensor | None = None

    @property
    def token_choice(self) -> bool:
        return self.experts_TK is not None


def limit_to_groups(scores_TE: torch.Tensor, n_groups: int, topk_groups: int,
                    group_score: str) -> torch.Tensor:
    """Group-limited routing (DeepSeek-V2/V3, arXiv 2405.04434, 2412.19437).

    Experts are split into ``n_groups`` equal groups; a group is scored by the sum of its top-2
    scores (``top2_sum``, V3) or its best score (``max``, V2); the experts of all but the best
    ``topk_groups`` groups get -inf so that the following top-K only searches the kept groups.
    """
    if n_groups <= 1:
        return scores_TE
    T, E = scores_TE.shape
    grouped_TGS = scores_TE.view(T, n_groups, E // n_groups)
    if group_score == "max":
        group_TG = grouped_TGS.amax(dim=-1)
    else:
        top = min(2, E // n_groups)
        group_TG = grouped_TGS.topk(top, dim=-1).values.sum(dim=-1)
    keep_idx_TG = group_TG.topk(topk_groups, dim=-1).indices
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, keep_idx_TG, True)
    keep_TE = keep_TG.unsqueeze(-1).expand_as(grouped_TGS).reshape(T, E)
    return scores_TE.masked_fill(~keep_TE, float("-inf"))


def _router_dtype(dtype: torch.dtype) -> torch.dtype:
    """Router math runs in float32, or in float64 for float64 inputs (never downcast)."""
    return torch.promote_types(dtype, torch.float32)


class Router(nn.Module):
    """A linear scorer ``logits = x W^T (+ b)`` followed by one of the routing rules.

    Routing rules (``config.router``):

    * ``softmax_topk``: softmax over all experts, keep the top K, optionally renormalise
      (Mixtral, Jiang et al. 2024, arXiv 2401.04088; Qwen-MoE; OLMoE, arXiv 2409.02060).
    * ``topk_softmax``: keep the top-K logits, softmax over those K (Shazeer et al. 2017 without
      noise, arXiv 1701.06538; gpt-oss).
    * ``noisy_topk``: noisy top-K gating of Shazeer et al. 2017: H = xW_g + eps * softplus(xW_n),
      eps ~ N(0, 1) in training only; weights = softmax over the K largest H.
    * ``switch``: top-1 of the softmax (Fedus et al. 2021, arXiv 2101.03961), usually with a
      capacity factor; the weight is the chosen expert's probability.
    * ``expert_choice``: each expert takes its top-C tokens by softmax score, C = T * c / N
      (Zhou et al. 2022, arXiv 2202.09368). The choice depends on the whole batch, so it is
      **not causal**: a token's route depends on later tokens. The layer refuses it for causal
      decoding.
    * ``sigmoid_bias``: sigmoid scores; a per-expert bias (no gradient) is added for selection
      only, the weights are the unbiased scores of the chosen experts, optionally renormalised,
      times ``routed_scaling_factor`` (DeepSeek-V3 auxiliary-loss-free balancing, arXiv
      2412.19437). The bias moves with :meth:`update_bias`, called by the training loop.
    * ``sparsemixer``: the top-2 rule of Phi-3.5-MoE (SparseMixer, Liu et al. 2023, arXiv
      2310.00811), deterministic form: each pick is the arg-max, its weight a softmax over the
      experts within a relative margin ``2 * jitter_eps`` of it. The sampling-based gradient
      estimator of the paper is not reproduced; training uses the deterministic picks.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        E, D = config.num_experts, config.hidden_size
        self.weight = nn.Parameter(torch.empty(E, D))
        self.bias = nn.Parameter(torch.zeros(E)) if config.router_bias else None
        self.noise_weight = (nn.Parameter(torch.zeros(E, D)) if config.router == "noisy_topk"
                             else None)
        if config.router == "sigmoid_bias":
            # Selection-only bias; persistent so that a checkpoint keeps the balance reached.
            self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        else:
            self.expert_bias = None
        # When False, logits are computed in the input dtype and cast to float32 afterwards
        # (what most transformers models do); interop adapters set it to match a model.
        self.logits_in_float32 = True
        nn.init.normal_(self.weight, std=config.init_std)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        dt = _router_dtype(x_TD.dtype)
        if self.logits_in_float32:
            b = None if self.bias is None else self.bias.to(dt)
            return F.linear(x_TD.to(dt), self.weight.to(dt), b)
        return F.linear(x_TD, self.weight, self.bias).to(dt)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        cfg = self.config
        logits_TE = self.logits(x_TD)
        rule = cfg.router
        if rule == "expert_choice":
            return self._expert_choice(logits_TE)
        if rule == "sigmoid_bias":
            return self._sigmoid_bias(logits_TE)
        if rule == "noisy_topk":
            return self._noisy_topk(x_TD, logits_TE)
        if rule == "sparsemixer":
            return self._sparsemixer(logits_TE)
        probs_TE = logits_TE.softmax(dim=-1)
        if rule == "topk_softmax":
            top_logits_TK, experts_TK = logits_TE.topk(cfg.top_k, dim=-1)
            return RouterOutput(logits_TE, probs_TE, experts_TK,
                                self._scale(top_logits_TK.softmax(dim=-1)))
        # softmax_topk and switch: weights are the softmax probabilities of the chosen experts.
        select_TE = limit_to_groups(probs_TE, cfg.n_groups, cfg.topk_groups, cfg.group_score)
        _, experts_TK = select_TE.topk(cfg.top_k, dim=-1)
        weights_TK = probs_TE.gather(1, experts_TK)
        if cfg.norm_topk_prob and rule != "switch" and cfg.top_k > 1:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(logits_TE, probs_TE, experts_TK, self._scale(weights_TK))

    def _scale(self, weights_TK: torch.Tensor) -> torch.Tensor:
        s = self.config.routed_scaling_factor
        return weights_TK if s == 1.0 else weights_TK * s

    def _sigmoid_bias(self, logits_TE: torch.Tensor) -> RouterOutput:
        cfg = self.config
        scores_TE = logits_TE.sigmoid()
        biased_TE = scores_TE.detach() + self.expert_bias
        biased_TE = limit_to_groups(biased_TE, cfg.n_groups, cfg.topk_groups, cfg.group_score)
        _, experts_TK = biased_TE.topk(cfg.top_k, dim=-1)
        weights_TK = scores_TE.gather(1, experts_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + cfg.norm_topk_eps)
        # Balance-loss scores: sigmoid scores normalised per token (DeepSeek-V3 eq. 19).
        probs_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
        return RouterOutput(logits_TE, probs_TE, experts_TK, self._scale(weights_TK))

    def _noisy_topk(self, x_TD: torch.Tensor, logits_TE: torch.Tensor) -> RouterOutput:
        cfg = self.config
        dt = _router_dtype(x_TD.dtype)
        noise_std_TE = F.softplus(F.linear(x_TD.to(dt), self.noise_weight.to(dt)))
        if self.training:
            noisy_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        else:
            noisy_TE = logits_TE
        top_TK, experts_TK = noisy_TE.topk(cfg.top_k, dim=-1)
        return RouterOutput(logits_TE, logits_TE.softmax(dim=-1), experts_TK,
                            self._scale(top_TK.softmax(dim=-1)), noisy_TE=noisy_TE,
                            noise_std_TE=noise_std_TE)

    def _expert_choice(self, logits_TE: torch.Tensor) -> RouterOutput:
        probs_TE = logits_TE.softmax(dim=-1)
        capacity = self.config.capacity(logits_TE.shape[0])
        weights_CE, tokens_CE = probs_TE.topk(capacity, dim=0)
        return RouterOutput(logits_TE, probs_TE, tokens_EC=tokens_CE.T,
                            weights_EC=self._scale(weights_CE.T))

    def _sparsemixer(self, logits_TE: torch.Tensor) -> RouterOutput:
        eps2 = 2 * self.config.sparsemixer_jitter_eps
        scores_TE = logits_TE
        picks, weights = [], []
        for _ in range(2):
            with torch.no_grad():
                best_T1, pick_T1 = scores_TE.max(dim=-1, keepdim=True)
                factor_TE = logits_TE.abs().clamp(min=best_T1)
                far_TE = (best_T1 - logits_TE) / factor_TE > eps2
            gates_TE = scores_TE.masked_fill(far_TE, float("-inf")).softmax(dim=-1)
            picks.append(pick_T1)
            weights.append(gates_TE.gather(1, pick_T1))
            scores_TE = scores_TE.scatter(1, pick_T1, float("-inf"))
        return RouterOutput(logits_TE, logits_TE.softmax(dim=-1), torch.cat(picks, 1),
                            self._scale(torch.cat(weights, 1)))

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing step (DeepSeek-V3): b_i += gamma * sign(mean - load_i).

        Overloaded experts become less likely to be chosen, underloaded ones more likely. Called
        by the training loop after the optimizer step, never inside ``forward``.
        """
        if self.expert_bias is None:
            raise ValueError(f"update_bias needs router='sigmoid_bias', not {self.config.router!r}")
        load_E = tokens_per_expert_E.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.config.bias_update_rate * torch.sign(load_E.mean() - load_E)


def build_router(config: MoEConfig) -> Router:
    return Router(config)
