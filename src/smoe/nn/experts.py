"""Routed experts: the experts protocol, stacked weights, and a registry of compute backends.

Legend: E experts, D hidden, F expert inner width, I = 2F (gated) or F, A expert-sorted rows
(see ``dispatch``), R any rows.

**The protocol** (:class:`ExpertsBase`). Whatever sits in ``MoELayer.experts`` -- the stacked
experts below, DBRX's split layout, quantized or offloaded experts, an expert-parallel shard --
provides

* ``forward(x_AD, counts_E, expert_A=None) -> y_AD``: every (local) expert on its contiguous
  block of expert-sorted rows (``counts_E[e]`` rows for expert ``e``; ``expert_A`` the expert
  of each row, needed only for biases);
* ``expert_forward(x_RD, e) -> y_RD``: one expert on any rows, plain math. It is the reference
  the fast forward is judged against, and the small-batch decode shortcut of the dispatcher is
  built on it, so a swapped-in module is used on every path;
* ``num_experts`` (local count) and ``config`` (the :class:`~smoe.config.MoEConfig`).

:class:`ExpertsBase` gives a default ``forward`` that loops ``expert_forward`` over the blocks,
so a new format needs only ``expert_forward`` to be correct, and a fast ``forward`` to be fast.

**Stacked weights** (:class:`Experts`). Weights follow the ``nn.Linear`` convention (out x in),
stacked on a leading expert dimension, the layout transformers 5.x uses for Mixtral/Qwen-MoE/
OLMoE, so that interop can hand the model's own parameters to smoe without a copy:

* gated activations: ``gate_up_proj`` [E, 2F, D] (gate rows first, then up rows);
* plain activations: ``up_proj`` [E, F, D];
* ``down_proj`` [E, D, F]; optional biases ``gate_up_proj_bias`` / ``up_proj_bias`` [E, *],
  ``down_proj_bias`` [E, D].

Other formats' storage (gpt-oss/Llama-4 store in x out: ``transposed``; gpt-oss interleaves the
gate/up columns: ``interleaved``) is read through one accessor, :meth:`Experts.stacked_weights`,
which returns :class:`StackedWeights` views oriented for ``x @ w``; the backends see only those.

**Backends** (``Experts.backend``, registry :data:`EXPERTS_BACKENDS`):

* ``grouped_mm``: one grouped GEMM per projection over expert-contiguous rows
  (``torch.nn.functional.grouped_mm``, float32/bfloat16/float16, CPU and CUDA);
* ``loop``: ``split`` by counts and one matmul per expert over ``unbind`` views (any dtype;
  avoids the full-size zero gradient per expert that indexing ``w[e]`` causes in backward);
* ``auto`` (default): ``grouped_mm`` where it supports the dtype and the sizes (its operands'
  leading strides must be multiples of 16 bytes: D and F divisible by 4 in float32), else
  ``loop``.

Each backend is judged against :meth:`Experts.expert_forward` in ``tests/test_layer.py``.
:func:`register_experts_backend` adds one (a Triton or quantized kernel) without editing this file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smoe.config import GATED_ACTIVATIONS, MoEConfig
from smoe.nn.grouped_mm import grouped_mm

__all__ = ["ExpertsBase", "Experts", "StackedWeights", "ExpertsBackend", "EXPERTS_BACKENDS",
           "register_experts_backend", "DenseMLP", "activate", "gated_activation", "BACKENDS",
           "GROUPED_MM_DTYPES", "grouped_mm_aligned", "grouped_mm_runs_on", "matmul_per_expert"]

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


def grouped_mm_aligned(x_AD: torch.Tensor, w_in: torch.Tensor, w_down: torch.Tensor,
                       inner: int) -> bool:
    """Whether ``grouped_mm`` accepts these operands: each matrix's leading stride (and the
    width ``inner`` of the contiguous activation fed to the second GEMM) must be a multiple of
    16 bytes, so e.g. float32 needs D and F divisible by 4, bfloat16 by 8."""
    align = 16 // x_AD.element_size()
    leading = [max(t.stride()[-2:]) for t in (x_AD, w_in, w_down)]
    return all(s % align == 0 for s in leading + [inner])


def matmul_per_expert(x_AI: torch.Tensor, w_EIO: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Row block e of x times w[e]; experts with no rows cost nothing."""
    parts = [x_e @ w_e for x_e, w_e, n in zip(x_AI.split(sizes), w_EIO.unbind(0), sizes) if n]
    # No rows at all: an empty product that stays in the autograd graph (not new_zeros).
    return torch.cat(parts) if parts else x_AI @ w_EIO[0]


def add_bias(h: torch.Tensor, bias_E: torch.Tensor | None,
             expert_A: torch.Tensor | None) -> torch.Tensor:
    """h + bias of each row's expert (nothing without a bias)."""
    if bias_E is None:
        return h
    if expert_A is None:
        raise ValueError("expert biases need expert_A, the expert of each row")
    return h + bias_E[expert_A].to(h.dtype)


