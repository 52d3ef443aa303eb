"""Router losses. Legend: T tokens, E experts, K experts per token, S sequences.

The loss functions return unweighted float32 scalars (float64 for float64 inputs); each is
zero for an empty batch. :func:`router_aux_loss` and :func:`router_z_loss` apply a layer's
config (which losses, which coefficients) to one routing decision: what ``MoEInfo`` reports.
"""

from __future__ import annotations

import math

import torch

from smoe.config import MoEConfig
from smoe.nn.router import RouterOutput

__all__ = [
    "load_balancing_loss",
    "sequence_balance_loss",
    "z_loss",
    "cv_squared",
    "noisy_topk_losses",
    "router_aux_loss",
    "router_z_loss",
]


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast low-precision tensors to float32; float64 stays float64 (gradcheck, tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def load_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """Switch/GShard load-balancing loss without its coefficient: N * sum_i f_i * P_i.

    Fedus et al. 2021 (arXiv 2101.03961), eq. 4-6, generalised to top-K:
    f_i = (assignments to expert i) / (T * K) -- the fraction of the T*K routing slots,
    P_i = mean over tokens of the router probability p_i.
    We divide by T*K (not T, as transformers' ``load_balancing_loss_func`` does) so the loss is
    1.0 at perfectly uniform routing for every K, and a coefficient tuned at one K carries over
    to another; transformers' value is ours times K. ``f`` has no gradient (counts); the gradient
    flows through P.
    """
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.new_zeros(())
    K = experts_TK.shape[-1]
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=E).to(probs_TE.dtype)
    f_E = counts_E / (T * K)
    P_E = probs_TE.mean(dim=0)
    return E * (f_E * P_E).sum()


def sequence_balance_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor,
                          num_sequences: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (arXiv 2412.19437, eq. 17-20), unweighted.

    For each sequence: f_i = N / (K * T_s) * (tokens of the sequence routed to i),
    P_i = mean over the sequence of the normalised scores s'_i; loss = sum_i f_i * P_i,
    averaged over sequences. Tokens are laid out sequence-major (T = S * T_s).
    """
    T, E = probs_TE.shape
    if T == 0 or num_sequences <= 0:
        return probs_TE.new_zeros(())
    K = experts_TK.shape[-1]
    S = num_sequences
    Ts = T // S
    seq_of_slot = (torch.arange(T, device=experts_TK.device) // Ts).repeat_interleave(K)
    flat = seq_of_slot * E + experts_TK.reshape(-1)
    counts_SE = torch.bincount(flat, minlength=S * E).view(S, E).to(probs_TE.dtype)
    f_SE = counts_SE * (E / (K * Ts))
    P_SE = probs_TE.view(S, Ts, E).mean(dim=1)
    return (f_SE * P_SE).sum(dim=-1).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE, arXiv 2202.08906, eq. 5), unweighted:
    mean over tokens of logsumexp(logits)^2. Penalises large logits for numerical stability."""
    if logits_TE.shape[0] == 0:
        return logits_TE.new_zeros(())
    return torch.logsumexp(_at_least_float32(logits_TE), dim=-1).square().mean()


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation, population variance / mean^2 (0 for one element)."""
    if x.numel() <= 1:
        return x.new_zeros(())
    x = _at_least_float32(x)
    return x.var(unbiased=False) / (x.mean().square() + eps)


def noisy_topk_losses(logits_TE: torch.Tensor, noisy_TE: torch.Tensor,
                      noise_std_TE: torch.Tensor, experts_TK: torch.Tensor,
                      weights_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance and load losses of Shazeer et al. 2017 (arXiv 1701.06538, sec. 4, app. A).

    Importance_i = sum over tokens of the gate value G(x)_i; L_imp = CV(Importance)^2.
    Load_i = sum over tokens of P(x, i) = Phi((clean_i - kth_excluding(H, K, i)) / std_i), the
    probability that expert i is still in the top K under a new draw of its own noise, with Phi
    the standard normal CDF; L_load = CV(Load)^2. With K = N every expert is always chosen and
    P = 1. Both unweighted; the layer weights each by ``aux_loss_coef``.
    """
    T, E = logits_TE.shape
    if T == 0:
        zero = logits_TE.new_zeros(())
        return zero, zero
    K = experts_TK.shape[-1]
    gates_TE = torch.zeros_like(logits_TE).scatter(1, experts_TK, weights_TK)
    importance = cv_squared(gates_TE.sum(dim=0))
    if K >= E:
        return importance, logits_TE.new_zeros(())
    top_TK1 = noisy_TE.topk(K + 1, dim=-1).values
    # Without i: if i is in the top K, the K-th largest of the rest is the (K+1)-th overall;
    # otherwise it is the K-th overall.
    threshold_if_in_T1 = top_TK1[:, K:K + 1]
    threshold_if_out_T1 = top_TK1[:, K - 1:K]
    is_in_TE = noisy_TE > threshold_if_in_T1
    threshold_TE = torch.where(is_in_TE, threshold_if_in_T1, threshold_if_out_T1)
    z_TE = (logits_TE - threshold_TE) / noise_std_TE.clamp_min(1e-9)
    prob_TE = 0.5 * (1 + torch.erf(z_TE / math.sqrt(2)))
    load = cv_squared(prob_TE.sum(dim=0))
    return importance, load


def router_aux_loss(config: MoEConfig, route: RouterOutput, num_sequences: int) -> torch.Tensor:
    """The weighted balance losses of one layer's routing decision (0-d): Switch/GShard
    (``aux_loss_coef``; importance + load for ``noisy_topk``) plus DeepSeek-V3's sequence-wise
    loss (``seq_aux_loss_coef``, tokens laid out as ``num_sequences`` equal sequences). Zero for
    expert choice, which is balanced by construction."""
    total = route.logits_TE.new_zeros(())
    if not route.token_choice:
        return total
    if config.router == "noisy_topk":
        if config.aux_loss_coef:
            imp, load = noisy_topk_losses(route.logits_TE, route.noisy_TE, route.noise_std_TE,
                                          route.experts_TK, route.weights_TK)
            total = total + config.aux_loss_coef * (imp + load)
    elif config.aux_loss_coef:
        total = total + config.aux_loss_coef * load_balancing_loss(route.probs_TE,
                                                                   route.experts_TK)
    if config.seq_aux_loss_coef:
        total = total + config.seq_aux_loss_coef * sequence_balance_loss(
            route.probs_TE, route.experts_TK, num_sequences)
    return total


def router_z_loss(config: MoEConfig, route: RouterOutput) -> torch.Tensor:
    """``z_loss_coef`` times the router z-loss of one routing decision (0-d)."""
    if not config.z_loss_coef:
        return route.logits_TE.new_zeros(())
    return config.z_loss_coef * z_loss(route.logits_TE)
