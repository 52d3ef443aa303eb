"""Experts whose gate and up projections live in two tensors (DBRX), read without a copy.

Legend: E experts, D hidden, F expert inner width, A expert-sorted rows.

:class:`smoe.nn.experts.Experts` runs the gate and up projections as one GEMM over a fused
``gate_up_proj`` [E, 2F, D]. DBRX stores them apart (``w1`` and ``v1``, each [E*F, D]) and its
down projection as in x out (``w2`` [E*F, D]); fusing them would need a second copy of the
weights. :class:`SplitExperts` keeps the three tensors as they are and runs one more GEMM. It
implements the experts protocol (:class:`smoe.nn.experts.ExpertsBase`): the fast forward over
expert-sorted rows and the per-expert reference.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe.config import MoEConfig
from smoe.nn.experts import (
    BACKENDS,
    ExpertsBase,
    gated_activation,
    grouped_mm_aligned,
    grouped_mm_runs_on,
    matmul_per_expert,
)
from smoe.nn.grouped_mm import grouped_mm

__all__ = ["SplitExperts"]


class SplitExperts(ExpertsBase):
    """Gated experts with ``gate_proj`` and ``up_proj`` apart, each viewable as [E, F, D]
    (out x in), and ``down_proj`` viewable as [E, D, F], or as [E, F, D] with ``transposed``.

    The three parameters are assigned by the caller (interop); shapes are only viewed, never
    copied. Biases are not supported. ``backend``: ``grouped_mm``, ``loop`` or ``auto`` (as for
    :class:`smoe.nn.Experts`).
    """

    def __init__(self, config: MoEConfig, backend: str = "auto") -> None:
        if not config.gated or config.expert_bias:
            raise ValueError("SplitExperts needs a gated activation and no expert biases")
        super().__init__(config)
        E, D, Fw = config.num_experts, config.hidden_size, config.expert_size
        self.gate_proj = nn.Parameter(torch.empty(E, Fw, D))
        self.up_proj = nn.Parameter(torch.empty(E, Fw, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, Fw))
        self.transposed = False
        self.interleaved = False  # set by the patch like on Experts; the split layout has none
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"backend={name!r} is invalid: must be one of {', '.join(BACKENDS)}")
        self._backend = name

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
        backend = self._backend
        if backend == "auto":
            inner = self.config.expert_size
            fits = (grouped_mm_runs_on(x_AD.device, x_AD.dtype)
                    and grouped_mm_aligned(x_AD, w_gate, w_down, inner)
                    and grouped_mm_aligned(x_AD, w_up, w_down, inner))
            backend = "grouped_mm" if fits else "loop"
        if backend == "grouped_mm":
            offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
            a = self._gated(grouped_mm(x_AD, w_gate, offs_E), grouped_mm(x_AD, w_up, offs_E))
            return grouped_mm(a, w_down, offs_E)
        sizes = counts_E.tolist()
        a = self._gated(matmul_per_expert(x_AD, w_gate, sizes),
                        matmul_per_expert(x_AD, w_up, sizes))
        return matmul_per_expert(a, w_down, sizes)
