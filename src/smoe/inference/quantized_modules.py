"""Quantized experts: inference-only modules that ``smoe.inference.quantize`` swaps into a built
model (the quantized linears for attention and dense parts, same schemes and kernels, are in
:mod:`smoe.inference.quantized_linears`).

Legend: E experts, N output rows of a projection, K its input width, g the int4 group size,
A expert-sorted rows, R any rows of one expert.

Schemes (weights only; activations run in bfloat16 into the kernels):

* ``int8``: symmetric, one scale per output channel: w[n, k] = q[n, k] * s[n], q in [-127, 127];
  kernel ``torch._weight_int8pack_mm`` (x_bf16 [R, K], q [N, K], s [N]).
* ``int4``: asymmetric, one (scale, zero) pair per group of g consecutive inputs of an output
  row, in the "tinygemm" convention of torch's int4 kernels: w = (q - 8) * scale + zero with
  q in [0, 15] (zero = min + 8 * scale); kernel ``torch._weight_int4pack_mm_for_cpu`` over a
  weight packed by ``torch._convert_weight_to_int4pack_for_cpu``. Group-wise scales follow
  GPTQ/AWQ practice (Frantar et al. 2022, arXiv 2210.17323; Lin et al. 2023, arXiv 2306.00978);
  we round to nearest (no calibration data needed).
* ``bf16``: the weights cast to bfloat16: the cheap baseline.

Why bfloat16 activations: on this CPU the int8/int4 kernels run 6-10x faster than an fp32 matmul
at batch 1 with bfloat16 inputs and 2-50x slower with float32 inputs (MEASURED.md,
BENCHMARKS.md "Quantized experts"). Scales are stored in bfloat16, the dtype the kernels read, so
the reference twin dequantizes exactly what the kernels use.

On-disk layout (what ``state_dict`` holds): int8 ``{proj}_qweight`` int8 [E, N, K] and
``{proj}_scales`` bf16 [E, N]; int4 ``{proj}_qweight`` uint8 [E, N, K/2] (two 4-bit values per
byte, the even input index in the low nibble) and ``{proj}_scales_zeros`` bf16 [E, K/g, N, 2].
The CPU int4 kernel wants its own blocked layout, which depends on the CPU: the module converts
to it on the first CPU call and converts back (exactly, see :func:`_unpack_cpu_int4`) when a
state dict is taken, so files stay portable. Where the kernels do not run (CUDA, MPS, an
N not divisible by 16) the module dequantizes the expert's weight per call: correct, slower.

Every module has :meth:`reference`: an fp32 twin with the dequantized weights, plain math, that
tests hold the kernels to.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from smoe.config import MoEConfig
from smoe.nn.experts import Experts, ExpertsBase, activate

__all__ = ["QuantizedExperts", "Int8Experts", "Int4Experts", "Bf16Experts", "EXPERT_SCHEMES",
           "Int4Layout",
           "GROUP_SIZES", "quantize_int8", "quantize_int4", "dequantize_int8", "dequantize_int4",
           "pack_nibbles", "unpack_nibbles"]

GROUP_SIZES = (32, 64, 128)
_INT4_CPU = hasattr(torch, "_weight_int4pack_mm_for_cpu")
_INT8_CPU = hasattr(torch, "_weight_int8pack_mm")


def _int8_kernel_fits(x: torch.Tensor) -> bool:
    """Whether ``torch._weight_int8pack_mm`` computes correctly here: a CPU tensor and an input
    width divisible by 16 (torch 2.13 returns garbage, or crashes, for K = 8, 24, 40)."""
    return _INT8_CPU and x.device.type == "cpu" and x.shape[-1] % 16 == 0


# -- quantization math (plain, vectorised over any leading dims) -----------------------------
def quantize_int8(w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [..., N, K], scales bf16 [..., N]): symmetric per output row, amax / 127.
    q is rounded against the bfloat16 scale the kernel will read."""
    w = w_NK.float()
    scale = (w.abs().amax(-1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(w / scale.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q_NK: torch.Tensor, scales_N: torch.Tensor) -> torch.Tensor:
    return q_NK.float() * scales_N.float().unsqueeze(-1)


def quantize_int4(w_NK: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q uint8 [..., N, K] in [0, 15], scales_zeros bf16 [..., K/g, N, 2]); see the module
    docstring for the convention. Rounded against the bfloat16 scale and zero."""
    *lead, N, K = w_NK.shape
    w = w_NK.float().reshape(*lead, N, K // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    q = torch.round((w - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1) + 8)
    q = q.clamp(0, 15).to(torch.uint8).reshape(*lead, N, K)
    sz = torch.stack([scale, zero], -1).transpose(-3, -2).contiguous()   # [..., K/g, N, 2]
    return q, sz


def dequantize_int4(q_NK: torch.Tensor, sz_GN2: torch.Tensor) -> torch.Tensor:
    *lead, N, K = q_NK.shape
    G = sz_GN2.shape[-3]
    sz = sz_GN2.float().transpose(-3, -2)                                # [..., N, G, 2]
    q = q_NK.float().reshape(*lead, N, G, K // G)
    return ((q - 8) * sz[..., 0:1] + sz[..., 1:2]).reshape(*lead, N, K)


def pack_nibbles(q_NK: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K] values 0-15 -> [..., K/2]: index 2i in the low nibble, 2i+1 in the high."""
    return (q_NK[..., 0::2] | (q_NK[..., 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(p_NH: torch.Tensor) -> torch.Tensor:
    return torch.stack([p_NH & 15, p_NH >> 4], -1).flatten(-2)


def _pack_cpu_int4(q_NK: torch.Tensor) -> torch.Tensor:
    return torch._convert_weight_to_int4pack_for_cpu(q_NK.to(torch.int32), 1)


def _unpack_cpu_int4(packed: torch.Tensor, K: int, group_size: int) -> torch.Tensor:
    """The 4-bit values [N, K] of a CPU-kernel-packed weight, exactly: the kernel applied to the
    identity with scale 1 and zero 0 returns q - 8, small integers that bfloat16 holds exactly."""
    N = packed.shape[0]
    sz = torch.zeros(K // group_size, N, 2, dtype=torch.bfloat16)
    sz[..., 0] = 1
    eye = torch.eye(K, dtype=torch.bfloat16)
    return (torch._weight_int4pack_mm_for_cpu(eye, packed, group_size, sz).t().float()
            + 8).round().to(torch.uint8)


def _source_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(w_in [E, out, in], w_down [E, D, F], interleaved) of an smoe experts module, whatever
    layout it reads (transposed, split gate/up): views where possible."""
    if hasattr(experts, "split_weights"):            # smoe.hf.experts.SplitExperts (DBRX)
        w_gate, w_up, w_down = experts.split_weights()
        return torch.cat([w_gate, w_up], 2).transpose(1, 2), w_down.transpose(1, 2), False
    if not hasattr(experts, "stacked_weights"):
        raise ValueError(f"cannot quantize {type(experts).__name__}: it exposes no stacked "
                         "weights (already quantized or offloaded?)")
    w = experts.stacked_weights()
    return w.w_in.transpose(1, 2), w.w_down.transpose(1, 2), w.interleaved


# -- experts ------------------------------------------------------------------------------
class QuantizedExperts(ExpertsBase, metaclass=abc.ABCMeta):
    """Base of the quantized experts: the experts protocol (``forward`` over expert-sorted rows
    with counts, ``expert_forward`` for one expert, ``num_experts``, ``config``) on top of one
    per-expert matmul that each scheme provides. Inference only."""

    scheme: ClassVar[str] = ""
    PROJS = ("in", "down")

    def __init__(self, config: MoEConfig, *, interleaved: bool = False) -> None:
        super().__init__(config)
        self.in_name = "gate_up_proj" if config.gated else "up_proj"
        self.interleaved = interleaved
        E, D, Fw = config.num_experts, config.hidden_size, config.expert_size
        in_rows = 2 * Fw if config.gated else Fw
        #: (N, K) of each projection, in the canonical out x in orientation.
        self.shapes = {"in": (in_rows, D), "down": (D, Fw)}
        if config.expert_bias:
            self.register_buffer(self.in_name + "_bias", torch.zeros(E, in_rows))
            self.register_buffer("down_proj_bias", torch.zeros(E, D))
        else:
            self.register_buffer(self.in_name + "_bias", None)
            self.register_buffer("down_proj_bias", None)

    def _name(self, proj: str) -> str:
        return self.in_name if proj == "in" else "down_proj"

    # -- what each scheme provides --------------------------------------------------------
    @abc.abstractmethod
    def _quantize_from(self, proj: str, w_ENK: torch.Tensor) -> None:
        """Pack the float weight ``w_ENK`` of ``proj`` (each scheme's subclass does it)."""

    @abc.abstractmethod
    def _matmul(self, x_RK: torch.Tensor, proj: str, e: int) -> torch.Tensor:
        """x (bfloat16) times expert e's weight of ``proj``, transposed: [R, N] bfloat16."""

    @abc.abstractmethod
    def dequantized(self, proj: str) -> torch.Tensor:
        """The weight the kernels compute with, as float32 [E, N, K]."""

    # -- building -------------------------------------------------------------------------
    @classmethod
    def from_experts(cls, experts: nn.Module, **kwargs) -> "QuantizedExperts":
        """Quantize an smoe experts module (``Experts`` in any layout, ``SplitExperts``),
        one expert at a time so the temporary float copies stay small."""
        w_in, w_down, interleaved = _source_weights(experts)
        q = cls(experts.config, interleaved=interleaved, **kwargs)
        with torch.no_grad():
            q._quantize_from("in", w_in.detach())
            q._quantize_from("down", w_down.detach())
            for name, src in ((q.in_name + "_bias", getattr(experts, "in_proj_bias", None)),
                              ("down_proj_bias", getattr(experts, "down_proj_bias", None))):
                if src is not None:
                    setattr(q, name, src.detach().float().clone())
        return q.eval()

    def reference(self) -> Experts:
        """The fp32 twin: an :class:`~smoe.nn.experts.Experts` holding the dequantized weights."""
        ref = Experts(self.config, backend="loop")
        ref.interleaved = self.interleaved
        with torch.no_grad():
            ref.in_proj.copy_(self.dequantized("in"))
            ref.down_proj.copy_(self.dequantized("down"))
            for name in (self.in_name + "_bias", "down_proj_bias"):
                b = getattr(self, name)
                if b is not None:
                    getattr(ref, name).copy_(b)
        return ref.eval()

    def weight_bytes(self) -> int:
        """Bytes of this module's tensors (what decoding reads, scales and biases included)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    # -- the experts protocol ---------------------------------------------------------------
    def _check_inference(self) -> None:
        if self.training:
            raise RuntimeError(f"{type(self).__name__} is for inference only (training "
                               "quantized experts is not supported): call model.eval(), or "
                               "train the float model and quantize it afterwards")

    def expert_forward(self, x_RD: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e on rows x: bfloat16 from the first kernel to the second (the kernels read
        and return bfloat16, and the activation of a bfloat16 product rounds no worse than the
        kernel's own input cast), float32 only where biases are added."""
        self._check_inference()
        c = self.config
        h = self._matmul(x_RD.to(torch.bfloat16), "in", e)
        b_in, b_down = getattr(self, self.in_name + "_bias"), self.down_proj_bias
        if b_in is not None:
            h = h.float() + b_in[e].float()
        a = activate(h, c.activation, c.activation_alpha, c.activation_limit, self.interleaved)
        y = self._matmul(a.to(torch.bfloat16), "down", e)
        if b_down is not None:
            y = y.float() + b_down[e].float()
        return y.to(x_RD.dtype)

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor,
                expert_A: torch.Tensor | None = None) -> torch.Tensor:
        """Each expert on its contiguous block of rows (experts without rows cost nothing)."""
        self._check_inference()
        parts, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                parts.append(self.expert_forward(x_AD[start:start + n], e))
                start += n
        return torch.cat(parts) if parts else x_AD.new_zeros(x_AD.shape)

    def extra_repr(self) -> str:
        c = self.config
        return (f"scheme={self.scheme}, experts={c.num_experts}, hidden={c.hidden_size}, "
                f"expert_size={c.expert_size}")


class Bf16Experts(QuantizedExperts):
    """Experts with bfloat16 weights ({proj} [E, N, K]): the cheap baseline."""

    scheme = "bf16"

    def __init__(self, config: MoEConfig, *, interleaved: bool = False) -> None:
        super().__init__(config, interleaved=interleaved)
        E = config.num_experts
        for proj, (N, K) in self.shapes.items():
            self.register_buffer(self._name(proj), torch.empty(E, N, K, dtype=torch.bfloat16))

    def _quantize_from(self, proj: str, w_ENK: torch.Tensor) -> None:
        setattr(self, self._name(proj), w_ENK.to(torch.bfloat16).contiguous())

    def _matmul(self, x_RK: torch.Tensor, proj: str, e: int) -> torch.Tensor:
        w = getattr(self, self._name(proj))[e]
        return torch.mm(x_RK, w.t().to(x_RK.dtype))

    def dequantized(self, proj: str) -> torch.Tensor:
        return getattr(self, self._name(proj)).float()


class Int8Experts(QuantizedExperts):
    """int8 weights, one bfloat16 scale per output channel (see the module docstring)."""

    scheme = "int8"

    def __init__(self, config: MoEConfig, *, interleaved: bool = False) -> None:
        super().__init__(config, interleaved=interleaved)
        E = config.num_experts
        for proj, (N, K) in self.shapes.items():
            name = self._name(proj)
            self.register_buffer(name + "_qweight", torch.empty(E, N, K, dtype=torch.int8))
            self.register_buffer(name + "_scales", torch.empty(E, N, dtype=torch.bfloat16))

    def _quantize_from(self, proj: str, w_ENK: torch.Tensor) -> None:
        name = self._name(proj)
        qs = [quantize_int8(w_ENK[e]) for e in range(w_ENK.shape[0])]
        setattr(self, name + "_qweight", torch.stack([q for q, _ in qs]))
        setattr(self, name + "_scales", torch.stack([s for _, s in qs]))

    def _matmul(self, x_RK: torch.Tensor, proj: str, e: int) -> torch.Tensor:
        name = self._name(proj)
        q, s = getattr(self, name + "_qweight")[e], getattr(self, name + "_scales")[e]
        s = s.to(x_RK.dtype)   # a no-op unless the model was cast (model.to(float16))
        if _int8_kernel_fits(x_RK):
            return torch._weight_int8pack_mm(x_RK.contiguous(), q, s)
        # Guarded fallback (no CPU kernel here): dequantize this expert's weight for the call.
        return torch.mm(x_RK, (q.to(x_RK.dtype) * s.to(x_RK.dtype).unsqueeze(-1)).t())

    def dequantized(self, proj: str) -> torch.Tensor:
        name = self._name(proj)
        return dequantize_int8(getattr(self, name + "_qweight"), getattr(self, name + "_scales"))


class Int4Layout:
    """What the int4 modules (experts here, linears in ``quantized_linears``) share: their
    ``qweight`` buffers hold either the portable packing or the CPU kernel's (converted on first
    use by ``_set_cpu_layout``); state dicts always hold the portable one, and loading resets to
    it. Listed before the ``nn.Module`` base so these overrides come first."""

    _cpu_layout: bool
    group_size: int
    _set_cpu_layout: Callable[[bool], None]   # each subclass converts its own buffers

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if self._cpu_layout:
            self._set_cpu_layout(False)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._cpu_layout = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class Int4Experts(Int4Layout, QuantizedExperts):
    """4-bit weights, one bfloat16 (scale, zero) per group of ``group_size`` inputs."""

    scheme = "int4"

    def __init__(self, config: MoEConfig, *, interleaved: bool = False,
                 group_size: int = 128) -> None:
        super().__init__(config, interleaved=interleaved)
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={group_size} is invalid: must be one of "
                             f"{', '.join(map(str, GROUP_SIZES))}")
        for proj, (N, K) in self.shapes.items():
            if K % group_size:
                raise ValueError(f"group_size={group_size} does not divide the input width "
                                 f"{K} of the experts' {self._name(proj)}: choose a group size "
                                 "that divides it")
        self.group_size = group_size
        E = config.num_experts
        for proj, (N, K) in self.shapes.items():
            name = self._name(proj)
            self.register_buffer(name + "_qweight", torch.empty(E, N, K // 2, dtype=torch.uint8))
            self.register_buffer(name + "_scales_zeros",
                                 torch.empty(E, K // group_size, N, 2, dtype=torch.bfloat16))
        # Whether the qweight buffers hold the CPU kernel's packing (else the portable one).
        self._cpu_layout = False
        # The CPU kernel packs N in blocks of 16.
        self._kernel_fits = _INT4_CPU and all(N % 16 == 0 for N, _ in self.shapes.values())

    def _quantize_from(self, proj: str, w_ENK: torch.Tensor) -> None:
        name = self._name(proj)
        qs = [quantize_int4(w_ENK[e], self.group_size) for e in range(w_ENK.shape[0])]
        setattr(self, name + "_qweight", torch.stack([pack_nibbles(q) for q, _ in qs]))
        setattr(self, name + "_scales_zeros", torch.stack([sz for _, sz in qs]))
        self._cpu_layout = False

    @torch.no_grad()
    def _set_cpu_layout(self, cpu: bool) -> None:
        """Convert the qweight buffers between the portable and the CPU-kernel packing."""
        if cpu == self._cpu_layout:
            return
        for proj, (N, K) in self.shapes.items():
            name = self._name(proj) + "_qweight"
            q_E = getattr(self, name)
            if cpu:
                new = [_pack_cpu_int4(unpack_nibbles(q_E[e])) for e in range(q_E.shape[0])]
            else:
                new = [pack_nibbles(_unpack_cpu_int4(q_E[e].cpu(), K, self.group_size))
                       .to(q_E.device) for e in range(q_E.shape[0])]
            setattr(self, name, torch.stack(new) if new else q_E)
        self._cpu_layout = cpu

    def _matmul(self, x_RK: torch.Tensor, proj: str, e: int) -> torch.Tensor:
        name = self._name(proj)
        sz = getattr(self, name + "_scales_zeros")[e]
        if self._kernel_fits and x_RK.device.type == "cpu":
            if not self._cpu_layout:
                self._set_cpu_layout(True)
            q = getattr(self, name + "_qweight")[e]
            return torch._weight_int4pack_mm_for_cpu(x_RK.contiguous(), q, self.group_size,
                                                     sz.to(x_RK.dtype))
        # Guarded fallback: dequantize this expert's weight for the call.
        if self._cpu_layout:
            self._set_cpu_layout(False)
        q = unpack_nibbles(getattr(self, name + "_qweight")[e])
        return torch.mm(x_RK, dequantize_int4(q, sz).to(x_RK.dtype).t())

    def dequantized(self, proj: str) -> torch.Tensor:
        if self._cpu_layout:
            self._set_cpu_layout(False)
        name = self._name(proj)
        return dequantize_int4(unpack_nibbles(getattr(self, name + "_qweight")),
                               getattr(self, name + "_scales_zeros"))


EXPERT_SCHEMES: dict[str, type[QuantizedExperts]] = {
    "int8": Int8Experts, "int4": Int4Experts, "bf16": Bf16Experts}
