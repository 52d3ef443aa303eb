"""Routing rules of transformers families that smoe's own :class:`~smoe.nn.Router` has no
setting for, as a Router subclass used only by :mod:`smoe.hf.patch`.

Legend: T tokens, E experts, K experts per token.

* ``softmax_bias`` (ERNIE-4.5-MoE): softmax over all experts; the selection-only bias
  ``e_score_correction_bias`` is added to the probabilities to choose the top K; the weights are
  the unbiased probabilities of the chosen experts divided by ``max(sum, norm_min)``.
* ``logits_bias`` (Kolibri-1): the top K of ``logits + bias`` (the bias is added to the logits,
  not to the sigmoid scores as in DeepSeek-V3); weights = sigmoid of the chosen logits,
  optionally renormalised by their sum.
* ``softcap`` (Laguna): logits are soft-capped, ``c * tanh(logits / c)``, before the rule runs
  (the capped logits are what the router reports).

Everything else (logits, scaling, the returned :class:`~smoe.nn.RouterOutput`) is the base
class's. The selection bias is the model's own tensor, bound by the patch like the weight.
"""

from __future__ import annotations

import torch

from smoe.config import MoEConfig
from smoe.nn.router import Router, RouterOutput

__all__ = ["HFRouter", "SELECTIONS"]

SELECTIONS = ("softmax_bias", "logits_bias")


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
