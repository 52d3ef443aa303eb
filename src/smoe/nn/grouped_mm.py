"""The grouped GEMM of the experts, usable in eager mode and under ``torch.compile`` alike.

Legend: A expert-sorted rows, I input width, O output width, E experts (groups).

``grouped_mm(x_AI, w_EIO, offs_E)`` computes, for each expert e, its contiguous row block
``x_AI[offs[e-1]:offs[e]] @ w_EIO[e]`` (``offs_E`` int32 cumulative row counts), exactly
``torch.nn.functional.grouped_mm(x_AI, w_EIO, offs=offs_E)``.

Why a wrapper: in torch 2.13, ``torch._grouped_mm`` runs on CPU in float32, bfloat16 and float16
in eager mode, but its compile-time rule (the meta function Inductor and fake tensors use)
accepts only bfloat16, so ``torch.compile`` of any float32 model whose experts use it raises.
Under compilation (``torch.compiler.is_compiling()``) the call therefore goes through
``smoe::grouped_mm``, a custom operator (``torch.library.custom_op``) with its own shape rule
(a fake implementation) and its own backward: the compiler treats it as one opaque kernel that
runs the same eager aten op, so the compiled model computes exactly what the eager one does.
Eager calls go straight to aten: the custom operator's Python dispatch costs tens of
microseconds per call, which tiny decode steps would feel.

Backward (per expert e, rows R_e): dx_R = dy_R @ w[e]^T (the same grouped GEMM with ``w``
transposed) and dw[e] = x_R^T @ dy_R, the "k-grouped" 2-D x 2-D form of ``_grouped_mm``, which
gives zeros for an expert without rows. The incoming gradient is made contiguous first: aten's
backward of ``_grouped_mm`` rejects zero-stride gradients (e.g. from ``out.sum()``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grouped_mm"]


@torch.library.custom_op("smoe::grouped_mm", mutates_args=())
def _grouped_mm_op(x_AI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x_AI, w_EIO, offs=offs_E)


@_grouped_mm_op.register_fake
def _(x_AI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    if x_AI.dim() != 2 or w_EIO.dim() != 3 or x_AI.shape[-1] != w_EIO.shape[1]:
        raise ValueError(f"smoe::grouped_mm needs x [A, I] and w [E, I, O], got "
                         f"{tuple(x_AI.shape)} and {tuple(w_EIO.shape)}")
    return x_AI.new_empty(x_AI.shape[0], w_EIO.shape[-1])


@torch.library.custom_op("smoe::grouped_mm_weight_grad", mutates_args=())
def _weight_grad_op(x_AI: torch.Tensor, dy_AO: torch.Tensor,
                    offs_E: torch.Tensor) -> torch.Tensor:
    """dw_EIO[e] = x_AI[rows of e]^T @ dy_AO[rows of e]."""
    return F.grouped_mm(x_AI.t(), dy_AO, offs=offs_E)


@_weight_grad_op.register_fake
def _(x_AI: torch.Tensor, dy_AO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return x_AI.new_empty(offs_E.shape[0], x_AI.shape[1], dy_AO.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x_AI, w_EIO, offs_E = inputs
    ctx.save_for_backward(x_AI, w_EIO, offs_E)


def _backward(ctx, dy_AO: torch.Tensor):
    x_AI, w_EIO, offs_E = ctx.saved_tensors
    dy_AO = dy_AO.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = _grouped_mm_op(dy_AO, w_EIO.transpose(1, 2), offs_E)
    if ctx.needs_input_grad[1]:
        dw = _weight_grad_op(x_AI, dy_AO, offs_E)
    return dx, dw, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(x_AI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Per-expert ``x @ w[e]`` over expert-contiguous rows (see the module docstring)."""
    # bfloat16 has a compile-time rule of its own, which lets the compiler pick its kernel.
    if torch.compiler.is_compiling() and x_AI.dtype != torch.bfloat16:
        return _grouped_mm_op(x_AI, w_EIO, offs_E)
    return F.grouped_mm(x_AI, w_EIO, offs=offs_E)
