"""The expert-parallel communication model: bytes and time of the all-to-all dispatch and
combine of one MoE layer at EP degree D.

Bytes. A token on rank s routed to K experts. With ``E`` experts (plus ``R`` redundant replicas)
spread over D ranks, a fraction ``f_local`` of its K (token, expert) pairs find their expert on
rank s; uniform routing with experts placed evenly gives ``f_local = (E + R) / (D * E)`` capped
at 1 (a replica on the token's own rank is taken when there is one), or pass it measured.

* ``per_expert`` (smoe's all-to-all dispatcher, DeepEP's low-latency kernels): every remote
  (token, expert) pair is one row on the wire, so a token sends ``K * (1 - f_local)`` rows of
  ``hidden`` values in dispatch and receives as many in combine.
* ``per_rank`` (DeepEP's normal kernels, Megatron's deduplicated dispatch): a token goes once to
  every rank that holds at least one of its experts, and one partial sum per such rank comes back.
  Under uniform top-K without replacement a rank holding m of the E experts is hit with
  probability ``1 - C(E - m, K) / C(E, K)``.
* Capacity-factor routing pads every expert's buffer to ``ceil(cf * T * K / E)`` rows, so the
  all-to-all moves a fixed ``K * cf * (1 - 1/D)`` rows per token whatever the routing.

Time. ``latency + max(intra-node bytes / NVLink bandwidth, inter-node bytes / network
bandwidth)`` per phase (the two links run in parallel), for the tokens of one rank; with nodes of
G GPUs a remote destination is inside the node with probability ``(G - 1) / (D - 1)``. The
latency is one fixed cost per kernel (launch, synchronisation, the first message); it is the
single constant fitted against DeepEP's published H800 figures (see BENCHMARKS.md), the
bandwidths are the links' stated maxima.

References: DeepSeek-AI 2024, "DeepSeek-V3 Technical Report" (arXiv 2412.19437), sec. 3.2.2;
DeepEP (github.com/deepseek-ai/DeepEP) README performance tables; Lepikhin et al. 2020
(GShard, arXiv 2006.16668) for capacity-factor all-to-all.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DEEPEP_LOW_LATENCY", "KERNEL_LATENCY", "CommConfig", "CommResult", "a2a_bytes_from_routing",
           "comm_per_layer", "deepep_config", "rank_hit_probability"]

_DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0}
#: Fixed cost of one dispatch or combine kernel (launch, barrier, first message): the one
#: constant fitted to DeepEP's low-latency H800 table (EP 16 dispatch: 118 us measured, 76 us of
#: it RDMA transfer at 50 GB/s). The default latency of :class:`CommConfig`.
KERNEL_LATENCY = 40e-6


@dataclass(frozen=True)
class CommConfig:
    """One MoE layer's all-to-all at EP degree ``ep``.

    hidden, top_k, num_experts: the layer. ep: ranks holding experts. redundant: extra expert
    replicas (EPLB). dispatch_dtype / combine_dtype: ``bf16``, ``fp8`` (adds one fp32 scale per
    128 values, as DeepEP's FP8 dispatch) or ``fp32``. capacity_factor: ``None`` for dropless.
    local_fraction: measured share of (token, expert) pairs served on the token's own rank
    (``None``: the uniform value). mode: ``per_expert`` or ``per_rank`` (module docstring).
    nodes_of: GPUs per node (``None``: one node). intra_bw / inter_bw: bytes/s per GPU and
    direction; latency: seconds per phase (default :data:`KERNEL_LATENCY`).
    """

    hidden: int
    top_k: int
    num_experts: int
    ep: int
    redundant: int = 0
    dispatch_dtype: str = "bf16"
    combine_dtype: str = "bf16"
    capacity_factor: float | None = None
    local_fraction: float | None = None
    mode: str = "per_expert"
    nodes_of: int | None = None
    intra_bw: float = 450e9
    inter_bw: float = 50e9
    latency: float = 40e-6

    def __post_init__(self) -> None:
        for name in ("hidden", "top_k", "num_experts", "ep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} is larger than num_experts={self.num_experts}")
        if self.redundant < 0:
            raise ValueError(f"redundant must be >= 0, got {self.redundant}")
        if (self.num_experts + self.redundant) % self.ep:
            raise ValueError(f"ep={self.ep} does not divide num_experts + redundant = "
                             f"{self.num_experts + self.redundant}")
        for name in ("dispatch_dtype", "combine_dtype"):
            if getattr(self, name) not in _DTYPE_BYTES:
                raise ValueError(f"{name}: unknown {getattr(self, name)!r}; choose from "
                                 f"{', '.join(_DTYPE_BYTES)}")
        if self.mode not in ("per_expert", "per_rank"):
            raise ValueError(f"mode must be per_expert or per_rank, got {self.mode!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")
        if self.local_fraction is not None and not 0 <= self.local_fraction <= 1:
            raise ValueError(f"local_fraction must be in [0, 1], got {self.local_fraction}")
        if self.nodes_of is not None and (self.nodes_of < 1 or self.ep % min(self.nodes_of,
                                                                              self.ep)):
            raise ValueError(f"nodes_of={self.nodes_of} must divide ep={self.ep}")
        for name in ("intra_bw", "inter_bw"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.latency < 0:
            raise ValueError("latency must be >= 0")

    def token_bytes(self, dtype: str) -> float:
        """Bytes of one token's hidden vector on the wire (FP8 carries one fp32 scale per 128)."""
        b = self.hidden * _DTYPE_BYTES[dtype]
        return b + (math.ceil(self.hidden / 128) * 4 if dtype == "fp8" else 0)


@dataclass(frozen=True)
class CommResult:
    """Per token per MoE layer (``*_rows``, ``*_bytes``) and per rank for ``tokens`` tokens
    (``*_seconds``)."""

    local_fraction: float
    rows_sent: float           # hidden vectors a token sends in dispatch (= receives in combine)
    dispatch_bytes: float      # sent per token (= received per token, balanced)
    combine_bytes: float
    intra_fraction: float      # of remote rows, the share that stays inside the node
    tokens: int
    dispatch_seconds: float
    combine_seconds: float

    @property
    def seconds(self) -> float:
        return self.dispatch_seconds + self.combine_seconds

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": self.seconds}


def rank_hit_probability(num_experts: int, per_rank: int, top_k: int) -> float:
    """P(a token's K distinct experts include at least one of a rank's ``per_rank`` experts)."""
    if per_rank >= num_experts:
        return 1.0
    return 1 - math.comb(num_experts - per_rank, top_k) / math.comb(num_experts, top_k)


def comm_per_layer(c: CommConfig, tokens: int) -> CommResult:
    """Bytes per token and time for ``tokens`` tokens per rank (see the module docstring)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    D, E, K = c.ep, c.num_experts, c.top_k
    slots = (E + c.redundant) // D
    f = c.local_fraction if c.local_fraction is not None else min(1.0, slots / E)
    if D == 1:
        f = 1.0
    if c.capacity_factor is not None:  # padded buffers: every expert's slot moves
        rows = K * c.capacity_factor * (1 - 1 / D)
    elif c.mode == "per_rank":
        hit = rank_hit_probability(E, min(slots, E), K)
        rows = (D - 1) * hit
    else:
        rows = K * (1 - f)
    g = min(c.nodes_of or D, D)
    intra = (g - 1) / (D - 1) if D > 1 else 1.0
    d_bytes = rows * c.token_bytes(c.dispatch_dtype)
    c_bytes = rows * c.token_bytes(c.combine_dtype)

    def phase(per_token: float) -> float:
        if per_token == 0:
            return 0.0
        moved = tokens * per_token
        return c.latency + max(moved * intra / c.intra_bw, moved * (1 - intra) / c.inter_bw)

    return CommResult(local_fraction=f, rows_sent=rows, dispatch_bytes=d_bytes,
                      combine_bytes=c_bytes, intra_fraction=intra, tokens=tokens,
                      dispatch_seconds=phase(d_bytes), combine_seconds=phase(c_bytes))


def a2a_bytes_from_routing(experts_TK, rank_of_expert, src_rank: int, hidden: int,
                           dtype_bytes: float) -> tuple[int, int]:
    """Exact bytes one rank sends in a dropless ``per_expert`` dispatch (and receives back in
    combine): ``experts_TK`` the expert ids of its T tokens (any nested sequence of ints or a
    tensor), ``rank_of_expert[e]`` the rank holding expert e. Returns ``(rows, bytes)``; the
    check that an all-to-all moved exactly this is the parallel tests'."""
    rows = 0
    for row in (experts_TK.tolist() if hasattr(experts_TK, "tolist") else experts_TK):
        for e in row:
            rows += rank_of_expert[int(e)] != src_rank
    return rows, int(rows * hidden * dtype_bytes)


#: DeepEP's published H800 figures (github.com/deepseek-ai/DeepEP README): low-latency kernels,
#: 128 tokens per rank, hidden 7168, top-8 of 256 experts, FP8 dispatch, BF16 combine; EP degree
#: -> (dispatch us, combine us). Normal kernels: 4096 tokens, bottleneck bandwidth GB/s.
DEEPEP_LOW_LATENCY = {8: (77, 114), 16: (118, 195), 32: (155, 273), 64: (173, 314),
                      128: (192, 369), 256: (194, 360)}
DEEPEP_NORMAL_NVLINK_GBS = (153, 158)      # intranode, EP 8, dispatch / combine
DEEPEP_NORMAL_RDMA_GBS = (43, 58)          # internode, EP 16-64, lowest / highest
#: The links DeepEP states for that machine: NVLink ~160 GB/s achievable, CX7 400 Gb/s RDMA
#: (50 GB/s) per GPU; and the one fitted constant, the per-kernel fixed cost.
DEEPEP_INTRA_BW, DEEPEP_INTER_BW, DEEPEP_LATENCY = 160e9, 50e9, KERNEL_LATENCY


def deepep_config(ep: int, mode: str = "per_expert") -> CommConfig:
    """DeepSeek-V3's MoE layer on DeepEP's H800 cluster (nodes of 8) at EP degree ``ep``."""
    return CommConfig(7168, 8, 256, ep, dispatch_dtype="fp8", combine_dtype="bf16",
                      nodes_of=8, intra_bw=DEEPEP_INTRA_BW, inter_bw=DEEPEP_INTER_BW,
                      latency=DEEPEP_LATENCY, mode=mode)
