"""The candidates the layer benchmark times: the dense ideal, smoe, all-experts, transformers.

:class:`Candidate` (a named builder), :class:`Built` (a candidate built for one shape),
:class:`Skip` (a candidate that cannot run here), the shared weight init, the dense
:class:`SwiGLU` and :class:`AllExperts` modules, and transformers' sparse MoE blocks with each
experts backend. Peers' adapters (``benchmarks/peers.py``) build on these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smoe.bench.shapes import DENSE, Shape

INIT_STD = 0.02
#: transformers' batched_mm gathers one weight matrix per (token, expert) pair; above this it
#: is skipped (forward; twice that with the gradients of the gathered weights).
BATCHED_MM_LIMIT_BYTES = 4 * 2**30


# --- candidates -----------------------------------------------------------------------------
class Skip(Exception):
    """A candidate that cannot run here: ``short`` goes in the table cell, ``detail`` below it."""

    def __init__(self, short: str, detail: str = "") -> None:
        super().__init__(short)
        self.short = short
        self.detail = detail or short


@dataclass
class Built:
    """A candidate built for one shape.

    forward: x_TD -> y_TD (float32). params: what backward writes gradients into.
    limit: (T, backward) -> a Skip to raise, or None, for inputs it cannot take (memory,
        divisibility). close: called when the shape is done (free a process group, ...).
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.Tensor]
    module: nn.Module | None = None
    limit: Callable[[int, bool], Skip | None] | None = None
    close: Callable[[], None] | None = None
    note: str = ""


@dataclass(frozen=True)
class Candidate:
    """A named builder. ``tokens_exponent``: how its time grows with T (2 for one-hot
    dispatch), used to predict, from the previous T, whether a call would be too slow."""

    name: str
    label: str
    build: Callable[[Shape], Built]
    group: str = "peer"  # "ideal" | "smoe" | "transformers" | "all-experts" | "peer"
    tokens_exponent: float = 1.0


def init_weights(module: nn.Module, seed: int = 0, std: float = INIT_STD) -> nn.Module:
    """Same init for every candidate: N(0, std) on every weight matrix (dim >= 2), others kept.

    Matters for routing: transformers' Qwen3 router starts at zeros (every token would tie on
    the same experts) and lucidrains' gate at N(0, 1) (every token near one-hot).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


class SwiGLU(nn.Module):
    """A dense SwiGLU FFN: down(silu(x W_g) * (x W_u)), gate and up fused in one matmul."""

    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * width, bias=False)
        self.down = nn.Linear(width, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class AllExperts(nn.Module):
    """Every expert on every token (dense over E), combined with the router's top-K weights
    (softmax, top-K, renormalised; zero for the experts not chosen): the cost sparsity avoids."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        d, f, E = shape.d, shape.f, shape.E
        self.top_k = shape.K
        self.router = nn.Linear(d, E, bias=False)
        self.gate_up_DF = nn.Parameter(torch.empty(E, d, 2 * f))  # [E, d, 2f]
        self.down_FD = nn.Parameter(torch.empty(E, f, d))  # [E, f, d]
        self.shared = SwiGLU(d, shape.shared) if shape.shared else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        probs_TE = torch.softmax(self.router(x_TD).float(), dim=-1)
        w_TK, idx_TK = probs_TE.topk(self.top_k, dim=-1)
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
        weight_TE = torch.zeros_like(probs_TE).scatter(1, idx_TK, w_TK).to(x_TD.dtype)
        h_ET2F = torch.matmul(x_TD, self.gate_up_DF)  # (T, d) @ (E, d, 2f) -> (E, T, 2f)
        gate, up = h_ET2F.chunk(2, dim=-1)
        y_ETD = torch.bmm(F.silu(gate) * up, self.down_FD)
        out_TD = torch.einsum("te,etd->td", weight_TE, y_ETD)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        return out_TD


def _built(module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], **kw) -> Built:
    return Built(forward=forward, params=[p for p in module.parameters() if p.requires_grad],
                 module=module, **kw)


def _build_dense(shape: Shape) -> Built:
    m = init_weights(SwiGLU(shape.d, shape.dense_width))
    return _built(m, m)


def _build_smoe(shape: Shape) -> Built:
    from smoe import MoEConfig, MoELayer

    cfg = MoEConfig(hidden_size=shape.d, expert_size=shape.f, num_experts=shape.E,
                    top_k=shape.K, router="softmax_topk", aux_loss_coef=0.0, z_loss_coef=0.0,
                    num_shared_experts=1 if shape.shared else 0,
                    shared_expert_size=shape.shared or None)
    layer = init_weights(MoELayer(cfg))
    return _built(layer, lambda x: layer(x)[0])


def _build_all_experts(shape: Shape) -> Built:
    m = init_weights(AllExperts(shape))
    return _built(m, m)


