"""Quantized ``nn.Linear`` replacements for the attention projections and the dense parts
(shared experts, dense FFN layers): the schemes and CPU kernels of the quantized experts
(:mod:`smoe.inference.quantized_modules`), on one 2-D weight. Inference only.

* :class:`Int8Linear`: int8 per output channel, ``torch._weight_int8pack_mm``;
* :class:`Int4Linear`: int4 group-wise (tinygemm convention), ``torch._weight_int4pack_mm_for_cpu``.
  At batch 1 the int4 kernel is the fastest per-call matmul on this CPU (BENCHMARKS.md, "Kernels
  at batch 1"), so where attention weights are a large share of the bytes a decode step reads,
  int4 attention is what moves decode speed; it costs more quality than int8 (measured there).

Both take bfloat16 activations into the kernel and return the caller's dtype; each has
:meth:`reference`, the fp32 ``nn.Linear`` with the dequantized weight, that tests hold it to.
On-disk layout as the experts' (portable nibble packing; the CPU kernel's own packing is made
on the first CPU call and undone when a state dict is taken).
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from smoe.inference.quantized_modules import (
    _INT4_CPU,
    Int4Layout,
    _int8_kernel_fits,
    _pack_cpu_int4,
    _unpack_cpu_int4,
    dequantize_int4,
    dequantize_int8,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)

__all__ = ["QuantizedLinear", "Int8Linear", "Int4Linear", "LINEAR_SCHEMES"]


class QuantizedLinear(nn.Module, metaclass=abc.ABCMeta):
    """Base: shape, bias, the inference-only check, bf16 in / caller's dtype out."""

    scheme = ""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @abc.abstractmethod
    def dequantized(self) -> torch.Tensor:
        """The weight the kernel computes with, float32 [out, in]."""

    @abc.abstractmethod
    def _matmul(self, x_RK: torch.Tensor) -> torch.Tensor:
        """x (bfloat16, contiguous) times the weight, transposed: [R, out] bfloat16."""

    @abc.abstractmethod
    def _quantize_from(self, w_NK: torch.Tensor) -> None:
        """Pack the float weight ``w_NK`` into this scheme's buffers."""

    @classmethod
    def from_linear(cls, lin: nn.Linear, **kwargs) -> "QuantizedLinear":
        q = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, **kwargs)
        with torch.no_grad():
            q._quantize_from(lin.weight.detach())
            if lin.bias is not None:
                q.bias = lin.bias.detach().float().clone()
        return q.eval()

    def reference(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError(f"{type(self).__name__} is for inference only: call model.eval()")
        x_RK = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = self._matmul(x_RK)
        if self.bias is not None:
            y = y.float() + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}"


class Int8Linear(QuantizedLinear):
    """``nn.Linear`` with int8 weights per output channel (bfloat16 activations into
    ``torch._weight_int8pack_mm``)."""

    scheme = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16))

    def _quantize_from(self, w_NK: torch.Tensor) -> None:
        self.qweight, self.scales = quantize_int8(w_NK)

    def dequantized(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def _matmul(self, x_RK: torch.Tensor) -> torch.Tensor:
        scales = self.scales.to(torch.bfloat16)
        if _int8_kernel_fits(x_RK):
            return torch._weight_int8pack_mm(x_RK, self.qweight, scales)
        return torch.mm(x_RK, (self.qweight.to(torch.bfloat16) * scales.unsqueeze(-1)).t())


class Int4Linear(Int4Layout, QuantizedLinear):
    """``nn.Linear`` with 4-bit weights, one bfloat16 (scale, zero) per ``group_size`` inputs:
    ``qweight`` uint8 [out, in/2] (portable packing), ``scales_zeros`` bf16 [in/g, out, 2]."""

    scheme = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 group_size: int = 128) -> None:
        super().__init__(in_features, out_features, bias)
        if in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features="
                             f"{in_features}: choose a group size that divides it")
        self.group_size = group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2,
                                                    dtype=torch.uint8))
        self.register_buffer("scales_zeros", torch.empty(in_features // group_size,
                                                         out_features, 2, dtype=torch.bfloat16))
        self._cpu_layout = False
        self._kernel_fits = _INT4_CPU and out_features % 16 == 0   # N packed in blocks of 16

    def _quantize_from(self, w_NK: torch.Tensor) -> None:
        q, self.scales_zeros = quantize_int4(w_NK, self.group_size)
        self.qweight = pack_nibbles(q)
        self._cpu_layout = False

    @torch.no_grad()
    def _set_cpu_layout(self, cpu: bool) -> None:
        if cpu == self._cpu_layout:
            return
        if cpu:
            self.qweight = _pack_cpu_int4(unpack_nibbles(self.qweight))
        else:
            self.qweight = pack_nibbles(_unpack_cpu_int4(self.qweight.cpu(), self.in_features,
                                                         self.group_size)).to(self.qweight.device)
        self._cpu_layout = cpu

    def dequantized(self) -> torch.Tensor:
        if self._cpu_layout:
            self._set_cpu_layout(False)
        return dequantize_int4(unpack_nibbles(self.qweight), self.scales_zeros)

    def _matmul(self, x_RK: torch.Tensor) -> torch.Tensor:
        if self._kernel_fits and x_RK.device.type == "cpu":
            if not self._cpu_layout:
                self._set_cpu_layout(True)
            return torch._weight_int4pack_mm_for_cpu(x_RK, self.qweight, self.group_size,
                                                     self.scales_zeros)
        if self._cpu_layout:   # guarded fallback: dequantize for the call
            self._set_cpu_layout(False)
        return torch.mm(x_RK, dequantize_int4(unpack_nibbles(self.qweight), self.scales_zeros)
                        .to(x_RK.dtype).t())


LINEAR_SCHEMES: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "int4": Int4Linear}
