"""Experts whose gate and up projections live in two tensors (DBRX), read without a copy.

Legend: E experts, D hidden, F expert inner width, A expert-sorted rows.

:class:`smoe.nn.experts.Experts` runs the gate and up projections as one GEMM over a fused
``gate_up_proj`` [E, 2F, D]. DBRX stores them apart (``w1`` and ``v1``, each [E*F, D]) and its
down projection as in x out (``w2`` [E*F, D]); fusing them would need a second copy of the
weights. :class:`SplitExperts` keeps the three tensors as they are and runs one more GEMM.
"""

from __future__ import annotations

import torch

from smoe.config import MoEConfig
from smoe.nn.experts import (
    _GROUPED_MM_DTYPES,
    Experts,
    _grouped_mm_aligned,
    gated_activation,
)
from smoe.nn.grouped_mm import grouped_mm

__all__ = ["SplitExperts"]


class SplitExperts(Experts):
    """Gated experts with ``gate_proj`` and ``up_proj`` apart, each viewable as [E, F, D]
    (out x in), and ``down_proj`` viewable as [E, D, F], or as [E, F, D] with ``transposed``.

    The three parameters are assigned by the caller (interop); shapes are only viewed, never
    copied. Biases are not supported.
    """

    def __init__(self, config: MoEConfig, backend: str = "auto") -> None:
        if not config.gated or config.expert_bias:
            raise ValueError("SplitExperts needs a gated activation and no expert biases")
        super().__init__(config, backend=backend)
        E, D, Fw = config.num_experts, config.hidden_size, config.expert_size
        del self.gate_up_proj  # replaced by the two tensors below
        self.gate_proj = torch.nn.Parameter(torch.empty(E, Fw, D))
        self.up_proj = torch.nn.Parameter(torch.empty(E, Fw, D))

    def split_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D]) oriented for ``x @ w`` (views)."""
        c = self.config
        E, D, Fw = c.num_experts, c.hidden_size, c.expert_size
        w_gate = self.gate_proj.view(E, Fw, D).transpose(1, 2)
        w_up = self.up_proj.view(E, Fw, D).transpose(1, 2)
        if self.transposed:
            w_down = self.down_proj.view(E, Fw, D)
        else:
            w_down = self.down_proj.view(E, D, Fw).transpose(1, 2)
        return w_gate, w_up, w_down

    def _gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        c = self.config
        return gated_activation(gate, up, c.activation, c.activation_alpha, c.activation_limit)

    def expert_forward(self, x_RD: torch.Tensor, e: int) -> torch.Tensor:
        w_gate, w_up, w_down = self.split_weights()
        return self._gated(x_RD @ w_gate[e], x_RD @ w_up[e]) @ w_down[e]

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor,
                expert_A: torch.Tensor | None = None) -> torch.Tensor:
        w_gate, w_up, w_down = self.split_weights()
        backend = self.backend
        if backend == "auto":
            fits = (x_AD.dtype in _GROUPED_MM_DTYPES
                    and _grouped_mm_aligned(x_AD, w_gate, w_down, self.config.expert_size)
                    and _grouped_mm_aligned(x_AD, w_up, w_down, self.config.expert_size))
            backend = "grouped_mm" if fits else "loop"
        if backend == "grouped_mm":
            offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
            a = self._gated(grouped_mm(x_AD, w_gate, offs_E), grouped_mm(x_AD, w_up, offs_E))
            return grouped_mm(a, w_down, offs_E)
        sizes = counts_E.tolist()
        a = self._gated(self._matmul_per_expert(x_AD, w_gate, sizes),
                        self._matmul_per_expert(x_AD, w_up, sizes))
        return self._matmul_per_expert(a, w_down, sizes)

    def forward_decode(self, x_TD: torch.Tensor, experts_TK: torch.Tensor,
                       weights_TK: torch.Tensor, weighted: bool = True) -> torch.Tensor:
        out_TD = torch.zeros_like(x_TD)
        for t, (row_e, row_w) in enumerate(zip(experts_TK.tolist(), weights_TK.tolist())):
            x_1D = x_TD[t:t + 1]
            for e, w in zip(row_e, row_w):
                y = self.expert_forward(x_1D if weighted else x_1D * w, e)
                out_TD[t:t + 1].add_(y, alpha=w if weighted else 1.0)
        return out_TD