def with_shared(shape: Shape, module: nn.Module,
                forward: Callable[[torch.Tensor], torch.Tensor]) -> tuple[nn.Module, Callable]:
    """For a block without shared experts: add a SwiGLU of the shape's shared width beside it."""
    if not shape.shared:
        return module, forward
    shared = init_weights(SwiGLU(shape.d, shape.shared), seed=1)
    holder = nn.ModuleDict({"block": module, "shared": shared})
    return holder, (lambda x: forward(x) + shared(x))


def builtin_candidates() -> list[Candidate]:
    return [
        Candidate(DENSE, "dense SwiGLU, width K*f: the ideal", _build_dense, "ideal"),
        Candidate("smoe", "smoe MoELayer", _build_smoe, "smoe"),
        Candidate("all-experts", "all experts computed for every token", _build_all_experts,
                  "all-experts"),
    ]


# --- transformers ---------------------------------------------------------------------------
HF_BLOCKS = ("mixtral", "qwen3", "olmoe")
HF_BACKENDS = ("eager", "grouped_mm", "batched_mm")


def hf_block(shape: Shape, family: str, backend: str) -> nn.Module:
    """transformers' sparse MoE block of ``family`` for ``shape``, experts backend ``backend``.

    The experts implementation is chosen by the config's ``experts_implementation`` (stored as
    ``config._experts_implementation``), read by ``@use_experts_implementation`` at each forward.
    Top-K weights are renormalised in all three (Mixtral always; Qwen3/OLMoE by
    ``norm_topk_prob=True``), like smoe's ``softmax_topk``.
    """
    try:
        if family == "mixtral":
            from transformers.models.mixtral.configuration_mixtral import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

            cfg = MixtralConfig(hidden_size=shape.d, intermediate_size=shape.f,
                                num_local_experts=shape.E, num_experts_per_tok=shape.K,
                                router_jitter_noise=0.0, experts_implementation=backend)
            block = MixtralSparseMoeBlock(cfg)
        elif family == "qwen3":
            from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

            cfg = Qwen3MoeConfig(hidden_size=shape.d, moe_intermediate_size=shape.f,
                                 num_experts=shape.E, num_experts_per_tok=shape.K,
                                 norm_topk_prob=True, experts_implementation=backend)
            block = Qwen3MoeSparseMoeBlock(cfg)
        elif family == "olmoe":
            from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
            from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

            cfg = OlmoeConfig(hidden_size=shape.d, intermediate_size=shape.f,
                              num_experts=shape.E, num_experts_per_tok=shape.K,
                              norm_topk_prob=True, experts_implementation=backend)
            block = OlmoeSparseMoeBlock(cfg)
        else:
            raise ValueError(f"unknown transformers block {family!r}")
    except ImportError as exc:
        raise Skip("not installed", f"transformers: {exc}") from exc
    if block.experts.config._experts_implementation != backend:
        raise Skip("backend not set", f"config._experts_implementation is "
                                      f"{block.experts.config._experts_implementation!r}")
    return init_weights(block)


def _batched_mm_limit(shape: Shape) -> Callable[[int, bool], Skip | None]:
    def limit(T: int, backward: bool) -> Skip | None:
        per_pair = (2 * shape.f * shape.d + shape.f * shape.d) * 4
        need = T * shape.K * per_pair * (2 if backward else 1)
        if need > BATCHED_MM_LIMIT_BYTES:
            return Skip(f"mem {need / 2**30:.0f} GiB",
                        f"batched_mm gathers one weight copy per (token, expert): "
                        f"{need / 2**30:.1f} GiB > {BATCHED_MM_LIMIT_BYTES / 2**30:.0f} GiB")
        return None
    return limit


def _hf_builder(family: str, backend: str) -> Callable[[Shape], Built]:
    def build(shape: Shape) -> Built:
        block = hf_block(shape, family, backend)
        d = shape.d

        def fwd(x_TD: torch.Tensor) -> torch.Tensor:
            return block(x_TD.view(1, -1, d)).view(-1, d)

        module, forward = with_shared(shape, block, fwd)
        return _built(module, forward,
                      limit=_batched_mm_limit(shape) if backend == "batched_mm" else None,
                      note=("no shared expert in the block: on shapes with shared experts a "
                            "SwiGLU of the shared width (like smoe's) is added beside it")
                      if shape.shared else "")
    return build


def transformers_candidates() -> list[Candidate]:
    names = {"mixtral": "Mixtral", "qwen3": "Qwen3-MoE", "olmoe": "OLMoE"}
    return [Candidate(f"hf-{fam}-{be}", f"transformers {names[fam]} block, {be} experts",
                      _hf_builder(fam, be), "transformers")
            for fam in HF_BLOCKS for be in HF_BACKENDS]


def all_candidates(peers: Iterable[Candidate] = ()) -> list[Candidate]:
    return builtin_candidates() + transformers_candidates() + list(peers)
