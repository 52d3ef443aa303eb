"""Routing rules of transformers families that smoe's own :class:`~smoe.nn.Router` has no
setting for, as a Router subclass used only by :mod:`smoe.hf.patch`.

Legend: T tokens, E experts, K experts per token.

* ``softmax_bias`` (ERNIE-4.5-MoE): softmax over all experts; the selection-only bias
  ``e_score_correction_bias`` is added to the probabilities to choose the top K; the weights are
  the unbiased probabilities of the chosen experts divided by ``max(sum, norm_min)``.
* ``logits_bias`` (Kolibri-1): the top K of ``logits + bias`` (the bias is added to the logits,
  not to the sigmoid scores as in DeepSeek-V3); weights = sigmoid of the chosen logits,
  optionally renormalised by their sum.
* ``sparsemixer_sampling`` (Phi-3.5-MoE): in training, SparseMixer as the model trains it
  (Liu et al. 2023, arXiv 2310.00811; Phi-3.5-MoE, arXiv 2409.12136): each of the two picks is
  sampled (Gumbel-max over the logits within the margin) instead of taken as the arg-max, its
  weight is scaled by 1 or 1/3 (kept at full weight when the sample is the arg-max, else with
  probability 1/4: the midpoint of Heun's third-order method), and the gradient reaching the
  logits is that of the sampled expert's softmax probability (see :class:`HeunMultiplier`).
  Random numbers are drawn in the original's order and shapes, so with the same seed a float32
  model samples the same experts. In eval mode it is the base ``sparsemixer`` rule.
* ``softcap`` (Laguna): logits are soft-capped, ``c * tanh(logits / c)``, before the rule runs
  (the capped logits are what the router reports).

Everything else (logits, scaling, the returned :class:`~smoe.nn.RouterOutput`) is the base
class's. The selection bias is the model's own tensor, bound by the patch like the weight.
"""

from __future__ import annotations

import torch

from smoe.config import MoEConfig
from smoe.nn.router import Router, RouterOutput

__all__ = ["HFRouter", "HeunMultiplier", "SELECTIONS"]

SELECTIONS = ("softmax_bias", "logits_bias", "sparsemixer_sampling")


class HeunMultiplier(torch.autograd.Function):
    """SparseMixer's routing weight with its gradient estimator.

    Forward: ``weight_T1 * scale_T1`` (the sampled expert's softmax probability times the Heun
    midpoint factor). Backward: only to the logits, as the gradient of that probability
    p_s = softmax(z)_s scaled by the incoming gradient: dz_j = g * p_s * ([j = s] - p_j), where
    ``probs_TE`` is the softmax over the logits within the margin.
    """

    @staticmethod
    def forward(ctx, logits_TE, weight_T1, pick_T1, probs_TE, scale_T1):
        ctx.save_for_backward(weight_T1, pick_T1, probs_TE)
        return weight_T1 * scale_T1

    @staticmethod
    def backward(ctx, grad_T1):
        weight_T1, pick_T1, probs_TE = ctx.saved_tensors
        g_T1 = grad_T1 * weight_T1
        grad_TE = (probs_TE * -g_T1).scatter_add(1, pick_T1, g_T1)
        return grad_TE, None, None, None, None


class HFRouter(Router):
    """A :class:`Router` whose rule is one of ``SELECTIONS`` (or the config's own rule) with
    optional logit soft-capping; see the module docstring."""

    def __init__(self, config: MoEConfig, selection: str | None = None, softcap: float = 0.0,
                 norm_min: float = 0.0) -> None:
        super().__init__(config)
        if selection is not None and selection not in SELECTIONS:
            raise ValueError(f"selection={selection!r} is invalid: must be one of "
                             f"{', '.join(SELECTIONS)}")
        if softcap < 0:
            raise ValueError(f"softcap={softcap} is invalid: must be >= 0 (0 is off)")
        self.selection = selection
        self.softcap = float(softcap)
        self.norm_min = float(norm_min)
        if selection is not None:
            self.expert_bias = torch.zeros(config.num_experts)  # bound to the model's bias

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits_TE = super().logits(x_TD)
        if self.softcap > 0:
            logits_TE = torch.tanh(logits_TE / self.softcap) * self.softcap
        return logits_TE

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        if self.selection == "sparsemixer_sampling":
            if not self.training:
                return super().forward(x_TD)
            return self._sparsemixer_sampling(self.logits(x_TD))
        if self.selection is None:
            return super().forward(x_TD)
        cfg = self.config
        logits_TE = self.logits(x_TD)
        bias_E = self.expert_bias.reshape(-1).to(logits_TE.dtype)
        if self.selection == "softmax_bias":
            probs_TE = logits_TE.softmax(dim=-1)
            _, experts_TK = (probs_TE.detach() + bias_E).topk(cfg.top_k, dim=-1)
            weights_TK = probs_TE.gather(1, experts_TK)
            if cfg.norm_topk_prob:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp(
                    min=self.norm_min)
            return RouterOutput(logits_TE, probs_TE, experts_TK, self._scale(weights_TK))
        _, experts_TK = (logits_TE.detach() + bias_E).topk(cfg.top_k, dim=-1)
        scores_TE = logits_TE.sigmoid()
        weights_TK = scores_TE.gather(1, experts_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + cfg.norm_topk_eps)
        probs_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
        return RouterOutput(logits_TE, probs_TE, experts_TK, self._scale(weights_TK))

    def _sparsemixer_sampling(self, logits_TE: torch.Tensor) -> RouterOutput:
        eps2 = 2 * self.config.sparsemixer_jitter_eps
        remaining_TE = logits_TE  # the logits with the earlier picks removed
        picks, weights = [], []
        for step in range(2):
            with torch.no_grad():
                best_T1 = remaining_TE.max(dim=-1, keepdim=True).values
                factor_TE = logits_TE.abs().clamp(min=best_T1)
                far_TE = (best_T1 - logits_TE) / factor_TE > eps2
            gated_TE = remaining_TE.masked_fill(far_TE, float("-inf"))
            gumbel_TE = torch.empty_like(
                gated_TE, memory_format=torch.legacy_contiguous_format).exponential_().log()
            pick_T1 = (gated_TE - gumbel_TE).max(dim=-1)[1].unsqueeze(-1)
            probs_TE = gated_TE.softmax(dim=-1)
            weight_T1 = probs_TE.gather(1, pick_T1)
            top_T1 = probs_TE.max(dim=-1, keepdim=True)
            coin_T1 = torch.rand_like(top_T1.values)
            if step == 1:  # the original draws a second time here; keep the generator in step
                coin_T1.uniform_()
            full_T1 = (pick_T1 == top_T1.indices) | (coin_T1 > 0.75)
            scale_T1 = torch.add(0.3333, full_T1, alpha=0.6667).type_as(probs_TE)
            weights.append(HeunMultiplier.apply(logits_TE, weight_T1, pick_T1, probs_TE,
                                                scale_T1))
            picks.append(pick_T1)
            remaining_TE = logits_TE.scatter(1, pick_T1, float("-inf"))
        return RouterOutput(logits_TE, logits_TE.softmax(dim=-1), torch.cat(picks, 1),
                            self._scale(torch.cat(weights, 1)))
