"""Routed experts as stacked weights, with interchangeable compute backends.

Legend: E experts, D hidden, F expert inner width, A expert-sorted rows (see ``dispatch``).

Weights follow the ``nn.Linear`` convention (out x in), stacked on a leading expert dimension,
the same layout transformers 5.x uses for Mixtral/Qwen-MoE/OLMoE, so that interop can hand the
model's own parameters to smoe without a copy:

* gated activations: ``gate_up_proj`` [E, 2F, D] (gate rows first, then up rows);
* plain activations: ``up_proj`` [E, F, D];
* ``down_proj`` [E, D, F]; optional biases ``gate_up_proj_bias`` / ``up_proj_bias`` [E, *],
  ``down_proj_bias`` [E, D].

Backends (``Experts.backend``):

* ``grouped_mm``: one grouped GEMM per projection over expert-contiguous rows
  (``torch.nn.functional.grouped_mm``, float32/bfloat16/float16, CPU and CUDA);
* ``loop``: ``split`` by counts and one matmul per expert over ``unbind`` views (any dtype;
  avoids the full-size zero gradient per expert that indexing ``w[e]`` causes in backward);
* ``auto`` (default): ``grouped_mm`` where it supports the dtype and the sizes (its operands'
  leading strides must be multiples of 16 bytes: D and F divisible by 4 in float32), else
  ``loop``.

:meth:`Experts.expert_forward` runs one expert on any rows with plain matmuls: the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smoe.config import GATED_ACTIVATIONS, MoEConfig
from smoe.nn.grouped_mm import grouped_mm

__all__ = ["Experts", "DenseMLP", "activate", "gated_activation", "BACKENDS"]

BACKENDS = ("auto", "grouped_mm", "loop")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def activate(h: torch.Tensor, activation: str, alpha: float = 1.702,
             limit: float = 7.0, interleaved: bool = False) -> torch.Tensor:
    """The expert nonlinearity on the up-projected rows ``h`` ([..., 2F] gated, [..., F] plain).

    ``swiglu_oai`` is gpt-oss's clamped SwiGLU: gate clamped above at ``limit``, up clamped to
    [-limit, limit], out = (up + 1) * gate * sigmoid(alpha * gate).
    ``interleaved`` reads gate/up from even/odd columns instead of the two halves.
    """
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "silu":
        return F.silu(h)
    if interleaved:
        gate, up = h[..., ::2], h[..., 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    return gated_activation(gate, up, activation, alpha, limit)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str,
                     alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """act(gate) * up for the gated activations (see :func:`activate`)."""
    if activation == "swiglu":
        return F.silu(gate) * up
    if activation == "geglu":
        return F.gelu(gate) * up
    if activation == "geglu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if activation == "swiglu_oai":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    raise ValueError(f"activation={activation!r} is invalid")


def _grouped_mm_aligned(x_AD: torch.Tensor, w_in: torch.Tensor, w_down: torch.Tensor,
                        inner: int) -> bool:
    """Whether ``grouped_mm`` accepts these operands: each matrix's leading stride (and the
    width ``inner`` of the contiguous activation fed to the second GEMM) must be a multiple of
    16 bytes, so e.g. float32 needs D and F divisible by 4, bfloat16 by 8."""
    align = 16 // x_AD.element_size()
    leading = [max(t.stride()[-2:]) for t in (x_AD, w_in, w_down)]
    return all(s % align == 0 for s in leading + [inner])


class Experts(nn.Module):
    """E feed-forward experts with stacked weights; see the module docstring for the layout."""

    def __init__(self, config: MoEConfig, backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        E, D, Fw = config.num_experts, config.hidden_size, config.expert_size
        in_rows = 2 * Fw if config.gated else Fw
        self.in_name = "gate_up_proj" if config.gated else "up_proj"
        self.register_parameter(self.in_name, nn.Parameter(torch.empty(E, in_rows, D)))
        self.down_proj = nn.Parameter(torch.empty(E, D, Fw))
        if config.expert_bias:
            self.register_parameter(self.in_name + "_bias", nn.Parameter(torch.zeros(E, in_rows)))
            self.down_proj_bias = nn.Parameter(torch.zeros(E, D))
        else:
            self.register_parameter(self.in_name + "_bias", None)
            self.down_proj_bias = None
        # Interop may set these to read another layout without copying (gpt-oss interleaves
        # gate/up columns and stores weights as in x out).
        self.interleaved = False
        self.transposed = False
        self.backend = backend
        nn.init.normal_(self.in_proj, std=config.init_std)
        nn.init.normal_(self.down_proj, std=config.init_std)

    # -- weights in the canonical [E, out, in] orientation ----------------------------------
    @property
    def in_proj(self) -> torch.Tensor:
        return getattr(self, self.in_name)

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return getattr(self, self.in_name + "_bias")

    def weights_in_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_in [E, in, out_in], w_down [E, F, D]) oriented for ``x @ w`` (views, no copy)."""
        if self.transposed:
            return self.in_proj, self.down_proj
        return self.in_proj.transpose(1, 2), self.down_proj.transpose(1, 2)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"backend={name!r} is invalid: must be one of {', '.join(BACKENDS)}")
        self._backend = name

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        c = self.config
        return activate(h, c.activation, c.activation_alpha, c.activation_limit, self.interleaved)

    # -- the reference: one expert, plain matmuls ----------------------------------------
    def expert_forward(self, x_RD: torch.Tensor, e: int) -> torch.Tensor:
        w_in, w_down = self.weights_in_out()
        h = x_RD @ w_in[e]
        if self.in_proj_bias is not None:
            h = h + self.in_proj_bias[e]
        y = self._act(h) @ w_down[e]
        if self.down_proj_bias is not None:
            y = y + self.down_proj_bias[e]
        return y

    # -- the fast paths: all experts over expert-sorted rows ------------------------------
    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor,
                expert_A: torch.Tensor | None = None) -> torch.Tensor:
        """Run each expert on its contiguous rows: y_AD. ``expert_A`` is needed for biases."""
        backend = self._backend
        w_in, w_down = self.weights_in_out()
        if backend == "auto":
            fits = x_AD.dtype in _GROUPED_MM_DTYPES and _grouped_mm_aligned(
                x_AD, w_in, w_down, self.config.expert_size)
            backend = "grouped_mm" if fits else "loop"
        if backend == "grouped_mm":
            offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
            h = grouped_mm(x_AD, w_in, offs_E)
            h = self._add_bias(h, self.in_proj_bias, expert_A)
            y = grouped_mm(self._act(h), w_down, offs_E)
        else:
            sizes = counts_E.tolist()
            h = self._matmul_per_expert(x_AD, w_in, sizes)
            h = self._add_bias(h, self.in_proj_bias, expert_A)
            y = self._matmul_per_expert(self._act(h), w_down, sizes)
        return self._add_bias(y, self.down_proj_bias, expert_A)

    def forward_decode(self, x_TD: torch.Tensor, experts_TK: torch.Tensor,
                       weights_TK: torch.Tensor, weighted: bool = True) -> torch.Tensor:
        """Few tokens, no autograd (decoding): walk the (token, expert) pairs and read only the
        chosen experts' weights, with no sort, gather or scatter. Memory-bound like a dense FFN
        of width K*F. Reads routing decisions on the host, so it is meant for CPU inference.
        """
        # Each op here costs a few microseconds of dispatch, comparable to reading one small
        # expert's weights, so the loop keeps to torch.mm on views and in-place updates.
        w_in, w_down = self.weights_in_out()
        b_in, b_down = self.in_proj_bias, self.down_proj_bias
        rows = []
        for t, (row_e, row_w) in enumerate(zip(experts_TK.tolist(), weights_TK.tolist())):
            x_1D = x_TD[t:t + 1]
            acc_1D = None
            for e, w in zip(row_e, row_w):
                h = torch.mm(x_1D if weighted else x_1D * w, w_in[e])
                if b_in is not None:
                    h += b_in[e]
                y = torch.mm(self._act(h), w_down[e])
                if b_down is not None:
                    y += b_down[e]
                scale = w if weighted else 1.0
                acc_1D = y.mul_(scale) if acc_1D is None else acc_1D.add_(y, alpha=scale)
            rows.append(acc_1D if acc_1D is not None else torch.zeros_like(x_1D))
        if not rows:
            return torch.zeros_like(x_TD)
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    @staticmethod
    def _matmul_per_expert(x_AI: torch.Tensor, w_EIO: torch.Tensor,
                           sizes: list[int]) -> torch.Tensor:
        """Row block e of x times w[e]; experts with no rows cost nothing."""
        parts = [x_e @ w_e for x_e, w_e, n in zip(x_AI.split(sizes), w_EIO.unbind(0), sizes)
                 if n]
        # No rows at all: an empty product that stays in the autograd graph (not new_zeros).
        return torch.cat(parts) if parts else x_AI @ w_EIO[0]

    @staticmethod
    def _add_bias(h: torch.Tensor, bias_E: torch.Tensor | None,
                  expert_A: torch.Tensor | None) -> torch.Tensor:
        if bias_E is None:
            return h
        if expert_A is None:
            raise ValueError("expert biases need expert_A, the expert of each row")
        return h + bias_E[expert_A].to(h.dtype)


class DenseMLP(nn.Module):
    """A plain feed-forward block (shared experts, dense layers): same activations as experts."""

    def __init__(self, hidden_size: int, inner_size: int, activation: str,
                 bias: bool = False, init_std: float = 0.02) -> None:
        super().__init__()
        self.activation = activation
        gated = activation in GATED_ACTIVATIONS
        self.gated = gated
        if gated:
            self.gate_proj = nn.Linear(hidden_size, inner_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, inner_size, bias=bias)
        self.down_proj = nn.Linear(inner_size, hidden_size, bias=bias)
        for lin in (self.up_proj, self.down_proj) + ((self.gate_proj,) if gated else ()):
            nn.init.normal_(lin.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(gated_activation(self.gate_proj(x), self.up_proj(x),
                                                   self.activation))
        return self.down_proj(activate(self.up_proj(x), self.activation))