# -- the protocol -----------------------------------------------------------------------------
class ExpertsBase(nn.Module):
    """The experts protocol (see the module docstring): subclass it, or provide the same
    methods and attributes. Subclasses own their parameters; nothing here creates any, so a
    format never has to delete a parent's parameter.

    ``num_experts`` is the number of experts this module holds (the local count under expert
    parallelism); ``config.num_experts`` stays the layer's global count.
    """

    def __init__(self, config: MoEConfig, num_experts: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts if num_experts is None else num_experts

    def expert_forward(self, x_RD: torch.Tensor, e: int) -> torch.Tensor:
        """Local expert ``e`` on rows ``x_RD``: y_RD, plain math (the reference)."""
        raise NotImplementedError(f"{type(self).__name__} must implement expert_forward")

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor,
                expert_A: torch.Tensor | None = None) -> torch.Tensor:
        """Every expert on its contiguous rows, by :meth:`expert_forward` (correct, not fast)."""
        sizes = counts_E.tolist()
        parts = [self.expert_forward(x_e, e) for e, (x_e, n)
                 in enumerate(zip(x_AD.split(sizes), sizes)) if n]
        if not parts:  # no rows (A = 0): an empty output that stays in the autograd graph
            return x_AD * 0
        return torch.cat(parts)


# -- the stacked layout and its backends --------------------------------------------------
@dataclass(frozen=True)
class StackedWeights:
    """Views of stacked expert weights oriented for ``x @ w`` (no copy), whatever the storage.

    w_in [E, D, I], w_down [E, F, D]; biases [E, I] / [E, D] or None; ``interleaved``: gate/up
    columns of ``w_in`` alternate (gpt-oss) instead of forming two halves.
    """

    w_in: torch.Tensor
    w_down: torch.Tensor
    b_in: torch.Tensor | None
    b_down: torch.Tensor | None
    interleaved: bool


ActivationFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExpertsBackend:
    """One way to compute stacked experts over expert-sorted rows.

    ``run(w, x_AD, counts_E, expert_A, act) -> y_AD``; ``supports(w, x_AD, inner)`` says whether
    it can run these operands (``auto`` takes the first backend in its preference that does).
    """

    run: Callable[[StackedWeights, torch.Tensor, torch.Tensor, torch.Tensor | None,
                   ActivationFn], torch.Tensor]
    supports: Callable[[StackedWeights, torch.Tensor, int], bool] = lambda w, x, inner: True


def _run_grouped_mm(w: StackedWeights, x_AD: torch.Tensor, counts_E: torch.Tensor,
                    expert_A: torch.Tensor | None, act: ActivationFn) -> torch.Tensor:
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    h = grouped_mm(x_AD, w.w_in, offs_E)
    h = add_bias(h, w.b_in, expert_A)
    y = grouped_mm(act(h), w.w_down, offs_E)
    return add_bias(y, w.b_down, expert_A)


#: (device type, device index, dtype) -> whether the grouped GEMM kernel runs there.
_GROUPED_MM_RUNS: dict[tuple[str, int | None, torch.dtype], bool] = {}


def grouped_mm_runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` has a kernel for ``dtype`` on ``device``.

    On CPU torch 2.13 runs float32, bfloat16 and float16. Elsewhere support depends on the
    torch build and the chip (CUDA's kernel, for one, has long been bfloat16-only on
    Hopper-class GPUs), so the first call per (device, dtype) tries a tiny product and the answer
    is remembered: a missing kernel falls back to the ``loop`` backend instead of raising.
    """
    if dtype not in GROUPED_MM_DTYPES:
        return False
    if device.type == "cpu" or device.type == "meta":
        return True
    key = (device.type, device.index, dtype)
    if key not in _GROUPED_MM_RUNS:
        if torch.compiler.is_compiling():  # no probing inside a trace; decide eagerly first
            return False
        try:
            x_AI = torch.zeros(16, 16, device=device, dtype=dtype)
            w_EIO = torch.zeros(2, 16, 16, device=device, dtype=dtype)
            offs_E = torch.tensor([8, 16], device=device, dtype=torch.int32)
            torch.nn.functional.grouped_mm(x_AI, w_EIO, offs=offs_E)
            _GROUPED_MM_RUNS[key] = True
        except (RuntimeError, NotImplementedError, AttributeError, TypeError):
            _GROUPED_MM_RUNS[key] = False
    return _GROUPED_MM_RUNS[key]


def _grouped_mm_supports(w: StackedWeights, x_AD: torch.Tensor, inner: int) -> bool:
    return (grouped_mm_runs_on(x_AD.device, x_AD.dtype)
            and grouped_mm_aligned(x_AD, w.w_in, w.w_down, inner))


def _run_loop(w: StackedWeights, x_AD: torch.Tensor, counts_E: torch.Tensor,
              expert_A: torch.Tensor | None, act: ActivationFn) -> torch.Tensor:
    sizes = counts_E.tolist()
    h = add_bias(matmul_per_expert(x_AD, w.w_in, sizes), w.b_in, expert_A)
    y = matmul_per_expert(act(h), w.w_down, sizes)
    return add_bias(y, w.b_down, expert_A)


#: name -> backend. ``auto`` is resolved per call through :data:`AUTO_PREFERENCE`.
EXPERTS_BACKENDS: dict[str, ExpertsBackend | None] = {
    "auto": None,
    "grouped_mm": ExpertsBackend(_run_grouped_mm, _grouped_mm_supports),
    "loop": ExpertsBackend(_run_loop),
}
#: The order in which ``auto`` tries backends; ``loop`` runs anything.
AUTO_PREFERENCE = ["grouped_mm", "loop"]
BACKENDS = ("auto", "grouped_mm", "loop")  # the built-in names (kept for callers)


def register_experts_backend(name: str, backend: ExpertsBackend, *,
                             prefer_in_auto: bool = False) -> None:
    """Add a backend (e.g. a Triton kernel) under ``name``; with ``prefer_in_auto`` ``auto``
    tries it first wherever its ``supports`` says yes."""
    if not name or name == "auto":
        raise ValueError(f"name={name!r} is invalid: a non-empty name other than 'auto'")
    EXPERTS_BACKENDS[name] = backend
    if prefer_in_auto and name not in AUTO_PREFERENCE:
        AUTO_PREFERENCE.insert(0, name)


class Experts(ExpertsBase):
    """E feed-forward experts with stacked weights; see the module docstring for the layout."""

    def __init__(self, config: MoEConfig, backend: str = "auto") -> None:
        super().__init__(config)
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
            self.register_parameter("down_proj_bias", None)
        # Interop may set these to read another layout without copying (gpt-oss interleaves
        # gate/up columns and stores weights as in x out); only stacked_weights() reads them.
        self.interleaved = False
        self.transposed = False
        self.backend = backend
        nn.init.normal_(self.in_proj, std=config.init_std)
        nn.init.normal_(self.down_proj, std=config.init_std)

    # -- the one accessor of the storage layout -------------------------------------------
    @property
    def in_proj(self) -> torch.Tensor:
        """The stored input projection (``gate_up_proj`` or ``up_proj``), as stored."""
        return getattr(self, self.in_name)

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return getattr(self, self.in_name + "_bias")

    def stacked_weights(self) -> StackedWeights:
        """The weights as :class:`StackedWeights` views for ``x @ w``, whatever the storage."""
        w_in, w_down = self.in_proj, self.down_proj
        if not self.transposed:
            w_in, w_down = w_in.transpose(1, 2), w_down.transpose(1, 2)
        return StackedWeights(w_in, w_down, self.in_proj_bias, self.down_proj_bias,
                              self.interleaved)

    def weights_in_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_in [E, D, I], w_down [E, F, D]) oriented for ``x @ w`` (views, no copy)."""
        w = self.stacked_weights()
        return w.w_in, w.w_down

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in EXPERTS_BACKENDS:
            raise ValueError(f"backend={name!r} is invalid: must be one of "
                             f"{', '.join(EXPERTS_BACKENDS)}")
        self._backend = name

    def _act(self, h: torch.Tensor, interleaved: bool | None = None) -> torch.Tensor:
        c = self.config
        return activate(h, c.activation, c.activation_alpha, c.activation_limit,
                        self.interleaved if interleaved is None else interleaved)

    # -- the reference: one expert, plain matmuls ----------------------------------------
    def expert_forward(self, x_RD: torch.Tensor, e: int) -> torch.Tensor:
        # The decode shortcut calls this K times per token, so it reads the stored tensors
        # directly (the math of stacked_weights(), without building every expert's views or
        # going through nn.Module attribute lookup).
        p = self._parameters
        w_in, w_down = p[self.in_name][e], p["down_proj"][e]
        if self.transposed:
            h = x_RD @ w_in
        else:
            h = F.linear(x_RD, w_in)
        b_in = p.get(self.in_name + "_bias")
        if b_in is not None:
            h = h + b_in[e]
        a = self._act(h)
        y = a @ w_down if self.transposed else F.linear(a, w_down)
        b_down = p.get("down_proj_bias")
        if b_down is not None:
            y = y + b_down[e]
        return y

    # -- the fast path: all experts over expert-sorted rows --------------------------------
    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor,
                expert_A: torch.Tensor | None = None) -> torch.Tensor:
        """Run each expert on its contiguous rows with the chosen backend: y_AD."""
        w = self.stacked_weights()
        name = self._backend
        if name == "auto":
            inner = self.config.expert_size
            name = next(n for n in AUTO_PREFERENCE
                        if EXPERTS_BACKENDS[n].supports(w, x_AD, inner))
        return EXPERTS_BACKENDS[name].run(
            w, x_AD, counts_E, expert_A, lambda h: self._act(h, w.interleaved))

    # Old names kept for smoe.hf.experts.SplitExperts (which subclasses this class).
    _matmul_per_expert = staticmethod(matmul_per_expert)
    _add_bias = staticmethod(add_bias)


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
